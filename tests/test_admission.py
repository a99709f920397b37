"""Admission (server/admission.py) without a model: the share one request may hold, the memory bounds, and the
time rule (estimated wait from the work ahead and the measured cost of forwards); then a burst against a real
server, whose answers all come in time or as 429 with Retry-After."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.admission import AdmissionGate, WorkCosts
from server.errors import InvalidInput, Overloaded


def test_one_request_may_hold_at_most_its_share():
    gate = AdmissionGate(max_rows=100, max_tokens=1000, max_request_share=0.25)
    gate.reserve(25, 250).release()
    with pytest.raises(InvalidInput, match=r"26 rows: one request may hold at most 25 \(max_request_share 0.25 of "
                                           r"max_rows_in_flight 100\)"):
        gate.reserve(26, 10)
    with pytest.raises(InvalidInput, match=r"may hold 251 tokens .* at most 250 \(max_request_share 0.25 of "
                                           r"max_tokens_in_flight 1000\)"):
        gate.reserve(1, 251)
    assert gate.rows == 0 and gate.tokens == 0


def test_the_wait_follows_the_scheduler_turns():
    costs = WorkCosts(budget=100, max_rows=4)
    costs.observe("encode", 1.0, 100)  # 10 ms a token
    costs.observe("long", 2.0, 100)  # 20 ms a token
    costs.observe("generate", 0.05)  # 50 ms a decode step of up to 4 rows
    # 40 tokens to generate: 10 steps of 4 rows, 50 ms each
    assert costs.wait_s({"encode": 0, "long": 0, "generate": 40}, {"generate"}) == pytest.approx(0.5)
    # a short classification behind a long row in chunks: one turn (a chunk of 100 tokens and its own forward)
    pending = {"encode": 20, "long": 10_000, "generate": 0}
    assert costs.wait_s(pending, {"encode"}) == pytest.approx(2.0 + 0.2)
    # another long row waits for the whole long lane: 100 turns
    assert costs.wait_s(pending, {"long"}) == pytest.approx(100 * 2.2)
    costs.observe("generate", 0.15)  # a moving average: 50 ms + 0.2 x 100 ms
    assert costs.seconds["generate"] == pytest.approx(0.07)


def test_a_request_that_could_not_start_or_finish_in_time_gets_429_with_what_it_is_short_of():
    costs = WorkCosts(budget=100, max_rows=4)
    costs.observe("generate", 0.1)
    gate = AdmissionGate(max_rows=1000, max_tokens=10**6, wait_share=0.5)

    def generation(tokens: int, time_left_s: float):
        return gate.reserve(1, 10, {"generate": tokens}, time_left_s=time_left_s, costs=costs, steps=tokens)

    first = gate.reserve(4, 100, {"generate": 200}, time_left_s=60, costs=costs, steps=50)  # nothing ahead
    assert gate.pending["generate"] == 200
    # 200 tokens ahead: 50 steps of 0.1 s = 5 s of waiting, then 10 steps of its own: answered in about 6 s
    generation(10, time_left_s=20).release()
    with pytest.raises(Overloaded, match=r"wait about 5 s for the work ahead of it and be answered in about 6 s; it "
                                         r"may wait 4 s \(wait_share 0.5\) and must be answered within the 8 s "
                                         r"before its deadline; retry in 1 s") as refused:
        generation(10, time_left_s=8)  # may wait only 4 s
    assert refused.value.headers == {"Retry-After": "1"}
    with pytest.raises(Overloaded) as refused:
        generation(10, time_left_s=2)
    assert refused.value.headers == {"Retry-After": "4"}  # 4 s too much waiting, answered 4 s late
    with pytest.raises(Overloaded) as refused:
        generation(100, time_left_s=12)  # starts in time (5 s of 6), but its own 100 steps end at 15 s
    assert refused.value.headers == {"Retry-After": "3"}
    # work done is no longer ahead; release frees the rest
    first.progress("generate", 150)
    assert gate.pending["generate"] == 50
    generation(10, time_left_s=3).release()  # waits 1.3 s of 1.5 allowed, answered at 2.3 s
    first.release()
    assert gate.pending == {"encode": 0, "long": 0, "generate": 0} and gate.rows == 0 and gate.tokens == 0


def test_without_a_deadline_or_a_measure_there_is_no_time_rule():
    gate = AdmissionGate(max_rows=1000, max_tokens=10**6)
    gate.reserve(1, 10, {"generate": 10**6}, time_left_s=None, costs=WorkCosts(100, 4))
    gate.reserve(1, 10, {"generate": 10}, time_left_s=0.001, costs=WorkCosts(100, 4))  # nothing measured yet


# ---- a burst on a real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(tiny_settings):
    """Its own engine (its cost estimates are its own), each forward 20 ms slower, on a real uvicorn server."""
    from server.api import create_app
    from server.engine import Engine
    from tests.helpers import serve_in_thread

    settings = tiny_settings.model_copy(update={"max_batch_size": 4})
    engine = Engine.from_settings(settings)
    layer = next(iter(engine.layers.values()))
    engine.runner.call(lambda: layer.register_forward_pre_hook(lambda *_: time.sleep(0.02)))
    with serve_in_thread(create_app(settings, engine=engine)) as url:
        yield url, engine
    engine.close()


def test_a_burst_gets_answers_in_time_or_429_never_a_late_answer(slow_server):
    url, engine = slow_server
    body = {"inputs": "count", "parameters": {"max_new_tokens": 20}, "timeout": 2.0}
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/predict", json=body).status_code == 200  # the slow forwards are measured
        limits = httpx.Limits(max_connections=40)
        with httpx.Client(base_url=url, timeout=30, limits=limits) as burst, ThreadPoolExecutor(40) as pool:
            responses = list(pool.map(lambda _: burst.post("/predict", json=body), range(40)))
    statuses = [r.status_code for r in responses]
    # 40 x 20 tokens at 4 rows per 20+ ms step: over 4 s of work; each may wait 1 s (half its 2 s deadline)
    assert set(statuses) <= {200, 429}, statuses  # no 504: nobody admitted was left to time out
    assert statuses.count(200) >= 4 and statuses.count(429) >= 10, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert "before its deadline" in refused[0].json()["detail"]
    assert engine.admission.pending["generate"] == 0 and engine.admission.rows == 0
