"""Our multi-adapter LoRA layer: many adapters live side by side on one frozen Linear, chosen per row.

Why our own and not PEFT's layers: PEFT's per-call hooks and `set_adapter` mutate shared state (not thread-safe),
its mixed batches loop over adapters in every layer, and `load_adapter` costs 70-100 ms. Here a slot is a plain
tensor pair; the engine sets the per-row slot assignment once per batch (`LoraContext`) and every layer reads it.
Tests check the output against PEFT's own (tests/test_exactness.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_format import AdapterWeights

BASE_SLOT = 0  # rows assigned slot 0 get the base model only


@dataclass
class LoraContext:
    """Which slot each row of the current batch uses; computed once per batch and shared by all layers."""

    row_slots: torch.Tensor | None = None  # [batch] int64, set for mixed batches
    uniform_slot: int = BASE_SLOT  # used when row_slots is None
    # per layer, its pairs gathered for this batch's rows: done at the first forward, reused by every decode step
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def set_uniform(self, slot: int) -> None:
        self.row_slots, self.uniform_slot = None, slot
        self.gathered.clear()

    def set_rows(self, slots: list[int], device: torch.device | str) -> None:
        if len(set(slots)) == 1:
            self.set_uniform(slots[0])
        else:
            self.row_slots = torch.tensor(slots, dtype=torch.long, device=device)
            self.gathered.clear()


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear plus LoRA pairs per slot: y = W x + B_s (A_s x) * scale_s for the row's slot s.

    Pairs are kept twice: unpadded per slot (rows all on one adapter: two small matmuls) and stacked by slot with
    ranks zero-padded to the largest (mixed rows: one gather + two batched matmuls). Zero padding adds exactly 0.
    The LoRA path always computes in float32: on the CPU, bf16 matmuls with a rank-sized inner dimension take a
    slow path (measured 15 ms against 0.3 ms in f32 for 640 tokens), and f32 is the more exact choice anyway.
    """

    def __init__(self, base: nn.Linear, context: LoraContext, n_slots: int):
        super().__init__()
        self.base = base
        self.context = context
        self.n_slots = n_slots
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A [r, in], B*scale [out, r])
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # ([slots, r_max, in], [slots, out, r_max])
        self._pristine: torch.Tensor | None = None  # the base weight while an adapter is merged into it

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
        device = self.base.weight.device
        A = A.to(device=device, dtype=torch.float32).contiguous()
        B = (B.to(device=device, dtype=torch.float32) * scale).contiguous()
        self.pairs[slot] = (A, B)
        if self._stacked is not None and A.shape[0] <= self._stacked[0].shape[1]:
            A_all, B_all = self._stacked  # update in place: loading never rebuilds the whole stack
            A_all[slot].zero_()[: A.shape[0]] = A
            B_all[slot].zero_()[:, : B.shape[1]] = B
        else:
            self._stacked = None

    def clear_slot(self, slot: int) -> None:
        if self.pairs.pop(slot, None) is not None and self._stacked is not None:
            self._stacked[0][slot].zero_()
            self._stacked[1][slot].zero_()

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stacked is None:
            r_max = max(A.shape[0] for A, _ in self.pairs.values())
            device = self.base.weight.device
            A_all = torch.zeros(self.n_slots, r_max, self.in_features, device=device)
            B_all = torch.zeros(self.n_slots, self.out_features, r_max, device=device)
            for slot, (A, B) in self.pairs.items():
                A_all[slot, : A.shape[0]] = A
                B_all[slot, :, : B.shape[1]] = B
            self._stacked = (A_all, B_all)
        return self._stacked

    def merge(self, slot: int) -> None:
        """Fold a slot's pair into the base weight (in float32), keeping the pristine weight to restore."""
        pair = self.pairs.get(slot)
        if pair is None:
            return
        weight = self.base.weight
        self._pristine = weight.detach().clone()
        A, B = pair
        weight.data.copy_((self._pristine.float() + B @ A).to(weight.dtype))

    def unmerge(self) -> None:
        """Restore the pristine base weight: a copy, not a subtraction, so no drift accumulates."""
        if self._pristine is not None:
            self.base.weight.data.copy_(self._pristine)
            self._pristine = None

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
            low = nn.functional.linear(x.float(), A).reshape(-1, A.shape[0])  # [tokens, r]
            if out.dtype == torch.float32:  # fused: out += low @ B^T
                out.view(-1, self.out_features).addmm_(low, B.t())
                return out
            return out + (low @ B.t()).view(out.shape).to(out.dtype)
        # mixed batch: each row's pair, gathered once per batch, applied with two batched matmuls (Punica's BGMV)
        slots = ctx.row_slots
        selected = ctx.gathered.get(id(self))
        if selected is None:
            A_all, B_all = self._stack()
            selected = ctx.gathered[id(self)] = (
                A_all.index_select(0, slots).transpose(1, 2),  # [batch, in, r_max]
                B_all.index_select(0, slots).transpose(1, 2),  # [batch, r_max, out]
            )
        A_rows, B_rows = selected
        low = torch.bmm(x.float().reshape(slots.shape[0], -1, self.in_features), A_rows)  # [batch, tokens, r_max]
        if out.dtype == torch.float32:  # fused: out += low @ B_rows
            out3 = out.view(slots.shape[0], -1, self.out_features)
            out3.baddbmm_(low, B_rows)
            return out
        return out + torch.bmm(low, B_rows).view(out.shape).to(out.dtype)


def wrap_linear_layers(model: nn.Module, context: LoraContext, n_slots: int) -> dict[str, MultiLoraLinear]:
    """Replace every nn.Linear inside the decoder layers with a MultiLoraLinear; return them by module path."""
    wrapped: dict[str, MultiLoraLinear] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in f".{path}":
            parent_path, _, child = path.rpartition(".")
            layer = MultiLoraLinear(module, context, n_slots)
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
