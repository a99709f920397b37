"""Prompts just scored, kept so that a new prompt that begins with one of them runs only its own last tokens.

lm-evaluation-harness scores a multiple-choice question as one prompt per choice, with echo and logprobs: the
question's context, then the choice. Those prompts differ only in their last tokens, and lm-eval sends them side by
side (it sorts its requests by length, then by tokens). Its own `hf` model computes such a context once; without
this, the engine ran every choice's whole prompt again (3 choices: 3 times the work). A scored prompt that begins
with one scored just before (the same adapter slot and top-n, most of its tokens in common) takes that prompt's KV
cache, last hidden states and prompt logprobs for the tokens they share (causal attention: those positions see the
same tokens): its forward runs over the rest of its tokens only.

Only prompts scored with echo share: tokens run through a cache differ from one whole forward in the last bits
(~1e-6), which a score takes in its stride, while the same generation request twice answers bit for bit the same.
The store holds the scored prompts of the latest prefill forward that had any (at most one forward's tokens,
`max_batch_tokens`), as copies: the decode batch's buffers change under the rows that join it. A slot's prompts
leave when the slot is cleared, so that a slot index never lends one adapter's cache to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheduler import Piece
from .types import TokenLogprob


@dataclass(frozen=True)
class Prompt:
    """What decides whether one prompt can take another's first tokens."""

    slot_index: int
    ids: list[int]
    echo_top: int | None  # the top-n of its prompt logprobs; None: not scored (no echo), it never shares

    @classmethod
    def of(cls, piece: Piece) -> Prompt:
        params = piece.job.params
        return cls(piece.job.slot_index, piece.ids, (params.logprobs or 0) if params.prompt_logprobs else None)

    def shared_with(self, source: Prompt) -> int:
        """How many of its first tokens this prompt takes from `source` (0: none): both scored with the same top-n
        (it takes the source's prompt logprobs too), never its last token (it runs, for the logits of the answer's
        first token), and only when more than half of its tokens are shared (worth a forward of its own)."""
        if self.echo_top is None or (source.slot_index, source.echo_top) != (self.slot_index, self.echo_top):
            return 0
        shared = min(common_length(source.ids, self.ids), len(self.ids) - 1)
        return shared if 2 * shared > len(self.ids) else 0


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


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts have in common."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def leaders_and_followers(pieces: list[Piece]) -> tuple[list[Piece], list[Piece]]:
    """Split one prefill's prompts: those that share most of their tokens with an earlier one (followers: they run
    after it, taking its first tokens) and the rest (leaders), each in order."""
    leaders: list[Piece] = []
    followers: list[Piece] = []
    for piece in pieces:
        prompt = Prompt.of(piece)
        follows = any(prompt.shared_with(Prompt.of(leader)) for leader in leaders)
        (followers if follows else leaders).append(piece)
    return leaders, followers


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
