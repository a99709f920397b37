"""The decode step of one row or of two rows (of one adapter or of two) of a Llama-like decoder, compiled by
inductor, with its matrix-vector products written as reductions. It serves where the step in C (server/fused.py)
does not: bfloat16 weights, or no panel kernel; on float32 panels the C step is faster (26.9 against 30.7 ms of CPU
for one row, 26.5 against 36.6 for two, the embedded base, one thread).

Why: one row's step multiplies a vector by every weight of the model, so its speed is how fast the weights stream
from memory. torch's `F.linear` (MKL's sgemv/sgemm, oneDNN) streams them at less than half the machine's bandwidth
for a single row; `(weight * x).sum(-1)` compiled by inductor is one vectorized loop over the weight, close to it.
Two rows are two such reductions, which inductor fuses into one loop reading each weight once: about the time of one
row. On the embedded base (float32, one thread, AVX-512 EPYC), against the eager step on the panel kernel
(server/panels.py), which reads the weights once too but runs the layer's other operators one by one: 36.5 against
50.6 ms of CPU for one row, 37.8 against 43.3 for two, 41.8 against 49.1 for two rows of different slots
(benchmarks/profile_decode.py; benchmarks/linear_floor.py has the kernels alone). From three rows on the eager step
wins (`MAX_ROWS`). Only the summation order differs from the eager step (logits within ~5e-5 on the embedded base,
greedy tokens equal: tests/test_row_step.py).

One graph is a whole decoder layer, and it takes the layer's weights as inputs, so the same compiled graph serves
every layer: norm, q/k/v, rotary, the new keys and values written into the cache (the last column of the cache's
view it is given: the column index is not a number the graph could specialize on), attention over the view (whose
width is dynamic; two rows attend under their padding mask), o, norm, MLP; a second graph is the LM head. A call of
a compiled graph costs tens of microseconds, so one per layer instead of two and an eager attention took the step
from 30 to 27 ms (the Python left is a loop over 30 layers, with each layer's arguments made once per adapter). An
adapter's rows pass a LoRA pair for every projection: the layer's zero-padded stacks (padding and zero pairs add
exactly 0), so one graph with a dynamic rank serves every adapter; base rows and merged adapters pass none. Two rows
of different slots (two adapters, or an adapter and the base) pass a pair per row, the ones the eager step gathers
for mixed batches (the base's is zeros): 36.7 against 68.7 ms per step eager on the embedded base.
`warm_up` compiles every variant at start, so no request waits for a compile (one that does, e.g. for a rank-1
stack, is not counted as a step's cost: see `compiled_graphs`; one that fails, e.g. past dynamo's recompile limit,
leaves the eager step to serve). DoRA slots and a single row with padding take the eager step.

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

MAX_ROWS = 2  # two rows read each weight once in ~the time of one; from three, the eager panel kernel wins
VARIANTS = 64  # graphs a compiled function may have: 1 or 2 rows x base, adapter or mixed rows x static or dynamic

# A [r, in], (B * scale)^T [r, out] for rows of one adapter; [rows, r, in], [rows, r, out] for mixed rows; None: base
Pair = tuple[torch.Tensor, torch.Tensor] | None
Projection = tuple[torch.Tensor, torch.Tensor | None, Pair]  # weight [out, in], bias, LoRA pair


def _matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] -> x @ weight.T [rows, out], as one reduction over the weight's rows per row, which inductor
    fuses into one loop reading the weight once for all of them (in float32, whatever the weight's dtype: a
    bfloat16 weight is widened as it streams)."""
    weight = weight.float()
    return torch.stack([(weight * row).sum(-1) for row in x])


