"""The decode batch (its rows, KV cache, mask and positions), its storage and its lean forward step.

`grow_kv` keeps the decode batch's KV cache in buffers with room for more columns, so a step writes its keys and
values in place (one column) instead of concatenating the whole cache (transformers' DynamicCache copies every
layer's cache every step). `InPlaceLayer` is that write as a transformers cache layer, for architectures the lean
step does not cover.

`LeanDecoder` is one decode step (one new token per row) of a Llama-like decoder (Llama, Mistral, Qwen2) run
straight from the model's own modules: the same operations as transformers' forward with SDPA attention, without its
per-step machinery (the 4-D mask builder, the cache object, output records, kwargs plumbing through 30 layers): 8 %
less CPU per single-stream step. Where it applies, the layers run as one call into C instead (server/fused.py);
elsewhere one row or two take the compiled `RowStep` (server/row_step.py) where it serves them. The eager step calls
the LoRA layers as they are, so adapters, mixed rows and merges behave exactly as in the full forward
(tests/test_decode.py, tests/test_exactness.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .fused import FusedLayers
from .jobs import GenerateJob
from .row_step import COMPILE_ERRORS, RowStep

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, kv_heads, capacity, head_dim]
GROW_COLUMNS = 64  # a full buffer grows by this many columns: one copy per 64 steps instead of one per step
LEAN_TYPES = ("llama", "mistral", "qwen2")


def grow_kv(kv: KV, width: int, needed: int) -> KV:
    """The cache with room for `needed` columns; its first `width` columns (the valid ones) kept. Buffers with room
    are returned as they are; a full one is copied into a larger one (the old tensors are left unchanged)."""
    if kv[0][0].shape[2] >= needed:
        return kv
    grown = []
    for keys, values in kv:
        pair = []
        for part in (keys, values):
            bigger = part.new_empty(part.shape[0], part.shape[1], needed + GROW_COLUMNS, part.shape[3])
            bigger[:, :, :width] = part[:, :, :width]
            pair.append(bigger)
        grown.append((pair[0], pair[1]))
    return grown


@dataclass
class Row:
    job: GenerateJob
    index: int  # which of the job's prompts
    prompt_tokens: int
    generator: torch.Generator | None  # seeded rows sample from their own stream, whatever their batch mates
    ids: list[int] = field(default_factory=list)  # generated so far (EOS excluded)

    @property
    def gone(self) -> bool:
        """The request was cancelled or has failed (another of its rows did): this row's work is wasted."""
        return self.job.future.done()

    @property
    def finished(self) -> bool:
        return self.job.results[self.index] is not None or self.gone


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim)


