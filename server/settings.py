"""One typed settings object: environment variables (LORASWAP_*) and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASWAP_", extra="forbid", cli_kebab_case=True)

    base_model: Path | None = Field(
        None, description="Local Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "loraswap", description="Where the embedded base is converted to safetensors."
    )
    adapters_dir: Path = Field(REPO_ADAPTERS, description="The adapter store.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Compute dtype of the base and adapters (bfloat16 is ~2x faster on CPUs with bf16)."
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as plain text or as one JSON object per line."
    )

    max_loaded_adapters: int = Field(8, ge=1, description="Adapters kept in memory at once (LRU beyond that).")
    max_inputs: int = Field(64, ge=1, description="Most inputs in one /predict request.")
    max_new_tokens_limit: int = Field(1024, ge=1, description="Upper bound for max_new_tokens.")
    default_max_new_tokens: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1, description="Most rows the scheduler puts in one forward.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long the scheduler waits to fill a batch.")
