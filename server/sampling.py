"""Choosing a row's next token from its logits (temperature, nucleus) and scoring tokens (logprobs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import GenerationParams, TokenLogprob


def sampling_scores(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """[vocab] float32 logits -> the scores a token is drawn from: temperature, then nucleus filtering as
    transformers' TopPLogitsWarper does it (the most probable token always stays)."""
    scores = logits / params.temperature
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort()
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - params.top_p
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return scores


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(sampling_scores(logits, params).softmax(-1), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """[positions, vocab] logits and the token taken at each position -> each token's logprob (float32
    log-softmax of these logits) with the `top` most likely tokens there."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    best = logprobs.topk(top, -1) if top else None
    entries = []
    for i, token in enumerate(tokens):
        alternatives = () if best is None else tuple(zip(best.indices[i].tolist(), best.values[i].tolist()))
        entries.append(TokenLogprob(token, chosen[i], alternatives))
    return entries
