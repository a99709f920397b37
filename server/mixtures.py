"""Per-request adapter mixtures: several adapters' LoRA pairs combined into one, as PEFT's `add_weighted_adapter`
combines them (`linear`, `cat`, `ties`, `dare_linear`, `dare_ties`), so a mixture serves from one slot like any
adapter.

Pure tensor work on parsed adapters (no model): the engine reads the parts, calls `mixture_problems` and then
`combine`, and installs the result. PEFT's own merge functions (peft.utils.merge_utils) do the arithmetic; only
DARE's random pruning is ours, because PEFT draws it from torch's global generator: here it draws from a generator
seeded per mixture, in PEFT's order (module by module in the model's order, A before B, adapter by adapter), so a
seed gives PEFT's mixture after `torch.manual_seed(seed)`, and the same mixture every time it is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, task_arithmetic, ties

from .adapter_format import AdapterWeights, LoraModuleWeights
from .types import Combination

MAJORITY_SIGN = "total"  # PEFT's default majority_sign_method for ties and dare_ties


def config_rank(adapter: AdapterWeights) -> int:
    """The rank PEFT's add_weighted_adapter sees for an adapter: its config's r, or the largest of its rank_pattern."""
    config = adapter.config
    pattern = config.get("rank_pattern") or {}
    return max(int(config.get("r", 8)), *(int(v) for v in pattern.values())) if pattern else int(config.get("r", 8))


def mixture_problems(adapters: Sequence[tuple[str, AdapterWeights]], combination: Combination) -> list[str]:
    """Every reason these adapters cannot be combined this way (PEFT's own rules, and ours where PEFT would build a
    mixture that means nothing). The request's own fields (density, seed) are checked at the edge (serving.py)."""
    problems = []
    for name, adapter in adapters:
        if adapter.task == "classification":
            problems.append(
                f"{name!r} is a classification adapter: each classifier saves its own head (modules_to_save), and "
                "PEFT's add_weighted_adapter refuses to combine adapters that save the same module (a mixture would "
                "get an untrained head); mix generation adapters")
        if adapter.dora:
            problems.append(f"{name!r} is a DoRA adapter: add_weighted_adapter combines LoRA pairs only, not DoRA's "
                            "magnitude vectors")
    tasks = {adapter.task for _, adapter in adapters}
    if len(tasks) > 1:
        problems.append(f"the adapters are for different tasks ({', '.join(sorted(tasks))}): a mixture needs one task")
    ranks = {name: config_rank(adapter) for name, adapter in adapters}
    if combination != "cat" and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{name!r} r={rank}" for name, rank in ranks.items())
        problems.append(f"{combination} needs adapters of one rank, as in PEFT ({listed}); 'cat' takes any ranks")
    return problems


def combine(
    parts: Sequence[dict[str, LoraModuleWeights]],
    weights: Sequence[float],
    combination: Combination,
    order: Sequence[str],
    *,
    density: float | None = None,
    seed: int = 0,
    rslora: bool = False,
) -> dict[str, LoraModuleWeights]:
    """The mixture's LoRA pairs by module path. `parts` are the adapters' pairs keyed by the same paths, `order` every
    path in the model's module order. As add_weighted_adapter, the mixture has alpha = r, so its scale is 1 (with
    use_rslora on the first adapter, which PEFT copies the config of: sqrt(r))."""
    generator = torch.Generator().manual_seed(seed) if combination.startswith("dare") else None
    mixed: dict[str, LoraModuleWeights] = {}
    for path in order:
        present = [(pairs[path], weight) for pairs, weight in zip(parts, weights) if path in pairs]
        if not present:
            continue
        dtype = present[0][0].A.dtype
        if combination == "cat":
            A = torch.cat([pair.A * weight * pair.scale for pair, weight in present], 0)  # [sum r, in]
            B = torch.cat([pair.B for pair, _ in present], 1)  # [out, sum r]
        else:
            # the weight (with each adapter's own scale) split as sqrt over A and B, its sign on A only
            scaled = [weight * pair.scale for pair, weight in present]
            weights_A = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in scaled])
            weights_B = torch.tensor([math.sqrt(abs(w)) for w in scaled])
            A = _merged([pair.A for pair, _ in present], weights_A, combination, density, generator)
            B = _merged([pair.B for pair, _ in present], weights_B, combination, density, generator)
        rank = A.shape[0]
        mixed[path] = LoraModuleWeights(A.to(dtype), B.to(dtype), math.sqrt(rank) if rslora else 1.0)
    return mixed


def _merged(tensors: list[torch.Tensor], weights: torch.Tensor, combination: Combination, density: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if combination == "linear":
        return task_arithmetic(tensors, weights)
    if combination == "ties":
        return ties(tensors, weights, density, MAJORITY_SIGN)
    pruned = torch.stack([_random_pruning(t, density, generator) for t in tensors])
    weighted = pruned * weights.view(-1, *[1] * (pruned.dim() - 1))
    if combination == "dare_linear":
        return weighted.sum(0)
    return disjoint_merge(weighted, calculate_majority_sign_mask(pruned, MAJORITY_SIGN))  # dare_ties


def _random_pruning(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """PEFT's DARE pruning (prune(method="random", rescale=True)): keep each value with probability `density`,
    rescaled by 1 / density; a density of 1 keeps everything and draws nothing."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density
