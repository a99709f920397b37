"""The step plan: which work the engine's next turn runs. No torch here (tests/test_scheduler.py runs it on plain
jobs, without a model).

Each turn runs, in order: the control jobs queued (adapter installs, merges), at most one chunk of the one long row
in progress, one forward of classification/embedding rows, one prefill forward of new generation rows, and one
decode step over the rows generating. Every forward holds at most `max_tokens` tokens (padding included: rows x
width) and `max_rows` rows, so no request makes the others wait longer than one bounded forward:
- rows are taken from the queues in order (each queue first in, first out), a request's rows possibly spread over
  several turns; rows of generation requests also count the rows decoding against `max_rows`;
- a scored prompt that begins with one just scored (`cached`: server/prefixes.py) counts only the tokens it runs,
  so that lm-eval's other choices of a question, which differ from the first in their last tokens, share a forward;
- a row longer than `max_tokens` (on a decoder, whose causal attention lets a row run in pieces through its KV
  cache) becomes the long row: it runs one chunk of at most `max_tokens` tokens per turn, while the rest of the
  queues and the decode batch go on around it; its request's later rows wait for it, other requests do not. A chunk
  attends to every position before it, which costs more than the chunk's own tokens deep into a long row
  (`context_weight`: 1/3,072 per position on SmolLM2, so at 7,000 tokens a chunk costs 3.3 times its tokens):
  there chunks are shorter, so that each turn stays as long as one of `max_tokens` tokens;
- on an encoder (bidirectional attention: a row cannot be cut) a longer row runs whole, alone in its forward;
- static batching (`continuous=False`, kept to measure against) takes no new work while rows decode.
Between turns the runner's loop sees deadlines, departed clients and shutdown, so they take effect after at most
one bounded forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .jobs import ClassifyJob, ControlJob, EmbedJob, GenerateJob, RowJob, end_if_abandoned


@dataclass(frozen=True)
class Piece:
    """Tokens [start, stop) of one row of a job: a whole row, or one chunk of a long row."""

    job: RowJob
    row: int
    start: int
    stop: int

    @property
    def ids(self) -> list[int]:
        return self.job.rows[self.row][self.start : self.stop]

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.last

    @property
    def last(self) -> bool:
        """The row's last piece: its answer (a class, an embedding, a first token) comes with it."""
        return self.stop == len(self.job.rows[self.row])


@dataclass
class StepPlan:
    controls: list[ControlJob] = field(default_factory=list)
    chunk: Piece | None = None  # the next chunk of the long row, through its own KV cache
    encode: list[Piece] = field(default_factory=list)  # whole rows of classification and embedding jobs
    prefill: list[Piece] = field(default_factory=list)  # whole prompts; each row then joins the decode batch
    decode: bool = False  # a decode step over the rows generating


def whole_rows(jobs: list[RowJob]) -> list[Piece]:
    """Every row of these jobs as one piece each (marked taken): they run in one forward."""
    pieces = []
    for job in jobs:
        pieces += [Piece(job, i, 0, len(row)) for i, row in enumerate(job.rows)]
        job.taken = len(job.rows)
    return pieces


def lane_work(job: RowJob, max_tokens: int, chunkable: bool) -> dict[str, float]:
    """The work a job brings to each lane of the scheduler (server/admission.py estimates waits with it): tokens
    of short classification/embedding rows ("encode"), of short prompts ("prefill"), of rows run in chunks ("long"),
    and tokens to generate ("generate")."""
    long = sum(len(row) for row in job.rows if chunkable and len(row) > max_tokens)
    short = sum(len(row) for row in job.rows) - long
    if isinstance(job, GenerateJob):
        return {"prefill": short, "long": long, "generate": len(job.rows) * job.params.max_new_tokens}
    return {"encode": short, "long": long}


def nothing_cached(job: RowJob, row: int) -> int:
    return 0


