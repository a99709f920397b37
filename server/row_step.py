"""The decode step of a single row of a Llama-like decoder, compiled by inductor, with its matrix-vector products
written as reductions.

Why: one row's step multiplies a vector by every weight of the model, so its speed is how fast the weights stream
from memory. torch's `F.linear` (MKL's sgemv/sgemm, oneDNN) streams them at less than half the machine's bandwidth
for a single row; `(weight * x).sum(-1)` compiled by inductor is one vectorized loop over the weight, close to it: on
the embedded base (float32, one thread, AVX-512 EPYC) a step took 31.5 against 63.9 ms of CPU eager
(benchmarks/profile_decode.py; benchmarks/linear_floor.py has the kernels alone). Only the summation order differs
from the eager step (logits within ~5e-5 on the embedded base, greedy tokens equal: tests/test_row_step.py).

One graph is a whole decoder layer, and it takes the layer's weights as inputs, so the same compiled graph serves
every layer: norm, q/k/v, rotary, the new key and value written into the cache (the last column of the cache's view
it is given: the column index is not a number the graph could specialize on), attention over the view (whose width
is dynamic), o, norm, MLP; a second graph is the LM head. A call of a compiled graph costs tens of microseconds, so
one per layer instead of two and an eager attention took the step from 30 to 27 ms (the Python left is a loop over
30 layers, with each layer's arguments made once per adapter). An adapter's row passes a LoRA pair for every
projection: the layer's zero-padded stacks (padding and zero pairs add exactly 0), so one graph with a dynamic rank
serves every adapter; base rows and merged adapters pass none. `warm_up` compiles every variant at start, so no
request waits for a compile (one that does, e.g. for a rank-1 stack, is not counted as a step's cost: see
`compiled_graphs`). DoRA slots and padded rows take the eager step.

Arithmetic is float32 whatever the model's dtype: with bfloat16 weights (`dtype=bfloat16`) the step reads half the
bytes and accumulates in float32 (the attention over the cache runs in the cache's dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .lora import ZERO_RANK, LoraContext, MultiLoraLinear
from .slots import BASE_SLOT

log = logging.getLogger(__name__)

Pair = tuple[torch.Tensor, torch.Tensor] | None  # A [r, in], (B * scale)^T [r, out]; None: a base row
Projection = tuple[torch.Tensor, torch.Tensor | None, Pair]  # weight [out, in], bias, LoRA pair


def _matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [1, in] -> x @ weight.T [1, out], as a reduction over the weight's rows (in float32, whatever the weight's
    dtype: a bfloat16 weight is widened as it streams)."""
    return (weight.float() * x).sum(-1)[None]


