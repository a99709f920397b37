"""HTTP edge: thin routes over the registry (storage) and the engine (compute). Routes never touch torch."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs

import anyio.to_thread
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from .body_limit import BoundedBody
from .deps import Services, ServicesDep, status_of
from .engine_api import EngineAPI
from .metrics import BASE_LABEL, UNKNOWN_LABEL
from .errors import AdapterInvalid, InvalidInput, LoraswapError
from .openai_api import error_content
from .openai_api import router as openai_router
from .request_context import current_request
from .routes_adapters import router as adapters_router
from .routes_finetune import router as finetune_router
from .schemas import PredictRequest
from .serving import (
    count_tokens,
    event_stream,
    generation_params,
    internal_error_message,
    predict_body,
    predict_events,
    refuse_generation_parameters,
    resolve_mixture,
    resolve_model,
    started,
    validation_message,
)
from .settings import Settings
from .telemetry import STATE_KEY, RecordDep, RequestTelemetry

log = logging.getLogger(__name__)
CONSOLE_DIR = Path(__file__).resolve().parent / "console"
router = APIRouter()


@router.get("/health")
async def health(svc: ServicesDep):
    """On the event loop, never behind busy worker threads: probes are answered under any load."""
    if svc.lifecycle.draining:
        return JSONResponse(status_code=503, content={"status": "draining"})
    if svc.engine is None:
        status = "failed" if svc.load_error else "loading"
        return JSONResponse(status_code=503, content={"status": status, "detail": svc.load_error})
    return {"status": "ready", "base": svc.engine.info.as_dict(), "adapters": len(svc.registry.names())}


@router.get("/", include_in_schema=False)
def console() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html")


@router.get("/metrics", include_in_schema=False)
async def metrics(svc: ServicesDep) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/predict")
def predict(
    body: PredictRequest,
    svc: ServicesDep,
    record: RecordDep,
    adapter: Annotated[str | None, Query(description="Adapter name; omit to use the base model.")] = None,
):
    engine = svc.ready_engine()
    current_request().limit_timeout(body.timeout)
    location = resolve_mixture(svc.registry, record, body)
    if location is None:
        location = resolve_model(svc.registry, engine, record, adapter)
        if location is not None:
            refuse_generation_parameters(svc.registry.get(location.name).task, location.name, body.parameters)
    elif adapter is not None:
        raise InvalidInput("adapters", "name one adapter in the query (adapter=) or a mixture in the body, not both")
    else:
        adapter = location.name  # the answer names the mixture
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


ERROR_BODY_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {"type": "string", "description": "'field: problem' for each problem, joined by '; '"},
        "problems": {"type": "array", "items": {"type": "string"}, "description": "an invalid adapter's problems"},
    },
}


def document_error_body(app: FastAPI) -> None:
    """Our 422 body is {"detail": "field: problem"} (invalid_request below), not FastAPI's list of dicts: say so
    in /openapi.json, where every route's 422 refers to HTTPValidationError (generated clients and schemathesis
    read it)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            generate()["components"]["schemas"]["HTTPValidationError"] = ERROR_BODY_SCHEMA
        return app.openapi_schema

    app.openapi = openapi


def error_body(path: str, message: str, status: int = 413) -> dict:
    """An error's JSON body in the shape of the route: OpenAI's under /v1, {"detail"} elsewhere."""
    return error_content(status, message) if path.startswith("/v1/") else {"detail": message}


INFERENCE_PATHS = frozenset({"/predict", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"})
MAX_SHED_BODY = 64 * 1024  # of a refused request, read at most this much to label its metrics by model


class ShedWhenFull:
    """While the admission gate is full, inference requests get their 429 here: before body validation, the route
    and a worker thread (measured: a burst of 20 was refused in 46-58 ms each through the route, the slowest
    waiting behind the others' parsing; here in a few ms). The engine's own check still covers the rest."""

    def __init__(self, app: ASGIApp, services: Services):
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.services.engine
        inference = scope["type"] == "http" and scope["path"] in INFERENCE_PATHS and engine is not None
        refusal = engine.admission.full() if inference else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        openai = scope["path"].startswith("/v1/")
        scope["state"][STATE_KEY].adapter = self._label(await self._model_of(scope, receive, openai))
        content = error_body(scope["path"], str(refusal), 429)
        await JSONResponse(status_code=429, content=content, headers=refusal.headers)(scope, receive, send)

    async def _model_of(self, scope: Scope, receive: Receive, openai: bool) -> str | None:
        """The model a request names: /predict's `adapter` query parameter (none: the base), the OpenAI body's
        `model`; None if the body does not say."""
        if not openai:
            adapters = parse_qs(scope["query_string"].decode("latin-1")).get("adapter", [])
            return adapters[0] if adapters else self.services.engine.info.name
        body = b""
        while len(body) <= MAX_SHED_BODY:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                try:
                    model = json.loads(body).get("model")
                except (ValueError, AttributeError):
                    return None
                return model if isinstance(model, str) else None
        return None

    def _label(self, name: str | None) -> str:
        """Bounded metric labels, as the routes give them (server/metrics.py)."""
        if name == self.services.engine.info.name:
            return BASE_LABEL
        return name if name is not None and name in self.services.registry.names() else UNKNOWN_LABEL


def create_app(
    settings: Settings | None = None, engine: EngineAPI | None = None, services: Services | None = None
) -> FastAPI:
    """App factory: with an engine given (tests), serve it; else load the base in the background at start-up
    (with `services` given: theirs, as the Ray Serve ingress's replicas in server/cluster.py)."""
    settings = settings or Settings()
    services = services or Services(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # sync routes hold a worker thread while their request is in the engine: enough threads for every request
        # admission control lets in, plus room for the ones it refuses at once
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.max_rows_in_flight + 64)
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
    app.add_middleware(BoundedBody, max_body_bytes=settings.max_body_bytes, error_content=error_body)
    app.add_middleware(ShedWhenFull, services=services)  # inside the telemetry: its refusals are logged and counted
    app.add_middleware(RequestTelemetry, metrics=services.metrics, lifecycle=services.lifecycle,
                       timeout_s=settings.request_timeout_s)
    app.include_router(router)
    app.include_router(adapters_router)
    app.include_router(openai_router)
    app.include_router(finetune_router)
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")
    document_error_body(app)

    @app.exception_handler(LoraswapError)
    async def domain_error(_request: Request, exc: LoraswapError) -> JSONResponse:
        content: dict = {"detail": str(exc)}
        if isinstance(exc, AdapterInvalid):
            content["problems"] = exc.problems  # one entry per problem, for clients that list them
        return JSONResponse(status_code=status_of(exc), content=content, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        """A bug or a model failure: the JSON error shape, naming the request id that the log line carries."""
        return JSONResponse(status_code=500, content={"detail": internal_error_message()},
                            headers={"X-Request-Id": current_request().request_id})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """The same {"detail": "field: problem"} string as every other error, not pydantic's list of dicts."""
        return JSONResponse(status_code=422, content={"detail": validation_message(exc)})

    return app
