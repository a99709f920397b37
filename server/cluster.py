"""Scale-out on Ray Serve (`loraswap --replicas N`, N >= 2): one FastAPI ingress, N engine replicas.

The ingress is today's app (server/api.py, every router unchanged) whose engine is a `RemoteEngine`: it resolves
names to versions in the one adapter store as in one process, then forwards each predict/stream/embed call to the
`EngineReplica` deployment with the immutable version (`name@version:sha256`) as Ray's multiplexed model id, so the
router sends it to a replica that already holds that adapter. A replace changes the id: no replica can serve the old
weights to a request located after the replace, and old ids age out of each replica's LRU. Each replica is a full
`Engine` (its own adapter slots, batching and merge policy). Nothing in the single-process path imports this module.

The ingress runs as one replica, because the store's names live in its registry: every upload, replace and delete
goes through it and is seen by the next request it routes (the engine replicas only ever load immutable versions).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import openmp
from .adapter_format import AdapterWeights
from .admission import AdmissionGate
from .api import create_app
from .base_model import BaseInfo
from .deps import Services
from .encoding import InputEncoder
from .errors import LoraswapError, NotReady
from .metrics import Metrics
from .request_context import RequestContext, current_request, open_request
from .settings import Settings
from .types import (
    MIXTURE_PREFIX, ClassificationResult, EmbeddingResult, GenerationParams, GenerationResult, MixtureKey, SlotKey,
    Task,
)

log = logging.getLogger(__name__)

APP_NAME = "loraswap"
ENGINE_DEPLOYMENT = "EngineReplica"
REPLICA_HEADER = "X-Loraswap-Replica"
RETRIES = 4  # calls to a replica that died (or is being replaced) are sent again this many times
RETRY_DELAY_S = 0.5  # ... after 0.5, 1, 2, 4 s: the router drops a dead replica within about a second
LOADED_TTL_S = 1.0  # how long the ingress reuses the replicas' lists of loaded adapters


class ReplicaUnavailable(NotReady):
    """No engine replica answered (each one tried had died); 503, as while the base loads."""

    headers = {"Retry-After": "5"}


def model_id(location: SlotKey) -> str:
    """Ray's multiplexed model id of one immutable adapter version (or a mixture of such versions); a name re-created
    after a delete restarts at version 1, so the digest is part of it."""
    if isinstance(location, MixtureKey):
        return f"{location.name}:{'+'.join(part.location.sha256[:16] for part in location.parts)}"
    return f"{location.name}@{location.version}:{location.sha256[:16]}"


# ---- the engine replica ----------------------------------------------------------------------------------------

_locating: contextvars.ContextVar[SlotKey] = contextvars.ContextVar("loraswap_locating")


class EngineReplica:
    """One full engine. Blocking engine calls run on this replica's own thread pool (so that many requests wait at
    once and batch together), never on Ray's event loop."""

    def __init__(self, settings: Settings):
        from .engine import Engine  # torch is imported in the replica, not where the app is built

        self.settings = settings
        self.engine = Engine.from_settings(settings)
        self.metrics = Metrics(lambda: self.engine)
        self.engine.observers.append(self.metrics)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pool = ThreadPoolExecutor(max_workers=replica_concurrency(settings), thread_name_prefix="engine-call")

        async def hold(adapter_id: str) -> str:
            """Ray's loader: load the version into an engine slot; Ray's LRU (same size as the engine's) then
            tells the router which replica holds which versions. Ray awaits it in the request's own task, so the
            location comes through the request's context."""
            location = _locating.get()
            assert model_id(location) == adapter_id
            await self._run(lambda: self.engine.release(self.engine.acquire(location)))
            return adapter_id

        self._hold = serve.multiplexed(max_num_models_per_replica=settings.max_loaded_adapters)(hold)
        log.info("engine replica %s ready (%d torch threads)", self.replica, settings.num_threads or 0)

    async def _run(self, call: Callable[[], Any]) -> Any:
        """`call` on the pool, in this request's context (its id and deadline reach the engine)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, contextvars.copy_context().run, call)

    async def _locate(self, location: SlotKey | None, request: Request) -> None:
        open_request(RequestContext(*request))
        if location is not None:
            token = _locating.set(location)
            try:
                await self._hold(model_id(location))
            finally:
                _locating.reset(token)

    def describe(self) -> tuple[BaseInfo, Any]:
        """The base's info and tokenizer: the ingress encodes chat messages and decodes tokens itself."""
        return self.engine.info, self.engine.tokenizer

    def check_adapter(self, folder: str) -> AdapterWeights:
        """engine.check_adapter for the registry (an upload staged in the shared store), without the weights."""
        adapter = self.engine.check_adapter(Path(folder))
        return dataclasses.replace(adapter, modules={}, head={})

    async def predict(
        self, location: SlotKey | None, texts: list, params: GenerationParams, request: Request
    ) -> tuple[str, Task, list]:
        await self._locate(location, request)
        task, results = await self._run(lambda: self.engine.predict(location, texts, params))
        return self.replica, task, results

    async def embed(
        self, location: SlotKey | None, inputs: list, request: Request
    ) -> tuple[str, list[EmbeddingResult]]:
        await self._locate(location, request)
        return self.replica, await self._run(lambda: self.engine.embed(location, inputs))

    async def predict_stream(
        self, location: SlotKey | None, prompt: str | list[int], params: GenerationParams, request: Request
    ):
        """The replica's id, then engine.predict_stream's items; a cancelled stream closes the engine's (its row
        leaves the decode batch)."""
        await self._locate(location, request)
        stream = self.engine.predict_stream(location, prompt, params)
        context = contextvars.copy_context()
        done = object()
        last: list[Future] = []  # the latest step, run on the pool

        async def step() -> Any:
            last[:] = [self.pool.submit(context.run, next, stream, done)]
            return await asyncio.wrap_future(last[0])

        def close() -> None:
            wait(last)  # a step still running when the stream was cancelled: a generator runs one step at a time
            stream.close()

        try:
            item = await step()  # errors before the first item reach the caller
            yield self.replica
            while item is not done:
                yield item
                item = await step()
        finally:
            await self._run(close)

    def unload(self, name: str) -> str:
        self.engine.unload(name)
        return self.replica

    def loaded(self) -> tuple[str, list[str]]:
        return self.replica, [model_id(location) for location in self.engine.loaded()]

    def metrics_text(self) -> tuple[str, str]:
        return self.replica, self.metrics.render().decode()


