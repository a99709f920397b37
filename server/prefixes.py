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


@dataclass
class PackedRows:
    """The layout of one prefill forward over prompts packed in rows (server/scheduler.py: pack): each row holds a
    prompt, then the own last tokens of the prompts that share most of its tokens, at their own positions,
    left-padded to one width."""

    ids: torch.Tensor  # [rows, width]
    positions: torch.Tensor  # [rows, width] each token's position in its own prompt
    allowed: torch.Tensor  # [rows, 1, width, width] bool: the keys each query attends to (its own prompt's, causal)
    spans: list[tuple[int, torch.Tensor]]  # per prompt (groups flattened): its packed row and its columns there
    shared: list[int]  # per prompt: the first tokens it shares with its row's first prompt (that one: 0)
    leaders: list[int]  # per prompt: the index of its row's first prompt

    @classmethod
    def of(cls, groups: list[list[Piece]], pad_id: int) -> PackedRows:
        shared: list[int] = []
        leaders: list[int] = []
        layouts = []  # per packed row: its tokens, their positions, and each prompt's columns
        for group in groups:
            first = Prompt.of(group[0])
            tokens, positions, columns = list(first.ids), list(range(len(first.ids))), [list(range(len(first.ids)))]
            leader = len(shared)
            shared.append(0)
            leaders.append(leader)
            for piece in group[1:]:
                common = Prompt.of(piece).shared_with(first)
                columns.append(list(range(common)) + list(range(len(tokens), len(tokens) + len(piece.ids) - common)))
                tokens += piece.ids[common:]
                positions += range(common, len(piece.ids))
                shared.append(common)
                leaders.append(leader)
            layouts.append((tokens, positions, columns))
        width = max(len(tokens) for tokens, _, _ in layouts)
        ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(groups), width), dtype=torch.long)
        allowed = torch.zeros((len(groups), 1, width, width), dtype=torch.bool)
        spans: list[tuple[int, torch.Tensor]] = []
        for r, (tokens, row_positions, columns) in enumerate(layouts):
            pad = width - len(tokens)  # left padding, which attends to itself only (never read)
            ids[r, pad:], positions[r, pad:] = torch.tensor(tokens), torch.tensor(row_positions)
            allowed[r, 0, torch.arange(pad), torch.arange(pad)] = True
            for own in columns:
                index = torch.tensor(own) + pad
                allowed[r, 0, index[:, None], index[None, :]] |= torch.ones(len(own), len(own), dtype=torch.bool).tril()
                spans.append((r, index))
        return cls(ids, positions, allowed, spans, shared, leaders)
