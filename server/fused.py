"""The decode step of a Llama-like decoder's layers as one call into C (server/decoder.c), on the panel kernel.

Why: with the panel kernel a decode step's matmuls take about the time of reading the weights once, and what was
left was everything between them: per layer ~25 small torch operators and 7 LoRA layers called from Python, and an
SDPA under a padding mask that took 16 ms of a 16-row step's 107 on the embedded base (float32, one thread). Here
the layers' norms, projections (with each row's LoRA pair), rotary embedding, cache write, attention and MLP run in C
on buffers made once per step; Python embeds the tokens, computes the rotary angles and runs the final norm and the
LM head.

It computes what the eager lean step (server/decode.py) computes, in another summation order (logits within ~1e-5
on the tests' models: tests/test_fused.py), and each row in a fixed order whatever its batch mates. It applies to
float32 weights packed in panels, SiLU MLPs and rows without DoRA; elsewhere the lean step runs as before.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from transformers import PreTrainedModel

from . import panels
from .lora import LoraContext, MultiLoraLinear

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class _Projection(ctypes.Structure):
    _fields_ = [("panels", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("lora_A", ctypes.c_void_p),
                ("lora_Bt", ctypes.c_void_p), ("rank", ctypes.c_long), ("in_", ctypes.c_long),
                ("out", ctypes.c_long)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                *[(name, _Projection) for name in PROJECTIONS],
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_long), ("heads", ctypes.c_long), ("kv_heads", ctypes.c_long),
                ("head_dim", ctypes.c_long), ("intermediate", ctypes.c_long), ("capacity", ctypes.c_long),
                ("eps", ctypes.c_float), ("scaling", ctypes.c_float)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = panels.kernel()
    if library is None:
        return None
    library.decoder_scratch.restype = ctypes.c_long
    library.decoder_scratch.argtypes = [ctypes.POINTER(_Shape), ctypes.c_long, ctypes.c_long, ctypes.c_int]
    library.decoder_step.restype = None
    library.decoder_step.argtypes = [
        ctypes.POINTER(_Shape), ctypes.POINTER(_Layer), ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
        ctypes.c_int]
    return library


class FusedLayers:
    """The decoder layers' step in C; built by `for_model` where it applies."""

    def __init__(self, model: PreTrainedModel, context: LoraContext, layers: list[dict[str, MultiLoraLinear]]):
        config = model.config
        attention = model.model.layers[0].self_attn
        self.context = context
        self.norms = [(layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
                      for layer in model.model.layers]
        self.projections = layers
        self.all = [projection for layer in layers for projection in layer.values()]
        self.slot_count = self.all[0].n_slots
        self._table = (_Layer * len(layers))()  # the weights' part kept while no projection's version changes
        self._versions: tuple[int, ...] = ()
        self.shape = _Shape(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                            attention.head_dim, config.intermediate_size, 0,
                            model.model.layers[0].input_layernorm.variance_epsilon, attention.scaling)

    @staticmethod
    def for_model(model: PreTrainedModel, context: LoraContext) -> FusedLayers | None:
        """For a model the lean step serves (server/decode.py) whose weights are float32 in panels, with SiLU MLPs
        and RMS norms; else None."""
        if _library() is None or getattr(model.config, "hidden_act", None) != "silu":
            return None
        layers = []
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            modules = dict(zip(PROJECTIONS, (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                                             mlp.gate_proj, mlp.up_proj, mlp.down_proj)))
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if (not all(isinstance(m, MultiLoraLinear) and m.panel_weight is not None for m in modules.values())
                    or not all(getattr(n, "weight", None) is not None and n.weight.dtype == torch.float32
                               and hasattr(n, "variance_epsilon") for n in norms)):
                return None
            layers.append(modules)
        return FusedLayers(model, context, layers)

    def applies(self) -> bool:
        """Not for rows of DoRA slots (their step is the eager one)."""
        active = self.context.active
        return not any(layer.has_dora(active) for layer in self.all)

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, kv: list,
             width: int) -> None:
        """hidden [rows, hidden] float32 (updated in place), cos and sin [rows, head_dim], mask [rows, width + 1]
        int64, kv per layer (keys, values) [rows, kv_heads, capacity, head_dim] with room at column `width`."""
        rows = hidden.shape[0]
        shape = self.shape
        capacity = kv[0][0].shape[2]
        expected = (rows, shape.kv_heads, capacity, shape.head_dim)
        slots = self.context.row_slots
        slots = (torch.full((rows,), self.context.uniform_slot, dtype=torch.long) if slots is None
                 else slots.contiguous())
        # the C code reads and writes raw memory: every size it relies on is checked here
        if (hidden.dtype != torch.float32 or not hidden.is_contiguous() or hidden.shape[1] != shape.hidden
                or cos.shape != (rows, shape.head_dim) or sin.shape != cos.shape or not cos.is_contiguous()
                or not sin.is_contiguous() or cos.dtype != torch.float32 or sin.dtype != torch.float32
                or mask.shape != (rows, width + 1) or mask.dtype != torch.long or not mask.is_contiguous()
                or capacity <= width or len(kv) != len(self.projections) or slots.shape != (rows,)
                or int(slots.min()) < 0 or int(slots.max()) >= self.slot_count
                or any(t.shape != expected or t.dtype != torch.float32 or not t.is_contiguous()
                       for pair in kv for t in pair)):
            raise ValueError(f"fused decode step: hidden {tuple(hidden.shape)} {hidden.dtype}, mask "
                             f"{tuple(mask.shape)}, cache {tuple(kv[0][0].shape)} at width {width}")
        shape.capacity = capacity
        table = self._table
        if (versions := tuple(layer.version for layer in self.all)) != self._versions:
            for entry, modules, (input_norm, post_norm) in zip(table, self.projections, self.norms):
                entry.input_norm, entry.post_norm = input_norm.data_ptr(), post_norm.data_ptr()
                for name, module in modules.items():
                    _describe(getattr(entry, name), module)
            self._versions = versions
        for entry, (keys, values) in zip(table, kv):
            entry.keys, entry.values = keys.data_ptr(), values.data_ptr()
        library = _library()
        threads = torch.get_num_threads()
        scratch = torch.empty(library.decoder_scratch(ctypes.byref(shape), rows, width + 1, threads))
        library.decoder_step(ctypes.byref(shape), table, len(kv), rows, hidden.data_ptr(), cos.data_ptr(),
                             sin.data_ptr(), slots.data_ptr(), mask.data_ptr(), width, scratch.data_ptr(), threads)


def _describe(entry: _Projection, layer: MultiLoraLinear) -> None:
    """A projection's weights for the C step: its panels, bias and LoRA stacks (None where no adapter has a pair)."""
    weight = layer.panel_weight
    bias = layer.base.bias
    if (weight is None or not weight.is_contiguous() or weight.shape[1] != layer.in_features
            or weight.shape[0] * weight.shape[2] < layer.out_features
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))):
        raise ValueError("fused decode step: a projection without float32 panels of its size")
    entry.panels = weight.data_ptr()
    entry.bias = None if bias is None else bias.data_ptr()
    entry.in_, entry.out = layer.in_features, layer.out_features
    if (stacks := layer.stacks()) is not None:
        A, Bt = stacks
        if not A.is_contiguous() or not Bt.is_contiguous():
            raise ValueError("fused decode step: LoRA stacks not contiguous")
        entry.lora_A, entry.lora_Bt, entry.rank = A.data_ptr(), Bt.data_ptr(), A.shape[1]
    else:
        entry.lora_A = entry.lora_Bt = None
        entry.rank = 0