def replica_concurrency(settings: Settings) -> int:
    """Requests one replica takes at once: enough to fill its batches several times over."""
    return max(32, 4 * settings.max_batch_size)


# ---- the ingress side ------------------------------------------------------------------------------------------

_served_by: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("loraswap_served_by", default=None)


def _note_replica(replica: str) -> None:
    served = _served_by.get()
    if served is not None:
        served.append(replica)


class ReplicaHeader:
    """Pure ASGI middleware: names the replica that served a request in `X-Loraswap-Replica` (the last one, if a
    retry went to another). The routes' threads see the list through the copied context."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        served: list[str] = []
        token = _served_by.set(served)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start" and served:
                message = {**message, "headers": [*message.get("headers", []),
                                                   (REPLICA_HEADER.lower().encode(), served[-1].encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _served_by.reset(token)


Request = tuple[str, float | None]  # what a replica needs of the HTTP request: its id and the seconds left to it


def _request() -> Request:
    """The current request's id and remaining time (its deadline, on the replica's clock)."""
    context = current_request()
    deadline = context.deadline
    return context.request_id, None if deadline is None else max(0.0, deadline - time.monotonic())


def _domain_error(exc: RayTaskError) -> BaseException:
    """The replica's own exception (a LoraswapError keeps its class, message and status), else Ray's."""
    return exc.cause if isinstance(exc.cause, LoraswapError) else exc


def _with_retries(call: Callable[[], Any]) -> Any:
    """Run `call` (one request to some replica), again when the replica died under it."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except RayTaskError as exc:
            raise _domain_error(exc) from None
        except RayActorError as exc:
            if attempt == RETRIES:
                raise ReplicaUnavailable(f"no engine replica could serve the request: {exc.__class__.__name__}") \
                    from None
            log.warning("engine replica failed (%s); retrying", exc.__class__.__name__)
            time.sleep(RETRY_DELAY_S * 2**attempt)


