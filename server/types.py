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

    def involves(self, name: str) -> bool:
        """Whether deleting or replacing the adapter `name` retires this slot key."""
        return name == self.name


Combination = Literal["linear", "cat", "ties", "dare_linear", "dare_ties"]
COMBINATIONS: tuple[Combination, ...] = ("linear", "cat", "ties", "dare_linear", "dare_ties")
PRUNING = ("ties", "dare_linear", "dare_ties")  # the combinations that keep a `density` share of each tensor
MIXTURE_PREFIX = "mix:"  # mixture names start with it; adapter names cannot hold ':' (registry.NAME_PATTERN)


@dataclass(frozen=True)
class MixturePart:
    location: AdapterLocation
    weight: float


@dataclass(frozen=True)
class MixtureKey:
    """A per-request mixture of adapter versions, combined as PEFT's add_weighted_adapter combines them; the key of
    its slot as an AdapterLocation is an adapter's (names@versions, weights, combination, density and seed: a
    mixture is built once per distinct key and evicted like an adapter)."""

    parts: tuple[MixturePart, ...]
    combination: Combination
    density: float | None = None  # ties and dare_*: the share of each tensor kept
    seed: int | None = None  # dare_*: the seed of the random pruning

    version = 0  # a mixture has no versions of its own: its parts' versions are in its key

    @property
    def name(self) -> str:
        """Readable and unique per key, e.g. 'mix:linear(a@1*0.7+b@2*0.3)'."""
        parts = "+".join(f"{p.location.name}@{p.location.version}*{p.weight!r}" for p in self.parts)
        extra = "".join(f",{k}={v!r}" for k, v in (("density", self.density), ("seed", self.seed)) if v is not None)
        return f"{MIXTURE_PREFIX}{self.combination}({parts}{extra})"

    def involves(self, name: str) -> bool:
        return any(part.location.name == name for part in self.parts)

    def describe(self) -> dict:
        return {"name": self.name, "combination": self.combination, "density": self.density, "seed": self.seed,
                "adapters": [{"name": p.location.name, "version": p.location.version, "weight": p.weight}
                             for p in self.parts]}


SlotKey = AdapterLocation | MixtureKey  # what a slot holds: one adapter version or one mixture


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
