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
  refused, with the time it is short of as its Retry-After: it is told when to come back instead of timing out.
The engine also checks the gate before it loads an adapter (`check`: full already?); while the gate is full, the
HTTP edge refuses inference requests before it even parses them (server/api.py, `ShedWhenFull`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from .errors import InvalidInput, Overloaded

LANES = ("encode", "long", "generate")  # work: tokens read in short rows; in long rows; tokens to generate


class WorkCosts:
    """What the engine's forwards cost, as moving averages (written by the engine thread, read by request threads:
    a float assignment is atomic), and the wait they imply.

    The wait model follows the scheduler: every turn runs one chunk of the long row (`budget` tokens), one forward
    of short classification/embedding rows (up to `budget` tokens) and one decode step (up to `max_rows` rows, a
    token each), each only while its lane has work. A request waits for as many turns as its own lanes need to
    clear the work ahead of it, each turn as long as the busy lanes' forwards together.
    """

    def __init__(self, budget: int, max_rows: int, smoothing: float = 0.2):
        self.budget = budget
        self.max_rows = max_rows
        self.smoothing = smoothing
        self.seconds: dict[str, float] = {}  # per lane: of one token (encode, long) or of one decode step (generate)

    def observe(self, lane: str, seconds: float, tokens: int = 1) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        cost = seconds / tokens
        old = self.seconds.get(lane)
        self.seconds[lane] = cost if old is None else old + self.smoothing * (cost - old)

    def alone_s(self, work: dict[str, float], steps: int) -> float:
        """Seconds a request's own work takes even with nothing ahead of it: its tokens, and one decode step per
        token it may generate (a row gets one token a step, however many rows share it)."""
        seconds = self.seconds
        return (steps * seconds.get("generate", 0.0) + work.get("encode", 0) * seconds.get("encode", 0.0)
                + work.get("long", 0) * seconds.get("long", 0.0))

    def wait_s(self, pending: dict[str, float], lanes: set[str]) -> float:
        """Seconds until the work ahead in these lanes is done (lanes never measured count as free)."""
        per_turn = {"encode": self.budget, "long": self.budget, "generate": self.max_rows}
        turn_s = sum(self.seconds.get(lane, 0.0) * (1 if lane == "generate" else min(left, self.budget))
                     for lane, left in pending.items() if left > 0)
        turns = max((math.ceil(pending[lane] / per_turn[lane]) for lane in lanes), default=0)
        return turns * turn_s


@dataclass
class Ticket:
    """What one admitted request holds; progress() as its work is done, release() once it is answered
    (idempotent)."""

    gate: AdmissionGate
    rows: int
    tokens: int
    work: dict[str, float] = field(default_factory=dict)  # per lane, what is left of it
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
        decode steps; `time_left_s` before its deadline (None: none) and the engine's `costs` for the time rule."""
        work = {lane: amount for lane, amount in (work or {}).items() if amount}
        self._refuse_if_too_large(rows, tokens)
        with self._lock:
            self._refuse_if_over(rows, tokens)
            if time_left_s is not None and costs is not None:
                self._refuse_if_late(work, steps, time_left_s, costs)
            self.rows += rows
            self.tokens += tokens
            for lane, amount in work.items():
                self.pending[lane] += amount
        return Ticket(self, rows, tokens, dict(work))

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

    def _refuse_if_late(self, work: dict[str, float], steps: int, time_left_s: float, costs: WorkCosts) -> None:
        """429 if the request could not start within wait_share of its time left, or not finish before its
        deadline; Retry-After: how much sooner the work ahead would have to end."""
        lanes = set(work)
        wait_s = costs.wait_s(self.pending, lanes)
        with_own = {lane: left + work.get(lane, 0) for lane, left in self.pending.items()}
        finish_s = max(costs.wait_s(with_own, lanes), wait_s + costs.alone_s(work, steps))
        allowed_s = self.wait_share * time_left_s
        if wait_s <= allowed_s and finish_s <= time_left_s:
            return
        retry = max(self.retry_after_s, math.ceil(max(wait_s - allowed_s, finish_s - time_left_s)))
        raise Overloaded(f"the server is busy: this request would wait about {wait_s:.0f} s for the work ahead of "
                         f"it and be answered in about {finish_s:.0f} s; it may wait {allowed_s:.0f} s "
                         f"(wait_share {self.wait_share:g}) and must be answered within the {time_left_s:.0f} s "
                         f"before its deadline; retry in {retry} s", retry)

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
                for lane, left in ticket.work.items():
                    self.pending[lane] -= left