class RemoteEngine:
    """Engine-shaped proxy for the routes: the calls they make, forwarded to the engine replicas. Tokenizing chat
    messages and decoding tokens happen here, with the base's own tokenizer."""

    def __init__(self, handle: DeploymentHandle, info: BaseInfo, tokenizer: Any):
        self.handle = handle
        self.info = info
        self.tokenizer = tokenizer
        self.encoder = InputEncoder(tokenizer, info.max_context, info.name)
        self.observers: list = []  # engine events happen in the replicas; their metrics carry a replica label
        # each replica's engine admits or refuses (429) requests itself; the ingress lets every one through to them
        self.admission = AdmissionGate(max_rows=2**31, max_tokens=2**62)
        self._loaded_lock = threading.Lock()
        self._loaded: tuple[float, dict[str, list[str]]] = (-LOADED_TTL_S, {})

    @classmethod
    def connect(cls, handle: DeploymentHandle) -> RemoteEngine:
        info, tokenizer = _with_retries(lambda: handle.describe.remote().result())
        return cls(handle, info, tokenizer)

    def _to(self, location: SlotKey | None) -> DeploymentHandle:
        return self.handle if location is None else self.handle.options(multiplexed_model_id=model_id(location))

    def predict(
        self, location: SlotKey | None, texts: list[str | list[int]], params: GenerationParams
    ) -> tuple[Task, list[ClassificationResult] | list[GenerationResult]]:
        replica, task, results = _with_retries(
            lambda: self._to(location).predict.remote(location, texts, params, _request()).result()
        )
        _note_replica(replica)
        return task, results

    def embed(self, location: SlotKey | None, inputs: list[str | list[int]]) -> list[EmbeddingResult]:
        replica, results = _with_retries(
            lambda: self._to(location).embed.remote(location, inputs, _request()).result()
        )
        _note_replica(replica)
        return results

    def predict_stream(
        self, location: SlotKey | None, prompt: str | list[int], params: GenerationParams
    ) -> Iterator:
        """engine.predict_stream on a replica; a replica that dies before the first item is retried, one that dies
        midway ends the stream with ReplicaUnavailable (the routes turn it into an error event)."""

        def open_stream():
            handle = self._to(location).options(stream=True)
            stream = handle.predict_stream.remote(location, prompt, params, _request())
            return stream, next(stream)  # the replica's id: the call has reached a live replica

        stream, replica = _with_retries(open_stream)
        _note_replica(replica)
        try:
            yield from stream
        except RayTaskError as exc:
            raise _domain_error(exc) from None
        except RayActorError as exc:
            raise ReplicaUnavailable(f"the engine replica stopped midway: {exc.__class__.__name__}") from None
        finally:
            stream.cancel()

    def check_adapter(self, folder: Path) -> AdapterWeights:
        return _with_retries(lambda: self.handle.check_adapter.remote(str(folder)).result())

    def unload(self, name: str) -> None:
        """Drop every version of `name` from every replica's memory (requests already use the new id)."""
        self.handle.broadcast("unload", name).results(timeout_s=30, return_exceptions=True)
        with self._loaded_lock:
            self._loaded = (-LOADED_TTL_S, {})

    def loaded_by_replica(self) -> dict[str, list[str]]:
        """The adapter versions each replica holds; asked at most once a second (GET /adapters asks per adapter)."""
        with self._loaded_lock:
            asked, loaded = self._loaded
            if time.monotonic() - asked > LOADED_TTL_S:
                loaded = dict(self.handle.broadcast("loaded").results(timeout_s=30))
                self._loaded = (time.monotonic(), loaded)
            return loaded

    def is_loaded(self, name: str) -> bool:
        return any(i.split("@")[0] == name for ids in self.loaded_by_replica().values() for i in ids)

    def mixtures(self) -> list[dict]:
        """The mixtures the replicas hold, by name (model_id: the name, then its parts' digests) and replica."""
        return [{"name": i.rsplit(":", 1)[0], "replica": replica} for replica, ids in self.loaded_by_replica().items()
                for i in ids if i.startswith(MIXTURE_PREFIX)]

    def encode_messages(self, messages: list[dict[str, str]], params: GenerationParams) -> list[int]:
        return self.encoder.messages(messages, params)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def abort(self, error: LoraswapError) -> None:
        """Nothing to cut here: the ingress holds no work (the replicas do, and Ray Serve stops them with it)."""

    def close(self) -> None:
        pass  # the replicas belong to Ray Serve


