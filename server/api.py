"""HTTP edge: thin routes over the registry (storage) and the engine (compute). Routes never touch torch."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from .engine import Engine, GenerationParams, SlotsBusy
from .errors import (
    AdapterChanged,
    AdapterExists,
    AdapterInvalid,
    AdapterNotFound,
    Forbidden,
    InvalidInput,
    LoraswapError,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
)
from .registry import Registry
from .schemas import PredictRequest
from .settings import Settings

log = logging.getLogger(__name__)

# the one table from domain errors to HTTP statuses
ERROR_STATUS: dict[type[LoraswapError], int] = {
    AdapterNotFound: 404,
    AdapterInvalid: 422,
    InvalidInput: 422,
    AdapterExists: 409,
    AdapterChanged: 409,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
    NotReady: 503,
    SlotsBusy: 503,
}


class Services:
    """What the routes need; the engine appears once the base model has loaded."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.registry = Registry(settings.adapters_dir)
        self.engine: Engine | None = None
        self.load_error: str | None = None
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        skipped = self.registry.scan(engine.check_adapter)
        for problem in skipped:
            log.warning("adapter skipped: %s", problem)
        self.engine = engine

    def load(self) -> None:
        try:
            self._attach(Engine.from_settings(self.settings))
            log.info("base model %s ready", self.engine.info.name)
        except Exception as exc:
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            log.exception("base model failed to load")

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise NotReady(self.load_error or "the base model is still loading")
        return self.engine


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """App factory: with an engine given (tests), serve it; else load the base in the background at start-up."""
    settings = settings or Settings()
    services = Services(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if services.engine is None:
            threading.Thread(target=services.load, name="base-loader", daemon=True).start()
        yield
        if services.engine is not None and engine is None:
            services.engine.close()

    app = FastAPI(title="loraswap", lifespan=lifespan)
    app.state.services = services
    from .routes_adapters import router as adapters_router  # it imports ServicesDep from here

    app.include_router(adapters_router)

    @app.exception_handler(LoraswapError)
    async def domain_error(_request: Request, exc: LoraswapError) -> JSONResponse:
        status = next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 400)
        return JSONResponse(status_code=status, content={"detail": str(exc)}, headers=exc.headers)

    @app.get("/health")
    def health(svc: ServicesDep):
        if svc.engine is None:
            status = "failed" if svc.load_error else "loading"
            return JSONResponse(status_code=503, content={"status": status, "detail": svc.load_error})
        return {"status": "ready", "base": svc.engine.info.as_dict(), "adapters": len(svc.registry.names())}

    @app.post("/predict")
    def predict(
        body: PredictRequest,
        svc: ServicesDep,
        adapter: Annotated[str | None, Query(description="Adapter name; omit to use the base model.")] = None,
    ):
        engine = svc.ready_engine()
        texts = body.texts()
        if len(texts) > svc.settings.max_inputs:
            raise InvalidInput("inputs", f"{len(texts)} inputs, over the limit of {svc.settings.max_inputs}")
        p = body.parameters
        max_new = p.max_new_tokens or svc.settings.default_max_new_tokens
        if max_new > svc.settings.max_new_tokens_limit:
            raise InvalidInput(
                "parameters.max_new_tokens", f"{max_new} is over the limit of {svc.settings.max_new_tokens_limit}"
            )
        params = GenerationParams(max_new, p.temperature, p.top_p, p.seed, tuple(p.stop), p.chat)
        location = svc.registry.locate(adapter) if adapter is not None else None
        task, results = engine.predict(location, texts, params)
        return {"adapter": adapter, "task": task, "outputs": [asdict(r) for r in results]}

    return app