class Scheduler:
    """The queues of jobs waiting for the worker and the long row in progress. Not thread-safe: the runner calls
    it under its lock."""

    def __init__(self, max_rows: int, max_tokens: int, continuous: bool = True, chunkable: bool = True,
                 context_weight: float = 0.0, cached: Callable[[GenerateJob, int], int] | None = None):
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.continuous = continuous
        self.chunkable = chunkable  # a decoder: a row can run in chunks through its KV cache
        # what attending to one earlier position costs, in tokens' worth of the rest of the forward: a chunk deep in
        # a long row is shortened so that it costs no more than `max_tokens` tokens at its start
        self.context_weight = context_weight
        # how many first tokens of a generation row (job, index) the runner holds from a prompt it just scored
        self.cached = cached or nothing_cached
        self.controls: list[ControlJob] = []
        self.encode: list[ClassifyJob | EmbedJob] = []
        self.generate: list[GenerateJob] = []
        self.long: Piece | None = None  # the long row's latest chunk (planned, maybe not yet run)

    def work(self, job: RowJob) -> dict[str, float]:
        return lane_work(job, self.max_tokens, self.chunkable)

    def add(self, job: ControlJob | RowJob) -> None:
        queue = self.controls if isinstance(job, ControlJob) else self.generate if isinstance(job, GenerateJob) \
            else self.encode
        queue.append(job)

    def depth(self) -> int:
        """Requests waiting (a request whose rows are all taken no longer waits)."""
        return len(self.controls) + len(self.encode) + len(self.generate)

    def queued_rows(self) -> int:
        return sum(len(job.rows) - job.taken for job in (*self.encode, *self.generate))

    def oldest(self) -> float | None:
        """When the oldest queued request arrived (time.perf_counter), if any."""
        return min((job.enqueued for job in (*self.encode, *self.generate)), default=None)

    def has_work(self) -> bool:
        return bool(self.controls or self.encode or self.generate or self.long)

    def sweep(self) -> None:
        """Requests past their deadline or left by their client leave the queues, and the long row with them."""
        self.encode = [job for job in self.encode if not end_if_abandoned(job)]
        self.generate = [job for job in self.generate if not end_if_abandoned(job)]
        if self.long is not None and end_if_abandoned(self.long.job):
            self.long = None

    def abandon_all(self) -> list[RowJob]:
        """Empty the queues and the long row (shutdown); the jobs that were there."""
        jobs = [*self.encode, *self.generate, *([self.long.job] if self.long else [])]
        self.encode, self.generate, self.long = [], [], None
        return jobs

    def plan(self, decoding: int) -> StepPlan:
        """The next turn's work; `decoding`: rows in the decode batch now."""
        self.sweep()
        plan = StepPlan(controls=self.controls, decode=decoding > 0)
        self.controls = []
        if decoding and not self.continuous:
            return plan
        plan.chunk = self._next_chunk(decoding)
        plan.encode = self.take_encode()
        plan.prefill = self._take(self.generate, room=self.max_rows - decoding, cached=self.cached)
        return plan

    def take_encode(self) -> list[Piece]:
        """Classification and embedding rows for one forward (also between a prefill and the decode step)."""
        return self._take(self.encode, room=self.max_rows)

    def _is_long(self, job: RowJob) -> bool:
        return self.chunkable and len(job.rows[job.taken]) > self.max_tokens

    def _take(self, queue: list, room: int, cached: Callable[[GenerateJob, int], int] = nothing_cached) -> list[Piece]:
        """Whole rows from the queue in order: at most `room` rows and max_tokens tokens (rows x the widest, a row
        counting the tokens it runs: without its `cached` ones); a job whose next row is long is skipped (the long
        lane takes it), the jobs behind it are not."""
        pieces: list[Piece] = []
        width = 0
        for job in list(queue):
            while job.taken < len(job.rows) and not self._is_long(job) and len(pieces) < room:
                row = job.rows[job.taken]
                wider = max(width, len(row) - cached(job, job.taken))
                if pieces and wider * (len(pieces) + 1) > self.max_tokens:
                    return pieces
                width = wider
                pieces.append(Piece(job, job.taken, 0, len(row)))
                job.taken += 1
            if job.taken == len(job.rows):
                queue.remove(job)
            if len(pieces) >= room:
                break
        return pieces

    def _next_chunk(self, decoding: int) -> Piece | None:
        """The long row's next chunk; a new long row (the earliest request whose next row is long) if none is in
        progress. A generation row starts only while the decode batch has room for it."""
        if self.long is not None and not self.long.last:
            previous = self.long
        else:
            candidates = [job for job in self.encode if job.taken < len(job.rows) and self._is_long(job)]
            if decoding < self.max_rows:
                candidates += [job for job in self.generate if job.taken < len(job.rows) and self._is_long(job)]
            if not candidates:
                self.long = None
                return None
            job = min(candidates, key=lambda j: j.enqueued)
            previous = Piece(job, job.taken, 0, 0)
            job.taken += 1
            if job.taken == len(job.rows):
                (self.generate if isinstance(job, GenerateJob) else self.encode).remove(job)
        length = len(previous.job.rows[previous.row])
        size = max(1, int(self.max_tokens / (1 + self.context_weight * previous.stop)))
        self.long = Piece(previous.job, previous.row, previous.stop, min(previous.stop + size, length))
        return self.long