def _project(x: torch.Tensor, projection: Projection) -> torch.Tensor:
    weight, bias, pair = projection
    out = _matvec(weight, x)
    if bias is not None:
        out = out + bias.float()
    if pair is not None:
        A, Bt = pair
        if A.dim() == 3:  # each row its own pair (mixed adapters): A [rows, r, in], Bt [rows, r, out]
            out = out + ((A * x[:, None, :]).sum(-1)[:, :, None] * Bt).sum(1)
        else:  # one pair for every row: _matvec's reductions (the broadcast form above ran slower on one row)
            out = out + (_matvec(A, x)[:, :, None] * Bt).sum(1)
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RowStep:
    """The decode step of one row or of two (see the module docstring), for the batches `applies` accepts."""

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
        # a Python bool, not a comparison in the graph: after engines of other shapes in one process dynamo traces
        # these numbers as symbols, and SDPA takes no symbolic bool
        self.grouped_queries = self.heads != self.kv_heads
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
        self._base = self._layer_arguments(lambda m: None)
        self._adapter: tuple[tuple[int, int], list[tuple[Projection, ...]] | None] = ((-1, -1), None)
        self._mixed: tuple[tuple[int, int], list[tuple[Projection, ...]] | None] = ((-1, -1), None)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, VARIANTS)
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
                     cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     attend: torch.Tensor | None) -> torch.Tensor:
        """hidden [rows, hidden] -> the layer's output [rows, hidden]; keys and values [rows, kv_heads, width + 1,
        d] are the cache's valid columns and this step's, whose keys and values are written here; attend [rows, 1, 1,
        width + 1] (bool) where rows have padding, else None."""
        rows = hidden.shape[0]
        x = _rms_norm(hidden, norm_in, self.eps)
        query = _rotate(_project(x, q).view(rows, self.heads, 1, self.head_dim), cos, sin)
        keys[:, :, -1] = _rotate(_project(x, k).view(rows, self.kv_heads, 1, self.head_dim), cos, sin)[:, :, 0]
        values[:, :, -1] = _project(x, v).view(rows, self.kv_heads, self.head_dim)
        query = query.to(keys.dtype)  # the attention runs in the cache's dtype
        if attend is None:
            attended = nn.functional.scaled_dot_product_attention(
                query, keys, values, scale=self.scaling, enable_gqa=self.grouped_queries)
        else:  # the query heads of a KV head attend as a group, as the eager step does (transformers' pack_gqa)
            grouped = query.reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            attended = nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=attend,
                                                                  scale=self.scaling)
        hidden = hidden + _project(attended.reshape(rows, -1).float(), o)
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
            dora = self._any_dora({slot})
            self._adapter = (key, None if dora else self._layer_arguments(lambda m: m.padded_pair(slot)))
        return self._adapter[1]

    def _mixed_arguments(self) -> list[tuple[Projection, ...]] | None:
        """Every layer's projections with the mixed rows' own pairs (gathered once per assignment of slots to rows
        and stack layout); None where a layer holds one of the rows' adapters as DoRA."""
        context = self.context
        key = (context.batch, context.layout)
        if self._mixed[0] != key:
            dora = self._any_dora(context.active)
            self._mixed = (key, None if dora else self._layer_arguments(lambda m: m.rows_pairs()))
        return self._mixed[1]

    def _any_dora(self, slots: set[int] | frozenset[int]) -> bool:
        """Whether a layer holds one of these slots as DoRA (those rows take the eager step)."""
        return any(m.is_dora(slot) for layer in self.projections for m in layer for slot in slots)

    def _layer_arguments(self, pair: Callable[[MultiLoraLinear], Pair]) -> list[tuple[Projection, ...]]:
        """Every layer's projections as the layer graph takes them: weight, bias and `pair(layer)`."""
        return [tuple((m.base.weight.detach(), m.base.bias, pair(m)) for m in layer) for layer in self.projections]

    def applies(self, rows: int) -> bool:
        """Whether the running batch can take this path: one row or two, of slots no layer holds as DoRA. (Three
        rows or more: the eager step over the weights' panels is faster.)"""
        return rows <= MAX_ROWS and self._arguments() is not None

    def _arguments(self) -> list[tuple[Projection, ...]] | None:
        """The layer graphs' arguments for the running batch's rows (see `applies`)."""
        context = self.context
        if context.row_slots is not None:
            return self._mixed_arguments()
        slot = context.uniform_slot  # a merged adapter's rows are base rows here
        return self._base if slot == BASE_SLOT else self._adapter_arguments(slot)

    @torch.no_grad()
    def step(self, last: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             kv: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
        """last [rows], positions [rows], mask [rows, width + 1] (1 = a real token, the new column included), kv
        buffers with room for width + 1 columns (this step's column is written at `width`) -> logits [rows, vocab].
        One row has no padding; two rows always pass their mask (one graph for both cases)."""
        arguments = self._arguments()
        hidden = self.embed(last).float()  # [rows, hidden]
        cos, sin = self.rotary(hidden[:, None], positions[:, None])  # [rows, 1, d]
        cos, sin = cos[:, None], sin[:, None]  # [rows, 1, 1, d]
        attend = None if last.shape[0] == 1 else mask.bool()[:, None, None, :]
        end = width + 1
        for (keys, values), (norm_in, norm_out), projections in zip(kv, self.norms, arguments):
            hidden = self._layer(hidden, norm_in, norm_out, *projections, cos, sin, keys[:, :, :end],
                                 values[:, :, :end], attend)
        return self._logits(hidden, self.norm_weight, self.head.weight.detach())

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile every variant the steps will call, on the first layer's weights: base rows, and adapter rows with
        pairs of two ranks (the second makes the rank dynamic), each at two cache widths and capacities (which makes
        those dynamic), for one row and for two, and two rows of mixed adapters; and the LM head for one row and for
        two."""
        norm_in, norm_out = self.norms[0]
        dtype = self.layers[0].self_attn.o_proj.weight.dtype
        for rows in range(1, MAX_ROWS + 1):
            hidden = self.embed.weight[:rows].detach().float()
            cos, sin = hidden.new_ones(rows, 1, 1, self.head_dim), hidden.new_zeros(rows, 1, 1, self.head_dim)
            # base rows (no pair); rows of one adapter (a pair [r, ...]); two rows of mixed slots (a pair per row)
            leading = [(), (rows,)] if rows > 1 else [()]
            variants = [(None, None)] + [(lead, rank) for lead in leading for rank in (ZERO_RANK, ZERO_RANK + 1)]
            for lead, rank in variants:
                projections = [
                    (m.base.weight.detach(), m.base.bias, None if rank is None else
                     (hidden.new_zeros(*lead, rank, m.in_features), hidden.new_zeros(*lead, rank, m.out_features)))
                    for m in self.projections[0]]
                for end, capacity in ((2, 4), (3, 8)):
                    keys, values = (torch.zeros(rows, self.kv_heads, capacity, self.head_dim, dtype=dtype)
                                    for _ in "kv")
                    attend = None if rows == 1 else torch.ones(rows, 1, 1, end, dtype=torch.bool)
                    self._layer(hidden, norm_in, norm_out, *projections, cos, sin, keys[:, :, :end],
                                values[:, :, :end], attend)
            self._logits(hidden, self.norm_weight, self.head.weight.detach())


# what a compiled step raises where it cannot compile (inductor's InductorError is a TorchDynamoException)
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


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
