"""Prompts just scored, kept so that a new prompt that begins with one of them runs only its own last tokens.

lm-evaluation-harness scores a multiple-choice question as one prompt per choice, with echo and logprobs: the
question's context, then the choice. Those prompts differ only in their last tokens, and lm-eval sends them side by
side (it sorts its requests by length, then by tokens). Its own `hf` model computes such a context once; without
this, the engine ran every choice's whole prompt again (3 choices: 3 times the work). Within one prefill forward
such prompts ride in one row (server/scheduler.py: pack; the runner's _prefill_packed). Across turns (lm-eval's
batches of 8 split a question's choices over two requests), a scored prompt that begins with one scored just before
(the same adapter slot and top-n, most of its tokens in common) takes that prompt's KV cache, last hidden states and
prompt logprobs for the tokens they share from this store (causal attention: those positions see the same tokens):
its forward runs over the rest of its tokens only.

Only prompts scored with echo share: tokens run through a cache differ from one whole forward in the last bits
(~1e-6), which a score takes in its stride, while the same generation request twice answers bit for bit the same.
The store holds the scored prompts of the latest prefill forward that had any (at most one forward's tokens,
`max_batch_tokens`), as copies: the decode batch's buffers change under the rows that join it. A slot's prompts
leave when the slot is cleared, so that a slot index never lends one adapter's cache to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheduler import Piece, Prompt
from .types import TokenLogprob


@dataclass
class Prefilled:
    """One scored prompt as the prefill left it."""

    prompt: Prompt
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [kv_heads, tokens, head_dim]
    hidden: torch.Tensor  # [tokens, hidden]: the body's last hidden state at each position
    prompt_logprobs: list[TokenLogprob]  # its echo (index t: token t)

    @classmethod
    def of_row(cls, piece: Piece, index: int, kv: list[tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor,
               prompt_logprobs: list[TokenLogprob]) -> Prefilled:
        """Row `index` of a left-padded prefill (`kv` per layer [rows, kv_heads, width, head_dim], `hidden`
        [rows, width, hidden]): its tokens are the last columns."""
        n = len(piece.ids)
        own = [(keys[index, :, -n:].clone(), values[index, :, -n:].clone()) for keys, values in kv]
        return cls(Prompt.of(piece), own, hidden[index, -n:].clone(), prompt_logprobs)


@dataclass
class Reuse:
    """A new prompt's first `shared` tokens are those of `source`."""

    source: Prefilled
    shared: int


class PrefixStore:
    """The scored prompts of the latest prefill that had any (worker thread only)."""

    def __init__(self) -> None:
        self.prompts: list[Prefilled] = []

    def replace(self, prompts: list[Prefilled]) -> None:
        self.prompts = prompts

    def forget(self, slot_index: int) -> None:
        """Drop the prompts of an adapter slot being cleared: the index may hold another adapter next."""
        self.prompts = [prefilled for prefilled in self.prompts if prefilled.prompt.slot_index != slot_index]

    def find(self, piece: Piece) -> Reuse | None:
        """The stored prompt this one shares the most tokens with, if any is worth it."""
        prompt = Prompt.of(piece)
        found = [Reuse(source, shared) for source in self.prompts if (shared := prompt.shared_with(source.prompt))]
        return max(found, key=lambda reuse: reuse.shared, default=None)