class ClusterMetrics(Metrics):
    """The ingress's request metrics (as in one process), plus every replica's engine metrics with a `replica`
    label, gathered at scrape time."""

    def __init__(self, engine: Callable[[], RemoteEngine | None], alive: Callable[[str], bool]):
        super().__init__(lambda: None, alive)  # no engine gauges of its own: they come from the replicas
        for engine_metric in (self.load_seconds, self.evictions, self.batch_size):
            self.registry.unregister(engine_metric)
        self._remote = engine

    def render(self) -> bytes:
        own = self.registry  # request metrics; the replicas' of the same names (never observed there) are dropped
        texts = {}
        if (remote := self._remote()) is not None:
            texts = dict(_off_the_loop(lambda: remote.handle.broadcast("metrics_text").results(timeout_s=10)))
        registry = CollectorRegistry()
        registry.register(_ReplicaFamilies(texts, {f.name for f in own.collect()}))
        return generate_latest(own) + generate_latest(registry)


def _off_the_loop(call: Callable[[], Any]) -> Any:
    """A blocking Ray call from an async route (/metrics runs on the event loop, where Ray refuses to block)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call()
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


class _ReplicaFamilies(Collector):
    def __init__(self, texts: dict[str, str], skip: set[str]):
        self.texts = texts
        self.skip = skip

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                if family.name in self.skip:
                    continue
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
        yield from families.values()


class ClusterServices(Services):
    """Services whose engine is the replicas: it 'loads' by waiting for one replica to describe the base."""

    def __init__(self, settings: Settings, handle: DeploymentHandle):
        super().__init__(settings)
        self.handle = handle
        self.metrics = ClusterMetrics(lambda: self.engine, self.registry.__contains__)

    def load(self) -> None:
        try:
            self._attach(RemoteEngine.connect(self.handle))
            log.info("engine replicas ready (base %s)", self.engine.info.name)
        except Exception as exc:
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            log.exception("engine replicas failed to start")


def ingress_app(settings: Settings, app_name: str):
    """The ingress's FastAPI app, built in the ingress replica (Ray calls this there)."""
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name)
    app = create_app(settings, services=ClusterServices(settings, handle))
    app.add_middleware(ReplicaHeader)
    return app


# ---- building and running the application ----------------------------------------------------------------------


def replica_threads(settings: Settings) -> int:
    """torch threads per replica: --num-threads, else the cores shared out between the replicas."""
    return settings.num_threads or max(1, (os.cpu_count() or 1) // settings.replicas)


def build(settings: Settings, app_name: str = APP_NAME, health_check_period_s: float = 2.0):
    """The Ray Serve application: `settings.replicas` engine replicas behind one ingress."""
    threads = replica_threads(settings)
    replica_settings = settings.model_copy(update={"num_threads": threads})
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        num_replicas=settings.replicas,
        max_ongoing_requests=replica_concurrency(settings),
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {
            "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            **{name: os.environ.get(name, value) for name, value in openmp.WAITING.items()}}}},
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=30,
    )

    def app_builder():
        return ingress_app(settings, app_name)

    ingress = serve.deployment(
        serve.ingress(app_builder)(),
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(engine.bind(replica_settings))


def app(args: dict[str, str]):
    """`serve run server.cluster:app replicas=2 adapters_dir=/mnt/adapters` or a serve config's `import_path`:
    settings from LORASWAP_* env vars, overridden by the args."""
    return build(Settings(**args))


def serve_cluster(settings: Settings) -> None:
    """`loraswap --replicas N`: start a local Ray (or join RAY_ADDRESS), serve on host:port until SIGINT/SIGTERM."""
    import ray

    threads = replica_threads(settings)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, threads * settings.replicas), include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose own handler would abort the process
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/")  # the app answers a little before this returns
    log.info("serving %d engine replicas on http://%s:%d", settings.replicas, settings.host, settings.port)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
