"""Hardening against real traffic: admission control (429), deadlines and disconnects, failures mid-stream,
request ids, no host paths, and SIGTERM drain. Real HTTP (uvicorn) where connections matter."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.admission import AdmissionGate
from server.request_context import RequestIdFilter
from server.types import GenerationParams
from tests.helpers import serve_in_thread, server_process, slowed

LONG = {"max_new_tokens": 200}  # the tiny base's context is 256 tokens


@contextmanager
def bounded(engine, max_rows: int, max_tokens: int = 10**9):
    saved = engine.admission
    engine.admission = AdmissionGate(max_rows, max_tokens, retry_after_s=2)
    try:
        yield engine.admission
    finally:
        engine.admission = saved


def wait_until(condition, seconds: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached in {seconds} s"
        time.sleep(0.005)


@pytest.fixture
def logged(caplog):
    """caplog whose records carry request ids, as the server's own log handler does (removed after the test:
    pytest keeps one capture handler for the session)."""
    id_filter = RequestIdFilter()
    caplog.handler.addFilter(id_filter)
    caplog.set_level(logging.INFO, logger="server.requests")
    yield caplog
    caplog.handler.removeFilter(id_filter)


@pytest.fixture
def live(tiny_settings, engine):
    """A real uvicorn server in this process, on the shared tiny engine and the test adapters."""
    from server.api import create_app

    with serve_in_thread(create_app(tiny_settings, engine=engine)) as url:
        yield url


def lone_ids(engine, store: Path, adapter: str, prompt: str, max_new_tokens: int) -> list[int]:
    """The greedy answer of one prompt served alone."""
    from server.types import AdapterLocation

    location = AdapterLocation(adapter, 1, store / adapter)
    _, [result] = engine.predict(location, [prompt], GenerationParams(max_new_tokens=max_new_tokens))
    return result.token_ids


# ---- admission control ----------------------------------------------------------------------------------------


def test_a_burst_beyond_the_bound_gets_429_at_once_while_admitted_requests_complete(live, engine, adapter_store,
                                                                                   caplog):
    """Timed by the server (its request log line: first byte in to last byte out), and by the client for a probe
    that shares one connection pool (a new httpx client per request costs more than the server's whole answer)."""
    caplog.set_level(logging.INFO, logger="server.requests")
    prompts = [f"tell me a long story about the number {i}" for i in range(4)]
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    with (bounded(engine, max_rows=4) as gate, slowed(engine, 0.01), ThreadPoolExecutor(24) as pool,
          httpx.Client(base_url=live, timeout=120, limits=limits) as http):
        admitted = [
            pool.submit(http.post, "/predict?adapter=gen-a", json={"inputs": p, "parameters": LONG}) for p in prompts
        ]
        wait_until(lambda: gate.rows == 4 and engine.runner.decoding == 4, what="4 rows decoding")
        burst = [
            pool.submit(http.post, "/predict?adapter=gen-a", json={"inputs": f"burst {i}"})
            for i in range(16)
        ] + [
            pool.submit(http.post, "/v1/completions", json={"model": "gen-a", "prompt": f"burst {i}"})
            for i in range(4)
        ]
        refused = [future.result() for future in burst]
        assert not any(future.done() for future in admitted), "the burst waited for the admitted requests"
        started = time.perf_counter()
        health = http.get("/health")
        health_seconds = time.perf_counter() - started
        answers = [future.result() for future in admitted]
    served_ms = sorted(r.latency_ms for r in caplog.records if r.name == "server.requests" and r.status == 429)
    print(f"429 served in: median {served_ms[len(served_ms) // 2]} ms, max {served_ms[-1]} ms; "
          f"/health round trip {health_seconds * 1000:.1f} ms")
    assert len(served_ms) == 20 and served_ms[-1] < 50
    assert health.status_code == 200 and health_seconds < 0.05
    for response in refused[:16]:
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "2"
        assert response.json() == {"detail": "the server is full: 4 rows in flight, at most 4; retry later"}
    for response in refused[16:]:
        assert response.status_code == 429 and response.headers["Retry-After"] == "2"
        assert response.json()["error"]["message"].startswith("the server is full")
    for prompt, response in zip(prompts, answers):
        assert response.status_code == 200
        expected = lone_ids(engine, adapter_store, "gen-a", prompt, LONG["max_new_tokens"])
        assert response.json()["outputs"][0]["token_ids"] == expected
    assert gate.rows == 0 and gate.tokens == 0
    metrics = httpx.get(f"{live}/metrics").text
    assert 'loraswap_rejected_requests_total{adapter="gen-a"} 20.0' in metrics


def test_the_token_bound_counts_prompt_and_budget(engine, adapter_store):
    from server.errors import Overloaded
    from server.types import AdapterLocation

    location = AdapterLocation("gen-a", 1, adapter_store / "gen-a")
    prompt_tokens = len(engine.encode_for_generation(["hi"], GenerationParams(max_new_tokens=8))[0])
    with bounded(engine, max_rows=100, max_tokens=2 * (prompt_tokens + 8)) as gate:
        held = gate.reserve(1, prompt_tokens + 8)
        engine.predict(location, ["hi"], GenerationParams(max_new_tokens=8))  # fits beside the one held
        with pytest.raises(Overloaded, match="tokens in flight"):
            engine.predict(location, ["hi"], GenerationParams(max_new_tokens=9))
        held.release()
        engine.predict(location, ["hi"], GenerationParams(max_new_tokens=200))  # alone: always admitted
        assert gate.rows == 0 and gate.tokens == 0


# ---- deadlines and disconnects ----------------------------------------------------------------------------------


def unmeasured(engine) -> None:
    """The engine forgets what its forwards cost: admission has no estimate until it measures them again."""
    from server.admission import WorkCosts

    engine.runner.costs = WorkCosts(engine.runner.costs.budget, engine.runner.costs.max_rows)


def test_a_request_past_its_deadline_leaves_the_batch_and_gets_504(live, engine):
    """Admitted while the engine's costs are unknown (else admission would see that 200 slowed steps cannot end
    within the deadline, and answer 429 at once: tests/test_admission.py)."""
    with slowed(engine, 0.01):
        unmeasured(engine)
        started = time.monotonic()
        response = httpx.post(f"{live}/predict?adapter=gen-a", json={"inputs": "a long one", "parameters": LONG,
                                                                      "timeout": 0.3}, timeout=30)
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert response.json() == {"detail": "the request's deadline of 0.3 s passed before it was answered"}
        assert elapsed < 0.3 + 0.5  # the next step after the deadline, not the 200 steps (over 2 s here)
        assert engine.runner.decoding == 0 and engine.admission.rows == 0
        unmeasured(engine)
        chat = httpx.post(f"{live}/v1/chat/completions", timeout=30, json={
            "model": "gen-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "timeout": 0.2})
    assert chat.status_code == 504 and "deadline of 0.2 s" in chat.json()["error"]["message"]


def test_the_servers_timeout_applies_and_a_request_cannot_raise_it(tiny_settings, engine, store):
    from server.api import create_app

    settings = tiny_settings.model_copy(update={"adapters_dir": store, "request_timeout_s": 0.2})
    with serve_in_thread(create_app(settings, engine=engine)) as url, slowed(engine, 0.01):
        unmeasured(engine)  # admitted: the deadline, not admission, ends it (see above)
        response = httpx.post(f"{url}/predict", json={"inputs": "x", "parameters": LONG, "timeout": 60}, timeout=30)
    assert response.status_code == 504 and "deadline of 0.2 s" in response.json()["detail"]


def test_a_client_that_disconnects_frees_its_row(live, engine):
    body = json.dumps({"inputs": "a long one", "parameters": LONG}).encode()
    with slowed(engine, 0.01):
        with socket.create_connection(("127.0.0.1", int(live.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"POST /predict?adapter=gen-a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: engine.runner.decoding == 1, what="the row decoding")
        started = time.monotonic()
        wait_until(lambda: engine.runner.decoding == 0 and engine.admission.rows == 0, seconds=1,
                   what="the row gone")
    assert time.monotonic() - started < 0.5  # 200 steps would take over 2 s


# ---- failures mid-stream ----------------------------------------------------------------------------------------


@contextmanager
def failing_after(engine, steps: int):
    """Decode steps fail with a torch-style RuntimeError once `steps` have run."""
    runner = engine.runner
    real = runner._step
    count = 0

    def step(batch):
        nonlocal count
        count += 1
        if count > steps:
            raise RuntimeError("CUDA-like failure in the middle of a stream")
        return real(batch)

    runner._step = step  # read by the worker at each step
    try:
        yield
    finally:
        del runner._step


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines.get("event"), lines["data"]))
    return events


def test_a_torch_error_mid_stream_ends_it_with_an_error_event(live, engine, logged):
    with failing_after(engine, 3):
        response = httpx.post(f"{live}/predict?adapter=gen-a", timeout=30, headers={"X-Request-Id": "stream-1"},
                              json={"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": 50}})
    assert response.status_code == 200 and response.headers["X-Request-Id"] == "stream-1"
    events = sse_events(response)
    assert {name for name, _ in events[:-1]} <= {"delta"} and len(events) >= 2
    name, data = events[-1]
    assert name == "error"
    assert json.loads(data) == {"status": 500, "detail": "internal error (request id stream-1)"}
    failures = [r for r in logged.records if r.getMessage() == "stream failed"]
    assert len(failures) == 1 and failures[0].request_id == "stream-1"
    assert failures[0].exc_info[1].args == ("CUDA-like failure in the middle of a stream",)


def test_a_torch_error_mid_stream_on_the_openai_route_sends_an_error_chunk_then_done(live, engine):
    with failing_after(engine, 3):
        response = httpx.post(f"{live}/v1/completions", timeout=30, json={
            "model": "gen-a", "prompt": "hello", "stream": True, "max_tokens": 50, "temperature": 0})
    events = [data for _, data in sse_events(response)]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error"
    assert error["message"] == f"internal error (request id {response.headers['X-Request-Id']})"
    assert all("choices" in json.loads(data) for data in events[:-2]) and len(events) >= 3


def test_an_error_before_the_first_byte_is_a_500_with_the_request_id(live, engine):
    with failing_after(engine, 0):
        response = httpx.post(f"{live}/predict?adapter=sentiment", json={"inputs": "fine"})  # no decode step
        assert response.status_code == 200
        response = httpx.post(f"{live}/predict", json={"inputs": "x"}, headers={"X-Request-Id": "oops-7"}, timeout=30)
        assert response.status_code == 500 and response.headers["X-Request-Id"] == "oops-7"
        assert response.json() == {"detail": "internal error (request id oops-7)"}
        response = httpx.post(f"{live}/v1/completions", json={"model": "gen-a", "prompt": "x", "max_tokens": 5},
                              headers={"X-Request-Id": "oops-8"}, timeout=30)
        assert response.status_code == 500
        assert response.json()["error"] == {"message": "internal error (request id oops-8)", "type": "server_error",
                                            "param": None, "code": None}


# ---- request ids and host paths ---------------------------------------------------------------------------------


def test_every_response_carries_a_request_id_and_every_log_line_names_it(client, logged):
    logged.set_level(logging.DEBUG, logger="server.requests")  # /health polls are logged at debug
    given = client.get("/health", headers={"X-Request-Id": "probe-42"})
    assert given.headers["X-Request-Id"] == "probe-42"
    fresh = client.post("/predict?adapter=nope", json={"inputs": "x"})
    assert fresh.status_code == 404 and len(fresh.headers["X-Request-Id"]) == 32
    for bad in ("é".encode() * 3, b"x" * 129, b"a\tb"):
        replaced = client.get("/health", headers={"X-Request-Id": bad})
        assert len(replaced.headers["X-Request-Id"]) == 32
    lines = {r.request_id: r for r in logged.records if r.name == "server.requests"}
    assert lines["probe-42"].path == "/health"
    assert lines[fresh.headers["X-Request-Id"]].status == 404


def test_no_response_names_a_host_path(admin, store, tiny_base, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    admin.post("/v1/files", data={"purpose": "fine-tune"},
               files={"file": ("d.jsonl", b'{"prompt": "a", "completion": "b"}\n', "application/jsonl")})
    bodies = [
        admin.get(path).text
        for path in ("/health", "/adapters", "/adapters/sentiment", "/adapters/sentiment/metadata", "/v1/models",
                     "/v1/files", "/v1/fine_tuning/jobs", "/openapi.json")
    ]
    bodies.append(admin.post("/adapters", data={"name": "broken"}, files=[
        ("files", ("adapter_config.json", b"{not json", "application/json"))]).text)
    bodies.append(admin.get("/adapters/sentiment/training.png").text)
    bodies.append(admin.post("/predict?adapter=sentiment", json={"inputs": "x" * 5000}).text)
    health = admin.get("/health").json()
    assert "path" not in health["base"]
    for body in bodies:
        for path in (str(store), str(tiny_base), str(Path.home()), "/tmp/"):
            assert path not in body, body[:300]


# ---- graceful drain ---------------------------------------------------------------------------------------------


def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_0(tiny_base, adapter_store, engine, tmp_path):
    """Three streamed requests, one decoding and two queued behind it (batch size 1), when SIGTERM comes."""
    store = tmp_path / "store"
    shutil.copytree(adapter_store / "gen-a", store / "gen-a")
    log_path = tmp_path / "server.log"
    prompts = [f"drain story {i}" for i in range(3)]
    flags = ("--num-threads", "1", "--max-batch-size", "1", "--drain-timeout-s", "60")
    with server_process(tiny_base, store, log_path, *flags) as (url, process), ThreadPoolExecutor(3) as pool:
        streams = [
            pool.submit(httpx.post, f"{url}/predict?adapter=gen-a", timeout=120,
                        json={"inputs": prompt, "stream": True, "parameters": LONG})
            for prompt in prompts
        ]
        wait_until(lambda: "loraswap_admitted_rows 3.0" in httpx.get(f"{url}/metrics").text, what="3 admitted")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, what="draining")
        assert httpx.get(f"{url}/health").json() == {"status": "draining"}
        refused = httpx.post(f"{url}/predict?adapter=gen-a", json={"inputs": "new"})
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        assert not all(stream.done() for stream in streams), "the requests ended before the drain was seen"
        answers = [stream.result() for stream in streams]
        assert process.wait(timeout=60) == 0, log_path.read_text()
    for prompt, answer in zip(prompts, answers):
        assert answer.status_code == 200
        name, data = sse_events(answer)[-1]
        assert name == "result"
        assert json.loads(data)["outputs"][0]["token_ids"] == lone_ids(engine, adapter_store, "gen-a", prompt, 200)
    assert "drained: every request in flight has been answered" in log_path.read_text()
