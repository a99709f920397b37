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


def test_the_estimates_follow_the_scheduler_turns():
    costs = WorkCosts(budget=100, max_rows=4)
    costs.observe("encode", 1.0, 100)  # 10 ms a token
    costs.observe("long", 2.0, 100)  # 20 ms a token
    costs.observe_step(1, 0.02)  # a decode step: 20 ms with one row, 50 ms with four
    costs.observe_step(4, 0.05)
    assert costs.step_s(2) == pytest.approx(0.03) and costs.step_s(9) == pytest.approx(0.05)
    idle = {"encode": 0, "prefill": 0, "long": 0, "generate": 0}
    # a generation row while the batch is full (4 rows, 40 tokens to go): 10 full steps before it has room
    full = costs.estimate({**idle, "generate": 40}, 4, {"generate": 10}, rows=1, steps=10)
    assert (full.wait_s, full.answer_s, full.alone_s) == pytest.approx((0.5, 1.0, 0.2))
    # with room in the batch it starts at once, its steps shared with the two rows there
    room = costs.estimate({**idle, "generate": 40}, 2, {"generate": 10}, rows=1, steps=10)
    assert (room.wait_s, room.answer_s) == pytest.approx((0.0, 0.4))
    # a short classification behind a long row in chunks: one turn (a chunk of 100 tokens and its own forward)
    pending = {**idle, "encode": 20, "long": 10_000}
    short = costs.estimate(pending, 0, {"encode": 5}, rows=1, steps=0)
    assert (short.wait_s, short.answer_s, short.alone_s) == pytest.approx((2.2, 2.25, 0.05))
    # another long row waits for the whole long lane: 100 turns
    assert costs.estimate(pending, 0, {"long": 8000}, rows=1, steps=0).wait_s == pytest.approx(100 * 2.2)
    costs.observe_step(4, 0.15)  # a moving average: 50 ms + 0.2 x 100 ms
    assert costs.step_s(4) == pytest.approx(0.07)


def test_a_request_that_could_not_start_or_finish_in_time_gets_429_with_what_it_is_short_of():
    costs = WorkCosts(budget=100, max_rows=4)
    costs.observe_step(4, 0.1)  # every decode step: 0.1 s
    gate = AdmissionGate(max_rows=1000, max_tokens=10**6, wait_share=0.5)

    def generation(tokens: int, time_left_s: float):
        return gate.reserve(1, 10, {"generate": tokens}, time_left_s=time_left_s, costs=costs, steps=tokens)

    first = gate.reserve(4, 100, {"generate": 200}, time_left_s=60, costs=costs, steps=50)  # nothing ahead
    assert gate.pending["generate"] == 200 and gate.generating == 4
    # the batch is full: 200 tokens ahead, 50 steps of 0.1 s = 5 s of waiting, then 10 steps of its own
    generation(10, time_left_s=20).release()
    with pytest.raises(Overloaded, match=r"wait about 5 s for the work ahead of it and be answered in about 6 s; it "
                                         r"may wait 4 s \(wait_share 0.5\) and must be answered within the 8 s "
                                         r"before its deadline; retry in 1 s") as refused:
        generation(10, time_left_s=8)  # may wait only 4 s
    assert refused.value.headers == {"Retry-After": "1"}
    with pytest.raises(Overloaded) as refused:
        generation(10, time_left_s=2)
    assert refused.value.headers == {"Retry-After": "5"}  # answered at 6 s, of which 1 s is its own work
    with pytest.raises(Overloaded) as refused:
        generation(100, time_left_s=12)  # starts in time (5 s of 6), but its own 100 steps end at 15 s
    assert refused.value.headers == {"Retry-After": "5"}  # once the 5 s of work ahead is done, it would fit
    with pytest.raises(InvalidInput, match=r"inputs: the request needs about 20 s of work at the engine's measured "
                                           r"speed, more than the 12 s before its deadline"):
        generation(200, time_left_s=12)  # 200 steps of its own: not even on an idle engine
    # work done is no longer ahead; release frees the rest
    first.progress("generate", 150)
    assert gate.pending["generate"] == 50
    generation(10, time_left_s=3).release()  # waits 1.3 s of 1.5 allowed, answered at 2.3 s
    first.release()
    assert gate.pending == {"encode": 0, "prefill": 0, "long": 0, "generate": 0}
    assert gate.rows == gate.tokens == gate.generating == 0


def test_without_a_deadline_or_a_measure_there_is_no_time_rule():
    gate = AdmissionGate(max_rows=1000, max_tokens=10**6)
    gate.reserve(1, 10, {"generate": 10**6}, time_left_s=None, costs=WorkCosts(100, 4))
    gate.reserve(1, 10, {"generate": 10}, time_left_s=0.001, costs=WorkCosts(100, 4))  # nothing measured yet


# ---- a burst on a real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(tiny_settings):
    """Its own engine (its cost estimates are its own), each forward 20 ms slower, on a real uvicorn server; a
    request may wait a quarter of its time (headroom for the noise of a shared machine)."""
    from server.api import create_app
    from server.engine import Engine
    from tests.helpers import serve_in_thread

    settings = tiny_settings.model_copy(update={"max_batch_size": 4, "admission_wait_share": 0.25})
    engine = Engine.from_settings(settings)
    layer = next(iter(engine.layers.values()))
    engine.runner.call(lambda: layer.register_forward_pre_hook(lambda *_: time.sleep(0.02)))
    with serve_in_thread(create_app(settings, engine=engine)) as url:
        yield url, engine
    engine.close()


def test_a_burst_gets_answers_in_time_or_429_never_a_late_answer(slow_server):
    url, engine = slow_server
    body = {"inputs": "count", "parameters": {"max_new_tokens": 20}, "timeout": 3.0}
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/predict", json=body).status_code == 200  # the slow forwards are measured
        limits = httpx.Limits(max_connections=40)
        with httpx.Client(base_url=url, timeout=30, limits=limits) as burst, ThreadPoolExecutor(40) as pool:
            responses = list(pool.map(lambda _: burst.post("/predict", json=body), range(40)))
    statuses = [r.status_code for r in responses]
    # 40 x 20 tokens at 4 rows per 20+ ms step: over 4 s of work; each may wait 0.75 s (a quarter of its 3 s)
    assert set(statuses) <= {200, 429}, statuses  # no 504: nobody admitted was left to time out
    assert statuses.count(200) >= 4 and statuses.count(429) >= 10, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert "before its deadline" in refused[0].json()["detail"]
    assert engine.admission.pending["generate"] == 0 and engine.admission.rows == 0


def test_a_generation_request_pays_for_its_prompt_and_waits_for_the_prefill_queue():
    costs = WorkCosts(budget=100, max_rows=4)
    costs.observe("prefill", 1.0, 100)  # 10 ms a token
    costs.observe_step(1, 0.02)
    idle = {"encode": 0, "prefill": 0, "long": 0, "generate": 0}
    alone = costs.estimate(idle, 0, {"prefill": 30, "generate": 10}, rows=1, steps=10)
    assert (alone.wait_s, alone.answer_s, alone.alone_s) == pytest.approx((0.0, 0.5, 0.5))
    # 250 prompt tokens queued ahead: three prefill forwards of up to 100 tokens (1 s each) before its own
    queued = costs.estimate({**idle, "prefill": 250}, 0, {"prefill": 30, "generate": 10}, rows=1, steps=10)
    assert queued.wait_s == pytest.approx(3.0)
