"""HTTP edge: thin routes over the registry (storage) and the engine (compute). Routes never touch torch."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import Services, ServicesDep, status_of
from .engine import Engine
from .errors import AdapterInvalid, InvalidInput, LoraswapError
from .openai_api import router as openai_router
from .routes_adapters import router as adapters_router
from .routes_finetune import router as finetune_router
from .schemas import PredictRequest
from .serving import (
    count_tokens,
    event_stream,
    generation_params,
    predict_body,
    predict_events,
    refuse_generation_parameters,
    resolve_model,
    started,
    validation_message,
)
from .settings import Settings
from .telemetry import RecordDep, RequestTelemetry

log = logging.getLogger(__name__)
CONSOLE_DIR = Path(__file__).resolve().parent / "console"
router = APIRouter()


@router.get("/health")
def health(svc: ServicesDep):
    if svc.engine is None:
        status = "failed" if svc.load_error else "loading"
        return JSONResponse(status_code=503, content={"status": status, "detail": svc.load_error})
    return {"status": "ready", "base": svc.engine.info.as_dict(), "adapters": len(svc.registry.names())}


@router.get("/", include_in_schema=False)
def console() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html")


@router.get("/metrics", include_in_schema=False)
def metrics(svc: ServicesDep) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/predict")
def predict(
    body: PredictRequest,
    svc: ServicesDep,
    record: RecordDep,
    adapter: Annotated[str | None, Query(description="Adapter name; omit to use the base model.")] = None,
):
    engine = svc.ready_engine()
    location = resolve_model(svc.registry, engine, record, adapter)
    if location is not None:
        refuse_generation_parameters(svc.registry.get(location.name).task, location.name, body.parameters)
    texts = body.texts()
    if len(texts) > svc.settings.max_inputs:
        raise InvalidInput("inputs", f"{len(texts)} inputs, over the limit of {svc.settings.max_inputs}")
    p = body.parameters
    params = generation_params(
        svc.settings, p.max_new_tokens, "parameters.max_new_tokens",
        temperature=p.temperature, top_p=p.top_p, seed=p.seed, stop=p.stop, chat=p.chat,
        logprobs=0 if p.details else None,
    )
    if body.stream:
        if len(texts) != 1:
            raise InvalidInput("inputs", f"a streamed request takes one input, not {len(texts)}")
        stream = started(engine.predict_stream(location, texts[0], params))
        return event_stream(predict_events(record, adapter, stream))
    task, results = engine.predict(location, texts, params)
    count_tokens(record, results)
    return predict_body(adapter, task, results)


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, services: Services | None = None
) -> FastAPI:
    """App factory: with an engine given (tests), serve it; else load the base in the background at start-up
    (with `services` given: theirs, as the Ray Serve ingress's replicas in server/cluster.py)."""
    settings = settings or Settings()
    services = services or Services(settings, engine)

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

    app = FastAPIOffline(title="loraswap", lifespan=lifespan)  # /docs and /redoc work offline
    app.state.services = services
    app.add_middleware(RequestTelemetry, metrics=services.metrics)
    app.include_router(router)
    app.include_router(adapters_router)
    app.include_router(openai_router)
    app.include_router(finetune_router)
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")

    @app.exception_handler(LoraswapError)
    async def domain_error(_request: Request, exc: LoraswapError) -> JSONResponse:
        content: dict = {"detail": str(exc)}
        if isinstance(exc, AdapterInvalid):
            content["problems"] = exc.problems  # one entry per problem, for clients that list them
        return JSONResponse(status_code=status_of(exc), content=content, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """The same {"detail": "field: problem"} string as every other error, not pydantic's list of dicts."""
        return JSONResponse(status_code=422, content={"detail": validation_message(exc)})

    return app
