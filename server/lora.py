"""Our multi-adapter LoRA layer: many adapters live side by side on one frozen Linear, chosen per row.

Why our own and not PEFT's layers: PEFT's per-call hooks and `set_adapter` mutate shared state (not thread-safe),
its mixed batches loop over adapters in every layer, and `load_adapter` costs 70-100 ms. Here a slot is a plain
tensor pair; the engine sets the per-row slot assignment once per batch (`LoraContext`) and every layer reads it.
Tests check the output against PEFT's own (tests/test_exactness.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import panels
from .adapter_format import AdapterWeights
from .slots import BASE_SLOT

SERVED_LAYER_TYPES = (nn.Linear, Conv1D)  # GPT-2's Conv1D is a Linear with its weight stored transposed
ZERO_RANK = 2  # the rank of the zero pair a layer without pairs gives compiled graphs (1 would be a shape of its own)


class LoraContext:
    """Which slot each row of the running forward uses; set once per forward (`with context.rows(...)`) and read by
    every layer. Outside such a block every row is a base row."""

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None  # [batch] int64, set for mixed batches
        self.uniform_slot = BASE_SLOT  # every row's slot when row_slots is None
        self.batch = 0  # bumped when the mixed assignment changes: layers gather their rows' pairs once for it
        self.active: frozenset[int] = frozenset()  # the slots of the running forward's rows
        self.layout = 0  # bumped when a layer reallocates its pair stacks or a slot becomes or stops being DoRA
        self._last_mixed: tuple[int, ...] = ()

    @contextmanager
    def rows(self, slots: list[int], device: torch.device | str) -> Iterator[None]:
        self.active = frozenset(slots)
        if len(set(slots)) == 1:
            self.uniform_slot = slots[0]
        else:
            if tuple(slots) != self._last_mixed:  # decode steps repeat their assignment: gather once for all
                self._last_mixed = tuple(slots)
                self.batch += 1
            self.row_slots = torch.tensor(slots, dtype=torch.long, device=device)
        try:
            yield
        finally:
            self.row_slots, self.uniform_slot, self.active = None, BASE_SLOT, frozenset()


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear (or transformers' Conv1D) plus LoRA pairs per slot: y = W x + B_s (A_s x) * scale_s for
    the row's slot s.

    A Conv1D keeps its weight as [in, out] (PEFT's fan_in_fan_out=True): its LoRA pairs are the same A [r, in] and
    B [out, r] as a Linear's, only a merge adds the update transposed.

    Pairs live stacked by slot, ranks zero-padded to the largest (zero padding adds exactly 0): rows all on one
    adapter use views of its pair (two small matmuls); mixed rows gather their pairs (once per batch, into buffers
    kept from batch to batch) and apply them with two batched matmuls. Nothing is allocated per batch on purpose:
    with fresh per-batch buffers glibc handed pages back and faulted them in again (10-20k faults per 6 batches), and
    a stack built lazily by the first mixed batch took ~2 s: together 5-15 % of a 100-adapter classification stream.
    The LoRA path always computes in float32: on the CPU, bf16 matmuls with a rank-sized inner dimension take a
    slow path (measured 15 ms against 0.3 ms in f32 for 640 tokens), and f32 is the more exact choice anyway.
    """

    def __init__(self, base: nn.Linear | Conv1D, context: LoraContext, n_slots: int):
        super().__init__()
        self.base = base
        self.context = context
        self.n_slots = n_slots
        self.fan_in_fan_out = isinstance(base, Conv1D)  # weight [in, out]
        out_features, in_features = base.weight.shape[::-1] if self.fan_in_fan_out else base.weight.shape
        self._features = (int(in_features), int(out_features))
        self.ranks: dict[int, int] = {}  # slot -> rank of the pair it holds
        device = base.weight.device
        self._A = torch.zeros(n_slots, 0, in_features, device=device)  # [slots, r_max, in]
        self._Bt = torch.zeros(n_slots, 0, out_features, device=device)  # (B * scale)^T [slots, r_max, out]
        self._rows_A, self._rows_Bt = torch.empty(0, device=device), torch.empty(0, device=device)  # mixed rows' pairs
        self._rows_batch = -1  # the context batch those rows were gathered for
        self._pristine: torch.Tensor | None = None  # the base weight while an adapter is merged into it
        self._panels: torch.Tensor | None = None  # the (merged) base weight in panels, see pack()
        self._zero_pair = (torch.zeros(ZERO_RANK, in_features, device=device),  # see padded_pair()
                           torch.zeros(ZERO_RANK, out_features, device=device))
        # DoRA slots: their g = m / ||W + scale * B A|| per output feature [out] (float32), and those factors
        # stacked by slot [slots, out] (1 for the other slots), made when the first DoRA adapter comes
        self._dora: dict[int, torch.Tensor] = {}
        self._dora_rows: torch.Tensor | None = None
        self._dora_shift: torch.Tensor | None = None  # (1 - g) b by slot [slots, out], for layers with a bias
        self._rows_G = self._rows_shift = torch.empty(0, device=device)  # the mixed rows' g and (1 - g) b
        self.version = 0  # bumped when its panels, LoRA stacks or pairs change (server/fused.py reads them raw)

    @property
    def in_features(self) -> int:
        return self._features[0]

    @property
    def out_features(self) -> int:
        return self._features[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def set_slot(
        self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None
    ) -> None:
        """Install a LoRA pair (and for DoRA its magnitude vector [out]) into a slot."""
        rank = A.shape[0]
        if rank > self._A.shape[1]:
            self._restack(rank)
        self._A[slot].zero_()[:rank] = A
        self._Bt[slot].zero_()[:rank] = (B.to(device=self._Bt.device, dtype=torch.float32) * scale).t()
        self.ranks[slot] = rank
        self._rows_batch = -1
        self.version += 1
        self._set_dora(slot, magnitude)

    def clear_slot(self, slot: int) -> None:
        if self.ranks.pop(slot, None) is not None:
            self._A[slot].zero_()
            self._Bt[slot].zero_()
            self._rows_batch = -1
            self.version += 1
        self._set_dora(slot, None)

    def _set_dora(self, slot: int, magnitude: torch.Tensor | None) -> None:
        """DoRA (PEFT's DoraLinearLayer): y = W x + b + (g - 1) W x + g (B A x) scale, with g = m / ||W + scale B A||
        per output feature. PEFT detaches the norm from training, so at inference g is a constant of the slot:
        computed once here, in float32, from the pristine base weight (not from one with an adapter merged into it).
        Dropout does not apply at inference, as in PEFT's eval mode. Kept per slot: g and (1 - g) b, for the forward's
        form g (W x + b + B A x scale) + (1 - g) b (the same sum: two in-place ops on the output)."""
        if magnitude is None:
            if self._dora.pop(slot, None) is not None:
                self._dora_rows[slot] = 1.0
                self._dora_shift[slot] = 0.0
                self._rows_batch = -1
                self.context.layout += 1
            return
        weight = (self._pristine if self._pristine is not None else self.base.weight).float()
        if self.fan_in_fan_out:
            weight = weight.t()  # [out, in], as PEFT's transpose(weight, fan_in_fan_out)
        A, Bt = self.pair(slot)
        norm = torch.linalg.norm(weight + Bt.t() @ A, dim=1)  # [out]
        factor = magnitude.to(device=norm.device, dtype=torch.float32) / norm
        if self._dora_rows is None:
            self._dora_rows = torch.ones(self.n_slots, self.out_features, device=norm.device)  # [slots, out]
            self._dora_shift = torch.zeros(self.n_slots, self.out_features, device=norm.device)  # [slots, out]
        self._dora_rows[slot] = factor
        if self.base.bias is not None:
            self._dora_shift[slot] = (1 - factor) * self.base.bias.float()
        self._dora[slot] = self._dora_rows[slot]  # a view of its row
        self.context.layout += 1
        self._rows_batch = -1

    def _restack(self, r_max: int) -> None:
        """Make room for a larger rank (only then is the whole stack reallocated)."""
        device = self.base.weight.device
        A = torch.zeros(self.n_slots, r_max, self.in_features, device=device)
        Bt = torch.zeros(self.n_slots, r_max, self.out_features, device=device)
        A[:, : self._A.shape[1]] = self._A
        Bt[:, : self._Bt.shape[1]] = self._Bt
        self._A, self._Bt = A, Bt
        self.context.layout += 1

    def pair(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's pair as views: A [r, in] and (B * scale)^T [r, out]."""
        rank = self.ranks[slot]
        return self._A[slot, :rank], self._Bt[slot, :rank]

    def padded_pair(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's pair zero-padded to the layer's largest rank (the padding adds exactly 0), zeros where the slot
        has none here: one shape for every slot of the layer, for compiled graphs."""
        if self._A.shape[1] == 0:  # no adapter reached this layer yet
            return self._zero_pair
        return self._A[slot], self._Bt[slot]

    def is_dora(self, slot: int) -> bool:
        return slot in self._dora

    def has_dora(self, slots: frozenset[int]) -> bool:
        """Whether any of these slots is a DoRA slot on this layer."""
        return bool(self._dora) and not slots.isdisjoint(self._dora)

    @property
    def panel_weight(self) -> torch.Tensor | None:
        """The (merged) base weight in panels (see pack()), None where the panel kernel does not serve."""
        return self._panels

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every slot's pair, zero-padded to the largest rank: A [slots, r, in] and (B * scale)^T [slots, r, out]
        (zeros for slots without one); None while no slot has a pair here. Replaced when a larger rank comes."""
        return (self._A, self._Bt) if self.ranks and self._A.shape[1] > 0 else None

    def pack(self) -> None:
        """Keep the base weight also in panels (server/panels.py): inference forwards (no autograd) then multiply
        with them; a merge packs it again. Where that path is unavailable nothing changes."""
        weight = self.base.weight.detach()
        self._panels = panels.pack(weight.t() if self.fan_in_fan_out else weight)
        self.version += 1

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._panels is not None and not torch.is_grad_enabled():
            return panels.linear(x, self._panels, self.out_features, self.base.bias)
        return self.base(x)

    def merge(self, slot: int) -> None:
        """Fold a slot's pair into the base weight (in float32), keeping the pristine weight to restore."""
        if slot not in self.ranks:
            return
        weight = self.base.weight
        self._pristine = weight.detach().clone()
        A, Bt = self.pair(slot)
        update = A.t() @ Bt if self.fan_in_fan_out else Bt.t() @ A  # the weight's own layout
        merged = self._pristine.float() + update
        if slot in self._dora:  # PEFT's DoRA merge: g (W + scale B A); the bias stays as it is
            factor = self._dora[slot]
            merged *= factor[None, :] if self.fan_in_fan_out else factor[:, None]
        weight.data.copy_(merged.to(weight.dtype))
        if self._panels is not None:
            self.pack()

    def unmerge(self) -> None:
        """Restore the pristine base weight: a copy, not a subtraction, so no drift accumulates."""
        if self._pristine is not None:
            self.base.weight.data.copy_(self._pristine)
            self._pristine = None
            if self._panels is not None:
                self.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if not self.ranks:
            return out
        ctx = self.context
        if self.has_dora(ctx.active):
            return self._forward_dora(x, out)
        if ctx.row_slots is None:
            if ctx.uniform_slot not in self.ranks:
                return out
            A, Bt = self.pair(ctx.uniform_slot)
            low = nn.functional.linear(x.float(), A).reshape(-1, A.shape[0])  # [tokens, r]
            if out.dtype == torch.float32:  # fused: out += low @ Bt
                out.view(-1, self.out_features).addmm_(low, Bt)
                return out
            return out + (low @ Bt).view(out.shape).to(out.dtype)
        # mixed batch: each row's pair, gathered once per batch, applied with two batched matmuls (Punica's BGMV)
        rows = self._gather_rows(x)
        low = torch.bmm(x.float().reshape(rows, -1, self.in_features), self._rows_A.transpose(1, 2))  # [rows, tok, r]
        if out.dtype == torch.float32:  # fused: out += low @ Bt_rows
            out.view(rows, -1, self.out_features).baddbmm_(low, self._rows_Bt)
            return out
        return out + torch.bmm(low, self._rows_Bt).view(out.shape).to(out.dtype)

    def rows_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed rows' pairs, each zero-padded to the layer's largest rank (zeros for base rows and where no
        adapter reached this layer): A [rows, r, in] and (B * scale)^T [rows, r, out], for compiled graphs. They are
        the buffers the eager forward gathers into, valid until the next change of assignment (context.batch)."""
        rows = self.context.row_slots.shape[0]
        if self._A.shape[1] == 0:
            zero_A, zero_Bt = self._zero_pair
            return zero_A.expand(rows, -1, -1).contiguous(), zero_Bt.expand(rows, -1, -1).contiguous()
        self._gather()
        return self._rows_A, self._rows_Bt

    def _gather_rows(self, x: torch.Tensor) -> int:
        """Gather the mixed rows' pairs for the input x (once per change of assignment); the row count."""
        rows = self.context.row_slots.shape[0]
        if x.shape[0] != rows:  # as PEFT's _check_forward_args: a row assignment must match the batch it is for
            raise ValueError(f"the LoRA row assignment has {rows} rows but the input batch has {x.shape[0]}")
        self._gather()
        return rows

    def _gather(self) -> None:
        """Gather the mixed rows' pairs into the reused buffers, once per change of assignment."""
        ctx = self.context
        slots = ctx.row_slots
        if self._rows_batch != ctx.batch:
            rows = slots.shape[0]
            torch.index_select(self._A, 0, slots, out=self._rows_A.resize_(rows, *self._A.shape[1:]))
            torch.index_select(self._Bt, 0, slots, out=self._rows_Bt.resize_(rows, *self._Bt.shape[1:]))
            if self._dora:  # DoRA's g and (1 - g) b per row
                self._rows_G = self._dora_rows.index_select(0, slots)
                self._rows_shift = self._dora_shift.index_select(0, slots)
            self._rows_batch = ctx.batch

    def _forward_dora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A forward with DoRA rows: PEFT adds (g - 1) (W x) + g (B A x) scale to the base output W x + b; here the
        same sum as g (W x + b + B A x scale) + (1 - g) b, per row's slot. Plain LoRA and base rows have g = 1 and
        (1 - g) b = 0 (base rows a zero pair too): they get out + B A x scale."""
        ctx = self.context
        if ctx.row_slots is None:
            slot = ctx.uniform_slot
            A, Bt = self.pair(slot)
            lora = (nn.functional.linear(x.float(), A).reshape(-1, A.shape[0]) @ Bt).view(out.shape)  # [..., out]
            factor, shift = self._dora_rows[slot], self._dora_shift[slot]  # [out]
        else:
            rows = self._gather_rows(x)
            low = torch.bmm(x.float().reshape(rows, -1, self.in_features), self._rows_A.transpose(1, 2))
            lora = torch.bmm(low, self._rows_Bt).view(out.shape)
            shape = (rows, *[1] * (out.dim() - 2), self.out_features)  # each row's g over its tokens
            factor = self._rows_G.view(shape)
            shift = self._rows_shift.view(shape)
        if out.dtype == torch.float32:
            out.add_(lora).mul_(factor)
        else:
            out = ((out.float() + lora) * factor).to(out.dtype)
        return out.add_(shift.to(out.dtype)) if self.base.bias is not None else out



def wrap_linear_layers(model: nn.Module, context: LoraContext, n_slots: int) -> dict[str, MultiLoraLinear]:
    """Replace every Linear and Conv1D inside the body (the transformer without its LM or classification head)
    with a MultiLoraLinear; return them by module path."""
    prefix = model.base_model_prefix
    wrapped: dict[str, MultiLoraLinear] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, SERVED_LAYER_TYPES) and path.startswith(f"{prefix}."):
            parent_path, _, child = path.rpartition(".")
            layer = MultiLoraLinear(module, context, n_slots)
            setattr(model.get_submodule(parent_path), child, layer)
            wrapped[path] = layer
    return wrapped


def resolve_module_path(module: str, layers: dict[str, MultiLoraLinear], prefix: str = "model") -> str | None:
    """Map an adapter's module path onto ours (adapters of a bare body, e.g. LlamaModel, lack the leading
    'model.')."""
    for candidate in (module, f"{prefix}.{module}"):
        if candidate in layers:
            return candidate
    return None


def fit_problems(adapter: AdapterWeights, layers: dict[str, MultiLoraLinear], model: nn.Module) -> list[str]:
    """Every way the adapter's LoRA pairs do not fit the loaded base: unknown modules, layer types we do not serve,
    wrong shapes. (Classification heads are checked by server/heads.py.)"""
    prefix = model.base_model_prefix
    problems: list[str] = []
    unknown = []
    for module in [*adapter.modules, *adapter.other_lora_modules]:
        path = resolve_module_path(module, layers, prefix)
        if path is not None and module in adapter.modules:
            continue
        found = next((m for p in (module, f"{prefix}.{module}") if (m := _submodule(model, p)) is not None), None)
        if isinstance(found, MultiLoraLinear):
            found = found.base
        if found is None:
            unknown.append(module)
            problems.append(f"module {module!r} does not exist in the base model")
        else:
            problems.append(f"module {module!r} is a {type(found).__name__} layer: LoRA is served on Linear and "
                            "Conv1D layers only")
    if unknown and len(unknown) == len(adapter.modules) + len(adapter.other_lora_modules):
        problems.insert(0, f"none of the adapter's modules exists in the base: an adapter for another architecture "
                           f"than the loaded {type(model).__name__}?")
    for module, pair in adapter.modules.items():
        path = resolve_module_path(module, layers, prefix)
        if path is None:
            continue
        layer = layers[path]
        if pair.A.shape[1] != layer.in_features or pair.B.shape[0] != layer.out_features:
            problems.append(
                f"{module}: lora_A {tuple(pair.A.shape)} / lora_B {tuple(pair.B.shape)} do not fit a "
                f"{layer.in_features}->{layer.out_features} layer (a different base architecture or size?)"
            )
    return problems


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
