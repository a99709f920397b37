"""HTTP request/response models (pydantic lives only at the edges)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .types import Combination

MAX_MIXTURE_PARTS = 8
MAX_WEIGHT = 100.0  # beyond it a mixture's tensors overflow sooner than they mean anything


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate (generation adapters).")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=8, description="Stop strings (not included).")
    chat: bool = Field(True, description="Wrap each input in the base's chat template.")
    details: bool = Field(
        False, description="Each generated token's id and logprob (float32 log-softmax, the adapter applied)."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class MixtureEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="An adapter's name.")
    weight: float = Field(..., ge=-MAX_WEIGHT, le=MAX_WEIGHT,
                          description="Its weight; negative subtracts it, as in PEFT.")


class MixtureFields(BaseModel):
    """A per-request mixture of adapters (instead of one adapter), combined as PEFT's add_weighted_adapter does.
    /predict and the OpenAI routes take these fields in the body (OpenAI clients: extra_body)."""

    adapters: list[MixtureEntry] | None = Field(
        None, min_length=1, max_length=MAX_MIXTURE_PARTS,
        description="Adapters to mix, each with its weight: [{\"name\": \"a\", \"weight\": 0.7}, ...].",
    )
    combination: Combination | None = Field(
        None, description="How to combine them, as PEFT's add_weighted_adapter (default linear)."
    )
    density: float | None = Field(
        None, gt=0.0, le=1.0, description="ties, dare_linear, dare_ties: the share of each tensor kept."
    )
    mixture_seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="dare_linear, dare_ties: the seed of the random pruning (default 0)."
    )


class PredictRequest(MixtureFields):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str] = Field(..., description="One text or a list of texts.")
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = Field(False, description="Answer as server-sent events (one input only).")
    timeout: float | None = Field(
        None, gt=0, description="Seconds this request may take; lowers the server's request_timeout_s (504 past it)."
    )

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("inputs must hold at least one text")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"inputs[{i}] is empty")
        return value

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
