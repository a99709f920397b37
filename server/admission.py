"""Admission control: a bound on the work the engine holds, so that a burst is refused at once (429 with
Retry-After) instead of queueing without limit. No torch here.

Three rules, checked when a request is queued (`reserve`), so a refusal costs no model work:
- Size: one request may hold at most `max_request_share` of either bound below (422 naming the limit beyond it:
  retrying would not help).
- Memory: what admitted requests still hold, in rows (inputs) and KV tokens (each generation row's prompt plus the
  most it may generate: what its KV cache can grow to; classification and embedding rows hold no cache). A request
  that would cross either bound is refused, unless nothing else is admitted (a lone request larger than a bound
  would otherwise never run; the encoder's own limits bound it).
- Time: the work admitted requests have left, per lane of the scheduler (server/scheduler.py: short
  classification/embedding rows, long rows in chunks, tokens to generate), and the measured cost of each lane's
  forwards give how long a new request would wait and when it would be answered (`WorkCosts`). A request that
  could not start within `wait_share` of the time left before its deadline, or not be answered before it, is
  refused, with when to come back as its Retry-After (the waiting beyond its share, or the delay the other work
  causes it) instead of timing out. A request whose own work alone would outlast its deadline is a 422 (retrying
  would not help).
The engine also checks the gate before it loads an adapter (`check`: full already?); while the gate is full, the
HTTP edge refuses inference requests before it even parses them (server/api.py, `ShedWhenFull`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from .errors import InvalidInput, Overloaded

# work: tokens read in short classification/embedding rows; in generation prompts (prefill); in rows run in chunks;
# tokens to generate
LANES = ("encode", "prefill", "long", "generate")
TOKEN_LANES = ("encode", "prefill", "long")


@dataclass(frozen=True)
class Estimate:
    wait_s: float  # until the request's first forward: the work ahead of it in its lanes
    answer_s: float  # until its answer: the wait, then its own work beside what else runs each turn
    alone_s: float  # its own work on an idle engine


class WorkCosts:
    """What the engine's forwards cost, as moving averages (written by the engine thread, read by request threads),
    and the waits they imply.

    The model follows the scheduler: every turn runs one chunk of the long row (`budget` tokens), one forward of
    short classification/embedding rows and one prefill forward of new generation rows (up to `budget` tokens
    each) and one decode step (up to `max_rows` rows, a token each), each only while its lane has work. A request waits for as many turns as its own lanes need to clear the
    work ahead of it (a generation row waits only while the decode batch would be full), each turn as long as the
    busy lanes' forwards together; then its own work runs, a decode step per token it may generate, each turn
    still paying for the other busy lanes.
    """

    def __init__(self, budget: int, max_rows: int, smoothing: float = 0.2):
        self.budget = budget
        self.max_rows = max_rows
        self.smoothing = smoothing
        self.seconds: dict[str, float] = {}  # per token, of each kind of forward but the decode step (TOKEN_LANES)
        self.step_seconds: dict[int, float] = {}  # per decode step, by the rows it holds

    def _average(self, table: dict, key: str | int, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else old + self.smoothing * (value - old)

    def observe(self, lane: str, seconds: float, tokens: int) -> None:
        if tokens > 0 and seconds > 0:
            self._average(self.seconds, lane, seconds / tokens)

    def observe_step(self, rows: int, seconds: float) -> None:
        if rows > 0 and seconds > 0:
            self._average(self.step_seconds, rows, seconds)

    def step_s(self, rows: int) -> float:
        """A decode step of this many rows: measured, or between the nearest measured sizes (0: none measured)."""
        if not self.step_seconds or rows <= 0:
            return 0.0
        if rows in self.step_seconds:
            return self.step_seconds[rows]
        below = max((n for n in self.step_seconds if n < rows), default=None)
        above = min((n for n in self.step_seconds if n > rows), default=None)
        if below is None or above is None:
            return self.step_seconds[below if above is None else above]
        low, high = self.step_seconds[below], self.step_seconds[above]
        return low + (high - low) * (rows - below) / (above - below)

    def estimate(self, pending: dict[str, float], generating: int, work: dict[str, float], rows: int,
                 steps: int) -> Estimate:
        """For a request of `rows` rows bringing `work` per lane and up to `steps` decode steps, with `pending` work
        admitted ahead of it and `generating` generation rows admitted."""
        token_s = {lane: self.seconds.get(lane, 0.0) for lane in TOKEN_LANES}
        busy = {lane: min(pending[lane], self.budget) * token_s[lane] for lane in token_s if pending[lane] > 0}
        if generating:
            busy["generate"] = self.step_s(min(generating, self.max_rows))
        turns = 0
        for lane in TOKEN_LANES:
            if work.get(lane):
                turns = max(turns, math.ceil(pending[lane] / self.budget))
        if steps and generating + rows > self.max_rows:
            turns = max(turns, math.ceil(pending["generate"] / self.max_rows))
        wait_s = turns * sum(busy.values())
        own_tokens_s = sum(work.get(lane, 0) * token_s[lane] for lane in token_s)
        others_per_turn = sum(cost for lane, cost in busy.items() if lane != "generate")
        shared_step = self.step_s(min(generating + rows, self.max_rows))
        answer_s = wait_s + own_tokens_s + steps * (shared_step + others_per_turn)
        alone_s = own_tokens_s + steps * self.step_s(min(rows, self.max_rows))
        return Estimate(wait_s, answer_s, alone_s)


@dataclass
class Ticket:
    """What one admitted request holds; progress() as its work is done, release() once it is answered
    (idempotent)."""

    gate: AdmissionGate
    rows: int
    tokens: int
    work: dict[str, float] = field(default_factory=dict)  # per lane, what is left of it
    generating: int = 0  # its generation rows
    released: bool = False

    def progress(self, lane: str, amount: float) -> None:
        self.gate._progress(self, lane, amount)

    def release(self, *_ignored: object) -> None:  # also a Future done-callback
        self.gate._release(self)


class AdmissionGate:
    def __init__(self, max_rows: int, max_tokens: int, retry_after_s: int = 1, max_request_share: float = 1.0,
                 wait_share: float = 0.5):
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.retry_after_s = retry_after_s
        self.max_request_share = max_request_share
        self.wait_share = wait_share
        self.rows = 0  # held by admitted requests
        self.tokens = 0
        self.pending: dict[str, float] = dict.fromkeys(LANES, 0.0)  # work admitted requests have left
        self.generating = 0  # rows of admitted generation requests
        self._lock = threading.Lock()

    def check(self) -> None:
        """Refuse at once if the engine is full already (before any work is done for the request)."""
        with self._lock:
            self._refuse_if_over(1, 1)

    def full(self) -> Overloaded | None:
        """The refusal any new request would get now, if the engine is full (the HTTP edge sheds load with it
        before it parses a request)."""
        try:
            self.check()
        except Overloaded as refusal:
            return refusal
        return None

    def reserve(self, rows: int, tokens: int, work: dict[str, float] | None = None,
                time_left_s: float | None = None, costs: WorkCosts | None = None, steps: int = 0) -> Ticket:
        """Admit a request of `rows` rows holding up to `tokens` KV tokens, with `work` per lane and up to `steps`
        decode steps (a generation request); `time_left_s` before its deadline (None: none) and the engine's
        `costs` for the time rule."""
        work = {lane: amount for lane, amount in (work or {}).items() if amount}
        self._refuse_if_too_large(rows, tokens)
        with self._lock:
            self._refuse_if_over(rows, tokens)
            if time_left_s is not None and costs is not None:
                self._refuse_if_late(costs.estimate(self.pending, self.generating, work, rows, steps), time_left_s)
            self.rows += rows
            self.tokens += tokens
            self.generating += rows if steps else 0
            for lane, amount in work.items():
                self.pending[lane] += amount
        return Ticket(self, rows, tokens, dict(work), generating=rows if steps else 0)

    def _refuse_if_too_large(self, rows: int, tokens: int) -> None:
        share = self.max_request_share
        if share >= 1:  # no share of its own: a request larger than a bound runs when it is alone
            return
        if rows > share * self.max_rows:
            raise InvalidInput("inputs", f"{rows} rows: one request may hold at most {int(share * self.max_rows)} "
                               f"(max_request_share {share:g} of max_rows_in_flight {self.max_rows})")
        if tokens > share * self.max_tokens:
            raise InvalidInput("inputs", f"the request may hold {tokens} tokens (prompts plus max_new_tokens): one "
                               f"request may hold at most {int(share * self.max_tokens)} (max_request_share "
                               f"{share:g} of max_tokens_in_flight {self.max_tokens})")

    def _refuse_if_over(self, rows: int, tokens: int) -> None:
        if self.rows == 0:
            return
        if self.rows + rows > self.max_rows:
            raise Overloaded(f"the server is full: {self.rows} rows in flight, at most {self.max_rows}; retry later",
                             self.retry_after_s)
        if self.tokens + tokens > self.max_tokens:
            raise Overloaded(f"the server is full: {self.tokens} tokens in flight, at most {self.max_tokens}; "
                             "retry later", self.retry_after_s)

    def _refuse_if_late(self, estimate: Estimate, time_left_s: float) -> None:
        """422 if the request's own work outlasts its deadline (retrying would not help); 429 if it could not start
        within wait_share of its time left, or not be answered before its deadline: Retry-After is how much sooner
        the work ahead would have to end, or (answered late) how long the other work delays it."""
        if estimate.alone_s > time_left_s:
            raise InvalidInput("inputs", f"the request needs about {estimate.alone_s:.0f} s of work at the engine's "
                               f"measured speed, more than the {time_left_s:.0f} s before its deadline; send fewer "
                               "or shorter inputs (or fewer max_new_tokens)")
        allowed_s = self.wait_share * time_left_s
        if estimate.wait_s <= allowed_s and estimate.answer_s <= time_left_s:
            return
        late_s = estimate.answer_s - estimate.alone_s if estimate.answer_s > time_left_s else 0.0  # the others' part
        retry = max(self.retry_after_s, math.ceil(max(estimate.wait_s - allowed_s, late_s)))
        raise Overloaded(f"the server is busy: this request would wait about {estimate.wait_s:.0f} s for the work "
                         f"ahead of it and be answered in about {estimate.answer_s:.0f} s; it may wait "
                         f"{allowed_s:.0f} s (wait_share {self.wait_share:g}) and must be answered within the "
                         f"{time_left_s:.0f} s before its deadline; retry in {retry} s", retry)

    def _progress(self, ticket: Ticket, lane: str, amount: float) -> None:
        with self._lock:
            if ticket.released or lane not in ticket.work:
                return
            done = min(amount, ticket.work[lane])
            ticket.work[lane] -= done
            self.pending[lane] -= done

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.released:
                ticket.released = True
                self.rows -= ticket.rows
                self.tokens -= ticket.tokens
                self.generating -= ticket.generating
                for lane, left in ticket.work.items():
                    self.pending[lane] -= left
