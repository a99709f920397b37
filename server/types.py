"""Plain values shared by HTTP, registry and engine. No torch here: routes and the registry import only this."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Task = Literal["generation", "classification", "embedding"]


@dataclass(frozen=True)
class AdapterLocation:
    """Where the registry keeps one version of an adapter; also the key of its slot (a re-created name never
    meets a stale slot: the folder or digest differs)."""

    name: str
    version: int
    folder: Path
    sha256: str = ""


@dataclass(frozen=True)
class GenerationParams:
    """Per-request sampling settings. Rows with different settings share one decode batch."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # seeded sampling: the same answer whatever the row's batch mates
    stop: tuple[str, ...] = ()
    chat: bool = True
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks; as vLLM's SamplingParams)
    logprobs: int | None = None  # None: none; n: each generated token's logprob and the n most likely at its place
    prompt_logprobs: bool = False  # also the prompt's tokens' logprobs (OpenAI's echo); max_new_tokens may be 0


MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API and vLLM's default


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its log-probability: float32 log-softmax of the logits of the forward that produced it (the
    adapter applied, before temperature and top_p), with the most likely tokens at its place, best first."""

    token_id: int
    logprob: float | None  # None: the prompt's first token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)


@dataclass
class ClassificationResult:
    label: str
    score: float
    scores: dict[str, float]
    prompt_tokens: int = 0


@dataclass
class GenerationResult:
    generated_text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    tokens: int
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    # per token of token_ids, and for the EOS that ended the answer (OpenAI and vLLM score it too), when asked
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token, when asked (params.prompt_logprobs)


@dataclass
class EmbeddingResult:
    embedding: list[float]  # [hidden] float32 values, L2 norm 1
    prompt_tokens: int


Result = ClassificationResult | GenerationResult