def _project(x: torch.Tensor, projection: Projection) -> torch.Tensor:
    weight, bias, pair = projection
    out = _matvec(weight, x)
    if bias is not None:
        out = out + bias.float()
    if pair is not None:
        A, Bt = pair
        out = out + (_matvec(A, x)[0, :, None] * Bt).sum(0)[None]
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RowStep:
    """One row's decode step (see the module docstring), for the rows `applies` accepts."""

    def __init__(self, model: nn.Module, context: LoraContext):
        config = model.config
        self.context = context
        body = model.model
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.layers = list(body.layers)
        self.norm_weight = body.norm.weight.detach()
        self.head = model.get_output_embeddings()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = self.layers[0].self_attn.scaling
        self.eps = float(self.layers[0].input_layernorm.variance_epsilon)
        self.projections: list[tuple[MultiLoraLinear, ...]] = [
            (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.o_proj,
             l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj)
            for l in self.layers
        ]
        self.norms = [(l.input_layernorm.weight.detach(), l.post_attention_layernorm.weight.detach())
                      for l in self.layers]
        # a merge writes into the base weights in place, so these views stay the weights the layers use
        self._base = [tuple((m.base.weight.detach(), m.base.bias, None) for m in layer) for layer in self.projections]
        self._adapter: tuple[tuple[int, int], list[tuple[Projection, ...]] | None] = ((-1, -1), None)
        self._layer = torch.compile(self._layer_eager, fullgraph=True)
        self._logits = torch.compile(self._logits_eager, fullgraph=True)

    @staticmethod
    def for_model(model: nn.Module, context: LoraContext) -> RowStep | None:
        """The compiled step where it computes what the lean step does: every projection wrapped, SiLU MLP."""
        config = model.config
        layers = model.model.layers
        wrapped = all(isinstance(m, MultiLoraLinear) for l in layers
                      for m in (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.o_proj,
                                l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj))
        if not wrapped or config.hidden_act != "silu" or model.get_output_embeddings().bias is not None:
            return None
        return RowStep(model, context)

    # ---- the compiled pieces (weights are inputs: one graph for every layer) -----------------------------------

    def _layer_eager(self, hidden: torch.Tensor, norm_in: torch.Tensor, norm_out: torch.Tensor, q: Projection,
                     k: Projection, v: Projection, o: Projection, gate: Projection, up: Projection, down: Projection,
                     cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """hidden [1, hidden] -> the layer's output [1, hidden]; keys and values [1, kv_heads, width + 1, d] are the
        cache's valid columns and this step's, whose key and value are written here."""
        x = _rms_norm(hidden, norm_in, self.eps)
        query = _rotate(_project(x, q).view(1, self.heads, 1, self.head_dim), cos, sin)
        keys[:, :, -1] = _rotate(_project(x, k).view(1, self.kv_heads, self.head_dim), cos[0], sin[0])
        values[:, :, -1] = _project(x, v).view(1, self.kv_heads, self.head_dim)
        attended = nn.functional.scaled_dot_product_attention(  # in the cache's dtype
            query.to(keys.dtype), keys, values, scale=self.scaling, enable_gqa=self.heads != self.kv_heads)
        hidden = hidden + _project(attended.view(1, -1).float(), o)
        x = _rms_norm(hidden, norm_out, self.eps)
        return hidden + _project(nn.functional.silu(_project(x, gate)) * _project(x, up), down)

    def _logits_eager(self, hidden: torch.Tensor, norm: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        return _matvec(head, _rms_norm(hidden, norm, self.eps))

    # ---- the step ---------------------------------------------------------------------------------------------

    def _adapter_arguments(self, slot: int) -> list[tuple[Projection, ...]] | None:
        """Every layer's projections with the slot's padded pairs, made once per slot and stack layout (views of
        the stacks: an adapter installed into them in place shows through); None where a layer holds it as DoRA."""
        key = (slot, self.context.layout)
        if self._adapter[0] != key:
            dora = any(m.is_dora(slot) for layer in self.projections for m in layer)
            self._adapter = (key, None if dora else [
                tuple((m.base.weight.detach(), m.base.bias, m.padded_pair(slot)) for m in layer)
                for layer in self.projections])
        return self._adapter[1]

    def applies(self) -> bool:
        """Whether the running row's slot can take this path: no layer holds it as DoRA."""
        slot = self.context.uniform_slot
        return self.context.row_slots is None and (slot == BASE_SLOT or self._adapter_arguments(slot) is not None)

    @torch.no_grad()
    def step(self, last: torch.Tensor, positions: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
             width: int) -> torch.Tensor:
        """last [1], positions [1], kv buffers with room for width + 1 columns (this step's column is written at
        `width`; no padding) -> logits [1, vocab]."""
        slot = self.context.uniform_slot  # a merged adapter's rows are base rows here
        arguments = self._base if slot == BASE_SLOT else self._adapter_arguments(slot)
        hidden = self.embed(last).float()  # [1, hidden]
        cos, sin = self.rotary(hidden[:, None], positions[:, None])  # [1, 1, d]
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, 1, d]
        end = width + 1
        for (keys, values), (norm_in, norm_out), projections in zip(kv, self.norms, arguments):
            hidden = self._layer(hidden, norm_in, norm_out, *projections, cos, sin, keys[:, :, :end],
                                 values[:, :, :end])
        return self._logits(hidden, self.norm_weight, self.head.weight.detach())

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile every variant the steps will call, on the first layer's weights: base rows, and adapter rows with
        pairs of two ranks (the second makes the rank dynamic), each at two cache widths and capacities (which makes
        those dynamic). The LM head compiles with the first step."""
        hidden = self.embed.weight[:1].detach().float()
        cos, sin = hidden.new_ones(1, 1, 1, self.head_dim), hidden.new_zeros(1, 1, 1, self.head_dim)
        norm_in, norm_out = self.norms[0]
        dtype = self.layers[0].self_attn.o_proj.weight.dtype
        for rank in (None, ZERO_RANK, ZERO_RANK + 1):
            projections = [
                (m.base.weight.detach(), m.base.bias, None if rank is None else
                 (hidden.new_zeros(rank, m.in_features), hidden.new_zeros(rank, m.out_features)))
                for m in self.projections[0]]
            for end, capacity in ((2, 4), (3, 8)):
                keys, values = (torch.zeros(1, self.kv_heads, capacity, self.head_dim, dtype=dtype) for _ in "kv")
                self._layer(hidden, norm_in, norm_out, *projections, cos, sin, keys[:, :, :end], values[:, :, :end])


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process: a step during which it grew compiled."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compiled_or_none(build: Callable[[], RowStep | None], warm_up: Callable[[RowStep], None]) -> RowStep | None:
    """Build the compiled step and compile it once; where inductor cannot compile here (no C++ compiler, an
    unsupported platform) log why and return None: the eager step serves."""
    try:
        row_step = build()
        if row_step is not None:
            warm_up(row_step)
        return row_step
    except Exception as exc:  # noqa: BLE001 - any compile failure means: serve with the eager step
        log.warning("the compiled single-row decode step is unavailable, decoding eagerly: %r", exc)
        return None
