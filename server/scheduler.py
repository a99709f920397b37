"""The step plan: which work the engine's next turn runs. No torch here (tests/test_scheduler.py runs it on plain
jobs, without a model).

Each turn runs, in order: the control jobs queued (adapter installs, merges), at most one chunk of the one long row
in progress, one forward of classification/embedding rows, one prefill forward of new generation rows, and one
decode step over the rows generating. Every forward holds at most `max_tokens` tokens (padding included: rows x
width) and `max_rows` rows, so no request makes the others wait longer than one bounded forward:
- rows are taken from the queues in order (each queue first in, first out), a request's rows possibly spread over
  several turns; rows of generation requests also count the rows decoding against `max_rows`;
- scored prompts (echo) that share most of their tokens count those once: one that begins with a prompt just scored
  (`cached`: server/prefixes.py) runs only its own last tokens, and one that shares them with an earlier prompt of
  the same forward rides in that one's row (pack), so that lm-eval's choices of a question, which differ in their
  last tokens only, run in one row as its own `hf` model runs them once;
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


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts have in common."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


@dataclass(frozen=True)
class Prompt:
    """What decides whether one prompt can take another's first tokens (server/prefixes.py)."""

    slot_index: int
    ids: list[int]
    echo_top: int | None  # the top-n of its prompt logprobs; None: not scored (no echo), it never shares

    @classmethod
    def of(cls, piece: Piece) -> Prompt:
        """A whole row of a generation job."""
        params = piece.job.params
        return cls(piece.job.slot_index, piece.ids, (params.logprobs or 0) if params.prompt_logprobs else None)

    def shared_with(self, source: Prompt) -> int:
        """How many of its first tokens this prompt takes from `source` (0: none): both scored with the same top-n
        (it takes the source's prompt logprobs too), never its last token (it runs, for the logits of the answer's
        first token), and only when more than half of its tokens are shared (worth running apart)."""
        if self.echo_top is None or (source.slot_index, source.echo_top) != (self.slot_index, self.echo_top):
            return 0
        shared = min(common_length(source.ids, self.ids), len(self.ids) - 1)
        return shared if 2 * shared > len(self.ids) else 0


def pack(pieces: list[Piece]) -> list[list[Piece]]:
    """Whole generation rows as the rows of one prefill forward: a prompt that shares most of its tokens with an
    earlier one (Prompt.shared_with) rides in that one's row, adding only its own last tokens (server/runner.py);
    each group its first prompt first, in order."""
    groups: list[list[Piece]] = []
    for piece in pieces:
        prompt = Prompt.of(piece)
        shares = [(prompt.shared_with(Prompt.of(group[0])), group) for group in groups]
        shared, group = max(shares, key=lambda pair: pair[0], default=(0, None))
        if shared:
            group.append(piece)
        else:
            groups.append([piece])
    return groups


def packed_width(group: list[Piece]) -> int:
    """Tokens of a prefill row that holds a group of pack(): the first prompt's, then each other's own last ones."""
    first = Prompt.of(group[0])
    return len(first.ids) + sum(len(piece.ids) - Prompt.of(piece).shared_with(first) for piece in group[1:])


def prefill_tokens(pieces: list[Piece], cached: Callable[[Piece], int]) -> int:
    """The largest forward the runner makes of these new prompts (rows x width): those whose first tokens a prompt
    just scored lends them (`cached`), one forward per number of tokens they run; the others packed (pack) in one."""
    reusing: dict[int, int] = {}  # tokens each runs -> rows
    rest = []
    for piece in pieces:
        if shared := cached(piece):
            reusing[len(piece.ids) - shared] = reusing.get(len(piece.ids) - shared, 0) + 1
        else:
            rest.append(piece)
    groups = pack(rest)
    forwards = [rows * tokens for tokens, rows in reusing.items()]
    return max([*forwards, len(groups) * max((packed_width(group) for group in groups), default=0)])


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


def padded_tokens(pieces: list[Piece]) -> int:
    """A forward over these rows, right- or left-padded: rows x the widest."""
    return len(pieces) * max(len(piece.ids) for piece in pieces)


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
        self.cached = cached or (lambda job, row: 0)
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
        known: dict[tuple[int, int], int] = {}  # what self.cached said of each row this turn

        def cached(piece: Piece) -> int:
            key = (id(piece.job), piece.row)
            if key not in known:
                known[key] = self.cached(piece.job, piece.row)
            return known[key]

        room = self.max_rows - decoding
        plan.prefill = self._take(self.generate, room, lambda pieces: prefill_tokens(pieces, cached))
        return plan

    def take_encode(self) -> list[Piece]:
        """Classification and embedding rows for one forward (also between a prefill and the decode step)."""
        return self._take(self.encode, self.max_rows, padded_tokens)

    def _is_long(self, job: RowJob) -> bool:
        return self.chunkable and len(job.rows[job.taken]) > self.max_tokens

    def _take(self, queue: list, room: int, tokens: Callable[[list[Piece]], int]) -> list[Piece]:
        """Whole rows from the queue in order: at most `room` rows, and forwards of at most max_tokens tokens
        (`tokens`: the largest forward the runner makes of the rows taken); a job whose next row is long is skipped
        (the long lane takes it), the jobs behind it are not."""
        pieces: list[Piece] = []
        for job in list(queue):
            while job.taken < len(job.rows) and not self._is_long(job) and len(pieces) < room:
                piece = Piece(job, job.taken, 0, len(job.rows[job.taken]))
                if pieces and tokens([*pieces, piece]) > self.max_tokens:
                    return pieces
                pieces.append(piece)
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
