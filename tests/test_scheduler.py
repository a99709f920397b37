"""The step plan (server/scheduler.py) on plain jobs, without a model: token and row budgets per forward, chunks of
long rows interleaved with everything else, static batching, abandoned requests. No torch is imported."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from server.jobs import ClassifyJob, ControlJob, EmbedJob, GenerateJob
from server.request_context import RequestContext
from server.scheduler import Scheduler, whole_rows
from server.types import GenerationParams

SLOT = SimpleNamespace(index=1)


def classify(*lengths: int) -> ClassifyJob:
    return ClassifyJob([[7] * n for n in lengths], SLOT, request=RequestContext())


def generate(*lengths: int) -> GenerateJob:
    return GenerateJob([[7] * n for n in lengths], 1, GenerationParams(max_new_tokens=4), request=RequestContext())


def shape(pieces) -> list[tuple[int, int, int, int]]:
    """(which job by id order, row, start, stop) of each piece."""
    return [(piece.job.id, piece.row, piece.start, piece.stop) for piece in pieces]


def numbered(*jobs):
    for i, job in enumerate(jobs):
        job.id = i
    return jobs


def test_the_scheduler_never_imports_torch():
    code = "import sys, server.scheduler, server.jobs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rows_are_taken_in_order_within_the_token_and_row_budgets():
    scheduler = Scheduler(max_rows=4, max_tokens=32)
    a, b, c = numbered(classify(8, 8, 8), classify(10, 2), classify(3))
    for job in (a, b, c):
        scheduler.add(job)
    first = scheduler.plan(decoding=0)
    # rows x width: 8, 16, 24, then b's 10-token row would make 4 x 10 = 40 > 32
    assert shape(first.encode) == [(0, 0, 0, 8), (0, 1, 0, 8), (0, 2, 0, 8)]
    assert scheduler.encode == [b, c] and a.taken == 3
    second = scheduler.plan(decoding=0)
    assert shape(second.encode) == [(1, 0, 0, 10), (1, 1, 0, 2), (2, 0, 0, 3)]
    assert not scheduler.has_work()


def test_generation_rows_count_the_rows_decoding():
    scheduler = Scheduler(max_rows=4, max_tokens=1000)
    a, b = numbered(generate(5, 5, 5), generate(5))
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.plan(decoding=2)
    assert shape(plan.prefill) == [(0, 0, 0, 5), (0, 1, 0, 5)] and plan.decode
    assert scheduler.plan(decoding=4).prefill == []  # the batch is full: nothing joins
    assert shape(scheduler.plan(decoding=2).prefill) == [(0, 2, 0, 5), (1, 0, 0, 5)]


def test_a_prompt_counts_only_the_tokens_it_runs_beside_the_cached_ones():
    """Rows whose first tokens the runner holds from a prompt just scored run their last ones apart, in a forward of
    their own per length: they count so, not at their whole width."""
    held: dict[tuple[int, int], int] = {}  # (job, row) -> first tokens the runner holds
    scheduler = Scheduler(max_rows=16, max_tokens=40, cached=lambda job, row: held.get((job.id, row), 0))
    a, b = numbered(generate(30, 30, 30), generate(30))
    scheduler.add(a)
    scheduler.add(b)
    assert shape(scheduler.plan(decoding=0).prefill) == [(0, 0, 0, 30)]  # 2 rows x 30 > 40
    held.update({(0, 1): 29, (0, 2): 29})  # a's first row has run: it lends its 29 first tokens
    # a's rows: one forward of 2 rows x 1 token; b's row: one of 30
    assert shape(scheduler.plan(decoding=0).prefill) == [(0, 1, 0, 30), (0, 2, 0, 30), (1, 0, 0, 30)]


def test_scored_prompts_that_share_most_of_their_tokens_count_them_once():
    """lm-eval's choices of a question (echo): one packed row, the context once and each choice's own token."""
    scored = GenerationParams(max_new_tokens=1, logprobs=1, prompt_logprobs=True)
    context = [7] * 30
    choices, other = numbered(GenerateJob([context + [1], context + [2], context + [3]], 1, scored,
                                          request=RequestContext()), generate(20))
    scheduler = Scheduler(max_rows=16, max_tokens=40)
    scheduler.add(choices)
    scheduler.add(other)
    assert shape(scheduler.plan(decoding=0).prefill) == [(0, 0, 0, 31), (0, 1, 0, 31), (0, 2, 0, 31)]  # 33 tokens
    assert shape(scheduler.plan(decoding=0).prefill) == [(1, 0, 0, 20)]  # beside them: 2 rows x 33 > 40


def test_a_long_row_runs_in_chunks_while_other_requests_go_on():
    scheduler = Scheduler(max_rows=16, max_tokens=10)
    big, small = numbered(classify(25, 25), classify(4))
    scheduler.add(big)
    plan = scheduler.plan(decoding=0)
    assert shape([plan.chunk]) == [(0, 0, 0, 10)] and plan.encode == []
    scheduler.add(small)
    plan = scheduler.plan(decoding=3)
    assert shape([plan.chunk]) == [(0, 0, 10, 20)]
    assert shape(plan.encode) == [(1, 0, 0, 4)]  # not behind the big request's next row
    assert plan.decode
    assert shape([scheduler.plan(decoding=0).chunk]) == [(0, 0, 20, 25)]
    assert scheduler.long.last
    assert shape([scheduler.plan(decoding=0).chunk]) == [(0, 1, 0, 10)]  # its second row, a new long row
    assert scheduler.encode == []  # all of its rows are taken
    assert [scheduler.plan(decoding=0).chunk.stop for _ in range(2)] == [20, 25]
    assert scheduler.plan(decoding=0).chunk is None and not scheduler.has_work()


def test_long_rows_start_in_arrival_order_and_a_generation_row_needs_room():
    scheduler = Scheduler(max_rows=2, max_tokens=10)
    gen, cls = numbered(generate(30), classify(30))
    scheduler.add(gen)
    scheduler.add(cls)
    assert shape([scheduler.plan(decoding=2).chunk]) == [(1, 0, 0, 10)]  # the decode batch is full: not gen
    scheduler.long = None  # (say it was abandoned)
    cls.taken = 1
    assert shape([scheduler.plan(decoding=1).chunk]) == [(0, 0, 0, 10)]


def test_an_encoder_row_longer_than_the_budget_runs_whole_and_alone():
    scheduler = Scheduler(max_rows=16, max_tokens=10, chunkable=False)
    a, b = numbered(classify(25, 3), classify(3))
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.plan(decoding=0)
    assert plan.chunk is None and shape(plan.encode) == [(0, 0, 0, 25)]
    assert shape(scheduler.plan(decoding=0).encode) == [(0, 1, 0, 3), (1, 0, 0, 3)]


def test_static_batching_takes_nothing_while_rows_decode():
    scheduler = Scheduler(max_rows=16, max_tokens=100, continuous=False)
    job = numbered(classify(3))[0]
    scheduler.add(job)
    control = ControlJob(lambda: None)
    scheduler.add(control)
    plan = scheduler.plan(decoding=2)
    assert plan.controls == [control] and plan.encode == [] and plan.decode
    assert shape(scheduler.plan(decoding=0).encode) == [(0, 0, 0, 3)]


def test_abandoned_requests_leave_the_queues_and_the_long_row():
    scheduler = Scheduler(max_rows=16, max_tokens=10)
    big, gone = numbered(classify(30), EmbedJob([[1, 2]], 0, request=RequestContext()))
    scheduler.add(big)
    scheduler.add(gone)
    gone.request.client_gone.set()
    plan = scheduler.plan(decoding=0)
    assert plan.encode == [] and scheduler.encode == []
    assert gone.future.exception().__class__.__name__ == "ClientDisconnected"
    big.request.timeout_s = 0.0  # its deadline passed mid-row
    plan = scheduler.plan(decoding=0)
    assert plan.chunk is None and scheduler.long is None
    assert big.future.exception().__class__.__name__ == "DeadlineExceeded"


def test_whole_rows_runs_every_row_in_one_forward():
    a, b = numbered(classify(3, 50), generate(2))
    assert shape(whole_rows([a, b])) == [(0, 0, 0, 3), (0, 1, 0, 50), (1, 0, 0, 2)]
    assert a.taken == 2 and b.taken == 1


def test_chunks_deep_in_a_long_row_are_shorter_by_what_their_attention_costs():
    scheduler = Scheduler(max_rows=16, max_tokens=100, context_weight=1 / 100)
    scheduler.add(numbered(classify(400))[0])
    stops = [scheduler.plan(decoding=0).chunk.stop for _ in range(7)]
    # 100 tokens from 0; from 100: 100 / (1 + 1) = 50; from 150: 100 / 2.5 = 40; from 190: 100 / 2.9 = 34 ...
    assert stops == [100, 150, 190, 224, 254, 282, 308]
