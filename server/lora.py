"""Our multi-adapter LoRA layer: many adapters live side by side on one frozen Linear, chosen per row.

Why our own and not PEFT's layers: PEFT's per-call hooks and `set_adapter` mutate shared state (not thread-safe),
its mixed batches loop over adapters in every layer, and `load_adapter` costs 70-100 ms. Here a slot is a plain
tensor pair; the engine sets the per-row slot assignment once per batch (`LoraContext`) and every layer reads it.
Tests check the output against PEFT's own (tests/test_exactness.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapter_format import AdapterWeights

BASE_SLOT = 0  # rows assigned slot 0 get the base model only


@dataclass
class LoraContext:
    """Which slot each row of the current batch uses; computed once per batch and shared by all layers."""

    row_slots: torch.Tensor | None = None  # [batch] int64, set for mixed batches
    uniform_slot: int = BASE_SLOT  # used when row_slots is None

    def set_uniform(self, slot: int) -> None:
        self.row_slots, self.uniform_slot = None, slot

    def set_rows(self, slots: list[int], device: torch.device | str) -> None:
        if len(set(slots)) == 1:
            self.set_uniform(slots[0])
        else:
            self.row_slots = torch.tensor(slots, dtype=torch.long, device=device)


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear plus LoRA pairs per slot: y = W x + B_s (A_s x) * scale_s for the row's slot s."""

    def __init__(self, base: nn.Linear, context: LoraContext):
        super().__init__()
        self.base = base
        self.context = context
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A [r, in], B*scale [out, r])
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # ([slots, r_max, in], [slots, out, r_max])

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        dtype, device = self.base.weight.dtype, self.base.weight.device
        self.pairs[slot] = (
            A.to(device=device, dtype=dtype).contiguous(),
            (B.to(device=device, dtype=torch.float32) * scale).to(dtype).contiguous(),
        )
        self._stacked = None

    def clear_slot(self, slot: int) -> None:
        if self.pairs.pop(slot, None) is not None:
            self._stacked = None

    def _stack(self, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs stacked by slot, ranks zero-padded to the largest (zero rows/cols add exactly nothing)."""
        if self._stacked is None or self._stacked[0].shape[0] < n_slots:
            r_max = max(A.shape[0] for A, _ in self.pairs.values())
            n_slots = max(n_slots, max(self.pairs) + 1)  # room for every installed slot, not just this batch's
            weight = self.base.weight
            A_all = weight.new_zeros(n_slots, r_max, self.in_features)
            B_all = weight.new_zeros(n_slots, self.out_features, r_max)
            for slot, (A, B) in self.pairs.items():
                A_all[slot, : A.shape[0]] = A
                B_all[slot, :, : B.shape[1]] = B
            self._stacked = (A_all, B_all)
        return self._stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.pairs:
            return out
        ctx = self.context
        if ctx.row_slots is None:
            pair = self.pairs.get(ctx.uniform_slot)
            if pair is None:
                return out
            A, B = pair
            return out + nn.functional.linear(nn.functional.linear(x, A), B)
        # mixed batch: gather each row's pair and apply with two batched matmuls (Punica BGMV, per sequence)
        slots = ctx.row_slots
        A_all, B_all = self._stack(int(slots.max()) + 1)
        rows = x.reshape(slots.shape[0], -1, self.in_features)  # [batch, tokens, in]
        low = torch.bmm(rows, A_all[slots].transpose(1, 2))  # [batch, tokens, r_max]
        delta = torch.bmm(low, B_all[slots].transpose(1, 2))  # [batch, tokens, out]
        return out + delta.view(out.shape)


def wrap_linear_layers(model: nn.Module, context: LoraContext) -> dict[str, MultiLoraLinear]:
    """Replace every nn.Linear inside the decoder layers with a MultiLoraLinear; return them by module path."""
    wrapped: dict[str, MultiLoraLinear] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in f".{path}":
            parent_path, _, child = path.rpartition(".")
            layer = MultiLoraLinear(module, context)
            setattr(model.get_submodule(parent_path), child, layer)
            wrapped[path] = layer
    return wrapped


def resolve_module_path(module: str, layers: dict[str, MultiLoraLinear]) -> str | None:
    """Map an adapter's module path onto ours (adapters of a bare LlamaModel lack the leading 'model.')."""
    for candidate in (module, f"model.{module}"):
        if candidate in layers:
            return candidate
    return None


def fit_problems(adapter: AdapterWeights, layers: dict[str, MultiLoraLinear], hidden_size: int) -> list[str]:
    """Every way the adapter does not fit the loaded base: unknown modules, wrong shapes, a mis-sized head."""
    problems: list[str] = []
    for module, pair in adapter.modules.items():
        path = resolve_module_path(module, layers)
        if path is None:
            problems.append(f"module {module!r} does not exist in the base model (or is not a Linear layer)")
            continue
        layer = layers[path]
        if pair.A.shape[1] != layer.in_features or pair.B.shape[0] != layer.out_features:
            problems.append(
                f"{module}: lora_A {tuple(pair.A.shape)} / lora_B {tuple(pair.B.shape)} do not fit a "
                f"{layer.in_features}->{layer.out_features} layer (a different base architecture or size?)"
            )
    if adapter.head_weight is not None and adapter.head_weight.shape[1] != hidden_size:
        problems.append(
            f"classifier head takes {adapter.head_weight.shape[1]} features but the base hidden size is {hidden_size}"
        )
    return problems
