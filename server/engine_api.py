"""What the HTTP routes may ask of an engine: the one boundary between them and the model. Both the local engine
(server/engine.py) and the Ray ingress's proxy to the engine replicas (server/cluster.py) implement it, and the routes
are typed on it, never on either class. No torch here: the types are imported for annotations only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .adapter_format import AdapterWeights
    from .admission import AdmissionGate
    from .base_model import BaseInfo
    from .errors import LoraswapError
    from .types import (
        ClassificationResult, EmbeddingResult, GenerationParams, GenerationResult, SlotKey, Task, TokenLogprob
    )


class EngineAPI(Protocol):
    info: BaseInfo  # the loaded base: what adapters must fit
    admission: AdmissionGate  # the bound on work in flight (its refusals are 429)
    observers: list[Any]  # engine events (adapter loads, batches) go to these; the metrics subscribe

    def predict(
        self, location: SlotKey | None, texts: list[str | list[int]], params: GenerationParams
    ) -> tuple[Task, list[ClassificationResult] | list[GenerationResult]]: ...

    def predict_stream(
        self, location: SlotKey | None, prompt: str | list[int], params: GenerationParams
    ) -> Iterator[str | TokenLogprob | GenerationResult | ClassificationResult]: ...

    def embed(self, location: SlotKey | None, inputs: list[str | list[int]]) -> list[EmbeddingResult]: ...

    def encode_messages(self, messages: list[dict[str, str]], params: GenerationParams) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def check_adapter(self, folder: Path) -> AdapterWeights:
        """Every problem of an adapter folder against the loaded base at once (AdapterInvalid), or its weights."""
        ...

    def unload(self, name: str) -> None: ...

    def is_loaded(self, name: str) -> bool: ...

    def abort(self, error: LoraswapError) -> None:
        """Shutdown past the drain timeout: what the engine still holds is answered with `error`."""
        ...

    def close(self) -> None: ...
