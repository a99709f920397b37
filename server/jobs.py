"""What callers queue for the engine's worker thread, and how a job is answered. No torch here: the scheduler
(server/scheduler.py) plans with these, and its tests run without a model.

A job's rows (its inputs) are taken by the scheduler in order, `taken` counting those handed to a forward; a row may
run as one piece (a whole row) or, when longer than the token budget of a forward, as several chunks. A job is
answered once its last row is done, or at once when it fails, its deadline passes or its client leaves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

from .admission import Ticket
from .errors import ClientDisconnected
from .request_context import RequestContext, current_request
from .slots import Slot
from .types import ClassificationResult, EmbeddingResult, GenerationParams, GenerationResult, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class ControlJob:
    """A change to the model (install, clear, merge) or any call that must run on the worker, alone and in order."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


@dataclass
class ClassifyJob:
    rows: list[list[int]]  # token ids per input
    slot: Slot
    future: Future = field(default_factory=Future)  # -> list[ClassificationResult]
    enqueued: float = field(default_factory=time.perf_counter)
    request: RequestContext = field(default_factory=current_request)  # its id, deadline and client
    ticket: Ticket | None = None  # its admission: the work it has left is reported to it
    taken: int = 0  # rows handed to a forward so far (the scheduler's cursor)
    results: list[ClassificationResult | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)

    @property
    def slot_index(self) -> int:
        return self.slot.index


@dataclass
class EmbedJob:
    """Embeddings: the body's last hidden state, mean-pooled over each input's tokens and L2-normalized. They run
    in the classification forward (same right padding, no LM head), so the two batch together."""

    rows: list[list[int]]  # token ids per input
    slot_index: int  # BASE_SLOT: the base itself
    future: Future = field(default_factory=Future)  # -> list[EmbeddingResult]
    enqueued: float = field(default_factory=time.perf_counter)
    request: RequestContext = field(default_factory=current_request)
    ticket: Ticket | None = None  # its admission: the work it has left is reported to it
    taken: int = 0
    results: list[EmbeddingResult | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)


@dataclass
class GenerateJob:
    prompts: list[list[int]]  # token ids per input: each becomes one row of the decode batch
    slot_index: int
    params: GenerationParams
    stream: Queue[int | None] | None = None  # a streamed request's new token ids, one per step (None: it ended)
    future: Future = field(default_factory=Future)  # -> list[GenerationResult]; cancel() frees its rows
    enqueued: float = field(default_factory=time.perf_counter)
    request: RequestContext = field(default_factory=current_request)
    ticket: Ticket | None = None  # its admission: the work it has left is reported to it
    taken: int = 0
    results: list[GenerationResult | None] = field(default_factory=list)
    # per prompt, when params ask: the generated tokens' logprobs, EOS's included (each is added before its token
    # goes to the stream), and the prompt's own (from the prefill)
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    prompt_logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.prompts)
        self.logprobs = [[] for _ in self.prompts]
        self.prompt_logprobs = [None] * len(self.prompts)

    @property
    def rows(self) -> list[list[int]]:
        return self.prompts


RowJob = ClassifyJob | EmbedJob | GenerateJob


def end_if_abandoned(job: RowJob) -> bool:
    """Answer a job whose deadline passed (DeadlineExceeded) or whose client went away; True if it has ended."""
    if not job.future.done():
        if job.request.client_gone.is_set():
            settle(job.future, error=ClientDisconnected("the client disconnected"))
        elif job.request.expired():
            log.info("request past its deadline of %g s leaves", job.request.timeout_s,
                     extra={"request_id": job.request.request_id})
            settle(job.future, error=job.request.deadline_error())
    return job.future.done()


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a future unless its caller cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def progress(job: RowJob, lane: str, amount: float) -> None:
    """Work done for a job, for the admission gate's estimate of the work ahead (server/admission.py)."""
    if job.ticket is not None:
        job.ticket.progress(lane, amount)


def row_done(job: ClassifyJob | EmbedJob, row: int, result: ClassificationResult | EmbeddingResult) -> None:
    """One row's answer; the job is answered with its last."""
    job.results[row] = result
    if all(r is not None for r in job.results):
        settle(job.future, job.results)
