"""What every HTTP router depends on: the services (settings, registry, engine, metrics) and the one table from
domain errors to HTTP statuses. Routers import this module, never each other or the app."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import Depends, Request

from .base_model import choose_dtype
from .engine import Engine
from .engine_api import EngineAPI
from .errors import (
    AdapterChanged,
    AdapterExists,
    AdapterInvalid,
    AdapterNotFound,
    AdapterReadOnly,
    ClientDisconnected,
    DeadlineExceeded,
    Draining,
    Forbidden,
    InvalidInput,
    LoraswapError,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
)
from .finetune import FineTuning
from .lifecycle import Lifecycle
from .metrics import Metrics
from .registry import Registry
from .settings import SHIPPED_ADAPTERS, Settings
from .slots import SlotsBusy

log = logging.getLogger(__name__)

# the one table from domain errors to HTTP statuses
ERROR_STATUS: dict[type[LoraswapError], int] = {
    AdapterNotFound: 404,
    NotFound: 404,
    AdapterInvalid: 422,
    InvalidInput: 422,
    AdapterExists: 409,
    AdapterReadOnly: 409,
    AdapterChanged: 409,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
    NotReady: 503,
    SlotsBusy: 503,
    Draining: 503,
    Overloaded: 429,
    DeadlineExceeded: 504,
    ClientDisconnected: 499,
}


def status_of(exc: LoraswapError) -> int:
    return next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 400)


class Services:
    """What the routes need; the engine appears once the base model has loaded."""

    def __init__(self, settings: Settings, engine: EngineAPI | None = None):
        self.settings = settings
        self.started_at = int(time.time())  # the base's "created" in /v1/models
        self.registry = Registry(settings.adapters_dir, SHIPPED_ADAPTERS if settings.shipped_adapters else None)
        self.engine: EngineAPI | None = None
        self.load_error: str | None = None
        self.lifecycle = Lifecycle()
        self.metrics = Metrics(lambda: self.engine, self.registry.__contains__)
        self.finetune = FineTuning(settings, self.registry, self.ready_engine)
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: EngineAPI) -> None:
        skipped = self.registry.scan(engine.check_adapter)
        for problem in skipped:
            log.warning("adapter skipped: %s", problem)
        for name, base in self.registry.other_base().items():
            log.info("adapter %s is for the base %s: not served on %s", name, base, engine.info.name)
        engine.observers.append(self.metrics)
        self.engine = engine

    def load(self) -> None:
        try:
            self._attach(Engine.from_settings(self.settings))
            dtype = choose_dtype(self.settings.dtype, self.settings.device)  # what load_base resolved `auto` to
            log.info("base model %s ready (dtype %s)", self.engine.info.name, dtype)
        except Exception as exc:
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            log.exception("base model failed to load")

    def stop_engine(self) -> None:
        """Shutdown past the drain timeout: the engine answers what it still holds with 503 and stops."""
        if self.engine is not None:
            self.engine.abort(Draining("the server is shutting down: the request was cut at its drain timeout"))

    def ready_engine(self) -> EngineAPI:
        if self.engine is None:
            raise NotReady(self.load_error or "the base model is still loading")
        return self.engine


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
