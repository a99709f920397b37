"""HTTP edge: thin routes over the registry (storage) and the engine (compute). Routes never touch torch."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from .engine import Engine, SlotsBusy
from .errors import (
    AdapterChanged,
    AdapterExists,
    AdapterInvalid,
    AdapterNotFound,
    Forbidden,
    InvalidInput,
    LoraswapError,
    NotFound,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
)
from .finetune import FineTuning
from .metrics import Metrics
from .openai_api import openai_router
from .registry import Registry
from .schemas import PredictRequest
from .serving import (
    count_tokens, event_stream, generation_params, predict_body, predict_events, resolve_model, started
)
from .settings import Settings
from .telemetry import RecordDep, RequestTelemetry

log = logging.getLogger(__name__)
CONSOLE_DIR = Path(__file__).resolve().parent / "console"

# the one table from domain errors to HTTP statuses
ERROR_STATUS: dict[type[LoraswapError], int] = {
    AdapterNotFound: 404,
    NotFound: 404,
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


def status_of(exc: LoraswapError) -> int:
    return next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 400)


class Services:
    """What the routes need; the engine appears once the base model has loaded."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.registry = Registry(settings.adapters_dir)
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.engine)
        self.finetune = FineTuning(settings, self.registry, self.ready_engine)
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        skipped = self.registry.scan(engine.check_adapter)
        for problem in skipped:
            log.warning("adapter skipped: %s", problem)
        engine.observers.append(self.metrics)
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
        services.finetune.start()
        yield
        services.finetune.stop()
        if services.engine is not None:
            services.engine.observers.remove(services.metrics)
            if engine is None:
                services.engine.close()

    app = FastAPI(title="loraswap", lifespan=lifespan)
    app.state.services = services
    from .routes_adapters import router as adapters_router  # it imports ServicesDep from here

    app.include_router(adapters_router)

    app.add_middleware(RequestTelemetry, metrics=services.metrics)
    app.include_router(openai_router(services, status_of))
    from .routes_finetune import finetune_router  # it imports ServicesDep from here

    app.include_router(finetune_router(services, status_of))
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")

    @app.exception_handler(LoraswapError)
    async def domain_error(_request: Request, exc: LoraswapError) -> JSONResponse:
        return JSONResponse(status_code=status_of(exc), content={"detail": str(exc)}, headers=exc.headers)

    @app.get("/health")
    def health(svc: ServicesDep):
        if svc.engine is None:
            status = "failed" if svc.load_error else "loading"
            return JSONResponse(status_code=503, content={"status": status, "detail": svc.load_error})
        return {"status": "ready", "base": svc.engine.info.as_dict(), "adapters": len(svc.registry.names())}

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html")

    @app.get("/metrics", include_in_schema=False)
    def metrics(svc: ServicesDep) -> Response:
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    def predict(
        body: PredictRequest,
        svc: ServicesDep,
        record: RecordDep,
        adapter: Annotated[str | None, Query(description="Adapter name; omit to use the base model.")] = None,
    ):
        engine = svc.ready_engine()
        location = resolve_model(svc.registry, engine, record, adapter)
        texts = body.texts()
        if len(texts) > svc.settings.max_inputs:
            raise InvalidInput("inputs", f"{len(texts)} inputs, over the limit of {svc.settings.max_inputs}")
        p = body.parameters
        params = generation_params(
            svc.settings, p.max_new_tokens, "parameters.max_new_tokens",
            temperature=p.temperature, top_p=p.top_p, seed=p.seed, stop=p.stop, chat=p.chat,
        )
        if body.stream:
            if len(texts) != 1:
                raise InvalidInput("inputs", f"a streamed request takes one input, not {len(texts)}")
            stream = started(engine.predict_stream(location, texts[0], params))
            return event_stream(predict_events(engine, record, adapter, texts[0], stream))
        task, results = engine.predict(location, texts, params)
        count_tokens(engine, record, texts, results)
        return predict_body(adapter, task, results)

    return app
