"""Plain values shared by HTTP, registry and engine. No torch here: routes and the registry import only this."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Task = Literal["generation", "classification"]


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


Result = ClassificationResult | GenerationResult