@dataclass
class DecodeBatch:
    """Rows being generated, left-padded to one width. The KV buffers have room beyond the valid width (the mask's):
    a step writes its column there in place and only then widens the mask, so a step that fails leaves the batch as
    it was."""

    rows: list[Row]
    kv: KV
    mask: torch.Tensor  # [rows, width] 1 = a real token
    positions: torch.Tensor  # [rows] position id of each row's next input token
    last: torch.Tensor  # [rows] each row's latest token: the next step's input

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: Sequence[int]) -> DecodeBatch:
        """Only these rows, with the columns that became padding for all of them cut away."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax())  # first column some row still attends to
        width = self.mask.shape[1]
        kv = [(k[index, :, start:width], v[index, :, start:width]) for k, v in self.kv]
        return DecodeBatch([self.rows[i] for i in keep], kv, mask[:, start:], self.positions[index], self.last[index])

    @staticmethod
    def join(batches: Sequence[DecodeBatch]) -> DecodeBatch:
        width = max(b.mask.shape[1] for b in batches)
        kv = [
            tuple(torch.cat([_left_pad(b.kv[layer][part][:, :, : b.mask.shape[1]], width, 2) for b in batches])
                  for part in (0, 1))
            for layer in range(len(batches[0].kv))
        ]
        return DecodeBatch(
            [row for b in batches for row in b.rows],
            kv,
            torch.cat([_left_pad(b.mask, width, 1) for b in batches]),
            torch.cat([b.positions for b in batches]),
            torch.cat([b.last for b in batches]),
        )


class InPlaceLayer(DynamicLayer):
    """A DynamicCache layer over a buffer with room: update() writes the new columns at `width` and returns views
    of the valid columns (no concatenation)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.buffers = (keys, values)
        self.width = width
        self.keys, self.values = keys[:, :, :width], values[:, :, :width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.width + key_states.shape[2]
        keys, values = self.buffers
        keys[:, :, self.width : end] = key_states
        values[:, :, self.width : end] = value_states
        self.width = end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


class LeanDecoder:
    """One decode step of a Llama-like decoder from its modules (see the module docstring)."""

    def __init__(self, model: PreTrainedModel):
        body = model.model
        config = model.config
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.norm = body.norm
        self.head = model.get_output_embeddings()
        self.layers = list(body.layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = self.layers[0].self_attn.scaling
        self.row_step: RowStep | None = None  # one or two rows' step, compiled (server/row_step.py), once warmed up
        self.fused: FusedLayers | None = None  # the layers' step in C (server/fused.py), where it applies

    @staticmethod
    def for_model(model: PreTrainedModel) -> LeanDecoder | None:
        """The lean step for a model it computes exactly as transformers does, else None (the full forward)."""
        config = model.config
        sliding = getattr(config, "sliding_window", None) is not None and (
            config.model_type != "qwen2" or getattr(config, "use_sliding_window", False))
        if (config.model_type not in LEAN_TYPES or sliding or config._attn_implementation != "sdpa"
                or getattr(config, "rope_parameters", {}).get("rope_type", "default") != "default"):
            return None
        return LeanDecoder(model)

    @torch.no_grad()
    def step(self, last: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: KV, width: int
             ) -> torch.Tensor:
        """last [rows] each row's latest token, positions [rows] its position id, mask [rows, width + 1] (1 = a
        real token, the new column included), kv buffers with room for width + 1 columns (this step's keys and
        values are written at column `width`) -> logits [rows, vocab]."""
        rows = last.shape[0]
        if self.fused is not None and self.fused.applies():
            hidden = self.embed(last)  # [rows, hidden]
            cos, sin = self.rotary(hidden, positions[:, None])  # [rows, 1, head_dim]
            self.fused.step(hidden, cos[:, 0].contiguous(), sin[:, 0].contiguous(), mask, kv, width)
            return self.head(self.norm(hidden))  # [rows, vocab]
        if self.row_step is not None and self.row_step.applies(rows) and (rows > 1 or bool(mask.all())):
            try:
                return self.row_step.step(last, positions, mask, kv, width)
            except COMPILE_ERRORS as exc:  # a variant that cannot compile here: decode eagerly from now on
                log.warning("the compiled decode step failed, decoding eagerly: %r", exc)
                self.row_step = None  # the step rewrites the column it may have written: nothing else changed
        hidden = self.embed(last[:, None])  # [rows, 1, hidden]
        cos, sin = self.rotary(hidden, positions[:, None])  # [rows, 1, head_dim]
        cos, sin = cos[:, None], sin[:, None]  # [rows, 1, 1, head_dim]: broadcast over heads
        # transformers' SDPA mask for one query: None when no row has padding, else [rows, 1, 1, width + 1] bool
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        groups = self.heads // self.kv_heads
        end = width + 1
        for layer, (keys, values) in zip(self.layers, kv):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(rows, 1, -1, self.head_dim).transpose(1, 2)  # [rows, heads, 1, head_dim]
            k = attn.k_proj(x).view(rows, 1, -1, self.head_dim).transpose(1, 2)  # [rows, kv_heads, 1, head_dim]
            v = attn.v_proj(x).view(rows, 1, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            keys[:, :, width] = (k * cos + _rotate_half(k) * sin)[:, :, 0]
            values[:, :, width] = v[:, :, 0]
            k_all, v_all = keys[:, :, :end], values[:, :, :end]
            if attend is None:
                out = nn.functional.scaled_dot_product_attention(q, k_all, v_all, scale=self.scaling,
                                                                 enable_gqa=groups > 1)
            else:  # one query: the query heads of a KV head attend as a group (transformers' pack_gqa)
                packed = q.reshape(rows, self.kv_heads, groups, self.head_dim)
                out = nn.functional.scaled_dot_product_attention(packed, k_all, v_all, attn_mask=attend,
                                                                 scale=self.scaling)
            out = out.reshape(rows, -1, 1, self.head_dim).transpose(1, 2).reshape(rows, 1, -1)
            hidden = residual + attn.o_proj(out)
            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            hidden = residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.head(self.norm(hidden))[:, -1]  # [rows, vocab]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
