"""The model runner: the engine's one worker thread, which alone runs the model and changes its modules.

It runs a step loop (continuous batching, across adapters). Each turn of the loop:
1. control jobs (adapter installs and evictions, merges) run, in order;
2. requests past their deadline (answered DeadlineExceeded) or whose client went away leave the queues, and rows
   whose request was cancelled (a closed stream), failed or so ended leave the decode batch;
3. queued classification requests run as one forward, so a classification waits at most one decode step;
4. queued generation requests are prefilled as one forward of their own; each new row gets its first token there
   and joins the decode batch (its KV cache is left-padded to the batch's width and concatenated); classification
   requests that arrived meanwhile run next, before the decode step;
5. one decode step: one forward over every active row, whatever its adapter and sampling settings; a row that
   finishes (EOS, its budget, a stop string) leaves at once and its request is answered then.
With `continuous=False` (static batching, kept to measure against) steps 3 and 4 take work only while no row is
decoding, and finished rows keep their place (computed, their tokens dropped) until the last row is done: a batch
runs to the end of its longest row and everything else waits, as `model.generate()` did.

Failures: a forward that fails is rerun request by request (a decode step: row by row, from the cache as it was
before the step), so one bad request fails alone and its batch mates go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from queue import Queue
from typing import Any, Protocol, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .decode import KV, InPlaceLayer, LeanDecoder, grow_kv
from .encoding import stop_cut
from .errors import ClientDisconnected
from .heads import SequenceClassifier, output_rows
from .lora import LoraContext, MultiLoraLinear
from .request_context import RequestContext, current_request
from .slots import BASE_SLOT, Slot
from .types import ClassificationResult, EmbeddingResult, GenerationParams, GenerationResult, TokenLogprob

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchObserver(Protocol):
    """Listens to forwards (server/metrics.py); called on the worker thread, must return quickly."""

    def batch_ran(self, rows: int) -> None: ...


class MergePolicy:
    """dLoRA-style: merge an adapter into the base weights while it dominates recent traffic.

    Counts the slot of each recent request (0 = base). Merge the top adapter when its share of a full window
    reaches `merge_share`; keep it merged while its share stays at or above `unmerge_share` (hysteresis).
    """

    def __init__(self, window: int = 32, merge_share: float = 0.9, unmerge_share: float = 0.6):
        self.recent: deque[int] = deque(maxlen=window)
        self.merge_share = merge_share
        self.unmerge_share = unmerge_share

    def observe(self, slot_index: int) -> None:
        self.recent.append(slot_index)

    def forget(self, slot_index: int) -> None:
        """A slot was emptied: its history belongs to an adapter that is gone."""
        kept = [s for s in self.recent if s != slot_index]
        self.recent.clear()
        self.recent.extend(kept)

    def choose(self, merged: int | None) -> int | None:
        """The slot that should be merged now, or None."""
        if len(self.recent) < (self.recent.maxlen or 0):
            return merged
        counts = Counter(self.recent)
        if merged is not None and counts[merged] >= self.unmerge_share * len(self.recent):
            return merged
        top, count = counts.most_common(1)[0]
        if top != BASE_SLOT and count >= self.merge_share * len(self.recent):
            return top
        return None


# ---- jobs: what callers queue for the worker ------------------------------------------------------------------


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


@dataclass
class GenerateJob:
    prompts: list[list[int]]  # token ids per input: each becomes one row of the decode batch
    slot_index: int
    params: GenerationParams
    stream: Queue[int | None] | None = None  # a streamed request's new token ids, one per step (None: it ended)
    future: Future = field(default_factory=Future)  # -> list[GenerationResult]; cancel() frees its rows
    enqueued: float = field(default_factory=time.perf_counter)
    request: RequestContext = field(default_factory=current_request)
    results: list[GenerationResult | None] = field(default_factory=list)
    # per prompt, when params ask: the generated tokens' logprobs, EOS's included (each is added before its token
    # goes to the stream), and the prompt's own (from the prefill)
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    prompt_logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.prompts)
        self.logprobs = [[] for _ in self.prompts]
        self.prompt_logprobs = [None] * len(self.prompts)


def _end_if_abandoned(job: ClassifyJob | EmbedJob | GenerateJob) -> bool:
    """Answer a job whose deadline passed (DeadlineExceeded) or whose client went away; True if it has ended."""
    if not job.future.done():
        if job.request.client_gone.is_set():
            _settle(job.future, error=ClientDisconnected("the client disconnected"))
        elif job.request.expired():
            log.info("request past its deadline of %g s leaves", job.request.timeout_s,
                     extra={"request_id": job.request.request_id})
            _settle(job.future, error=job.request.deadline_error())
    return job.future.done()


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a future unless its caller cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


# ---- the decode batch ------------------------------------------------------------------------------------------


@dataclass
class Row:
    job: GenerateJob
    index: int  # which of the job's prompts
    prompt_tokens: int
    generator: torch.Generator | None  # seeded rows sample from their own stream, whatever their batch mates
    ids: list[int] = field(default_factory=list)  # generated so far (EOS excluded)

    @property
    def gone(self) -> bool:
        """The request was cancelled or has failed (another of its rows did): this row's work is wasted."""
        return self.job.future.done()

    @property
    def finished(self) -> bool:
        return self.job.results[self.index] is not None or self.gone


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim)


@dataclass
class DecodeBatch:
    """Rows being generated, left-padded to one width. The KV buffers have room beyond the valid width (the mask's):
    a step writes its column there in place and only then widens the mask, so a step that fails leaves the batch as
    it was."""

    rows: list[Row]
    kv: KV
    mask: torch.Tensor  # [rows, width] 1 = a real token
    positions: torch.Tensor  # [rows] position id of each row's next input token
    last: torch.Tensor  # [rows] each row's latest token: the next step's input

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: Sequence[int]) -> DecodeBatch:
        """Only these rows, with the columns that became padding for all of them cut away."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax())  # first column some row still attends to
        width = self.mask.shape[1]
        kv = [(k[index, :, start:width], v[index, :, start:width]) for k, v in self.kv]
        return DecodeBatch([self.rows[i] for i in keep], kv, mask[:, start:], self.positions[index], self.last[index])

    @staticmethod
    def join(batches: Sequence[DecodeBatch]) -> DecodeBatch:
        width = max(b.mask.shape[1] for b in batches)
        kv = [
            tuple(torch.cat([_left_pad(b.kv[layer][part][:, :, : b.mask.shape[1]], width, 2) for b in batches])
                  for part in (0, 1))
            for layer in range(len(batches[0].kv))
        ]
        return DecodeBatch(
            [row for b in batches for row in b.rows],
            kv,
            torch.cat([_left_pad(b.mask, width, 1) for b in batches]),
            torch.cat([b.positions for b in batches]),
            torch.cat([b.last for b in batches]),
        )


def sampling_scores(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """[vocab] float32 logits -> the scores a token is drawn from: temperature, then nucleus filtering as
    transformers' TopPLogitsWarper does it (the most probable token always stays)."""
    scores = logits / params.temperature
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort()
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - params.top_p
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return scores


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(sampling_scores(logits, params).softmax(-1), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """[positions, vocab] logits and the token taken at each position -> each token's logprob (float32
    log-softmax of these logits) with the `top` most likely tokens there."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    best = logprobs.topk(top, -1) if top else None
    entries = []
    for i, token in enumerate(tokens):
        alternatives = () if best is None else tuple(zip(best.indices[i].tolist(), best.values[i].tolist()))
        entries.append(TokenLogprob(token, chosen[i], alternatives))
    return entries


# ---- the runner ------------------------------------------------------------------------------------------------


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layers: dict[str, MultiLoraLinear],
        context: LoraContext,
        classifier: SequenceClassifier,
        *,
        max_batch_rows: int = 16,
        max_wait_s: float = 0.002,
        merge_policy: MergePolicy | None = None,
        continuous: bool = True,
    ):
        self.model = model
        self.body = getattr(model, model.base_model_prefix)  # the transformer without its LM head
        self.tokenizer = tokenizer
        self.layers = layers
        self.context = context
        self.classifier = classifier
        self.device = model.device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.merge_policy = merge_policy  # None: never merge automatically
        self.continuous = continuous
        self.lean = LeanDecoder.for_model(model)  # the decode step without transformers' machinery; None: full forward
        self.merged: int | None = None  # slot folded into the base weights (worker thread only)
        self.observers: list[BatchObserver] = []
        self.batch_sizes: Counter[int] = Counter()  # rows per forward, for metrics and benchmarks
        self._controls: list[ControlJob] = []
        self._classify: list[ClassifyJob] = []
        self._generate: list[GenerateJob] = []
        self._batch: DecodeBatch | None = None  # worker thread only
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ---- called from any thread -----------------------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the worker thread (alone, between forwards) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        return self._enqueue(ControlJob(fn)).result()

    def classify(self, job: ClassifyJob | EmbedJob) -> Future:
        """Queue a classification or embedding job: they share one forward per turn."""
        return self._enqueue(job)

    def generate(self, job: GenerateJob) -> Future:
        if job.stream is not None:
            job.future.add_done_callback(lambda _: job.stream.put(None))
        return self._enqueue(job)

    @property
    def decoding(self) -> int:
        """Rows in the decode batch now."""
        batch = self._batch
        return 0 if batch is None else len(batch)

    def depth(self) -> int:
        """Requests waiting for the worker (not counting rows being decoded)."""
        with self._cond:
            return len(self._controls) + len(self._classify) + len(self._generate)

    def close(self) -> None:
        """Finish what is queued and running, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _enqueue(self, job: ControlJob | ClassifyJob | EmbedJob | GenerateJob) -> Future:
        with self._cond:  # the queue is looked up under the lock: the worker swaps the lists for new ones
            if self._closed:
                raise RuntimeError("the engine is shut down")
            queue = (
                self._controls if isinstance(job, ControlJob) else self._generate if isinstance(job, GenerateJob)
                else self._classify
            )
            queue.append(job)
            self._cond.notify()
        return job.future

    # ---- the loop (worker thread) ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._controls or self._classify or self._generate or self._batch):
                    if self._closed:
                        return
                    self._cond.wait()
                if self._batch is None:
                    self._wait_for_company()
                self._classify = [job for job in self._classify if not _end_if_abandoned(job)]
                self._generate = [job for job in self._generate if not _end_if_abandoned(job)]
                controls, self._controls = self._controls, []
                decoding = self.decoding
                classify = self._take(self._classify, lambda job: len(job.rows), decoding, room=0)
                generate = self._take(self._generate, lambda job: len(job.prompts), decoding, room=decoding)
            for control in controls:
                try:
                    _settle(control.future, control.fn())
                except BaseException as exc:  # noqa: BLE001 - every failure must reach its caller
                    _settle(control.future, error=exc)
            self._drop_gone_rows()
            self._run_classification(classify)
            generate = [job for job in generate if not job.future.cancelled()]
            if generate:
                self._observe(job.slot_index for job in generate)
                self._isolated(generate, self._prefill)
                self._classify_queued()  # what arrived during the prefill does not wait for the decode step too
            if self._batch is not None:
                self._decode_step()

    def _run_classification(self, jobs: list[ClassifyJob | EmbedJob]) -> None:
        """One forward of the body for classification and embedding jobs."""
        if jobs:
            self._observe(job.slot_index for job in jobs)
            self._isolated(jobs, self._encode_jobs)

    def _classify_queued(self) -> None:
        with self._cond:
            jobs = self._take(self._classify, lambda job: len(job.rows), self.decoding, room=0)
        self._run_classification(jobs)

    def _wait_for_company(self) -> None:
        """With nothing decoding, give the first queued request up to max_wait for batch mates (lock held)."""
        queued = self._classify + self._generate
        if self._controls or not queued:
            return
        deadline = min(job.enqueued for job in queued) + self.max_wait_s
        while (remaining := deadline - time.perf_counter()) > 0 and not self._closed:
            rows = sum(len(j.rows) for j in self._classify) + sum(len(j.prompts) for j in self._generate)
            if rows >= self.max_batch_rows or self._controls:
                return
            self._cond.wait(timeout=remaining)

    def _take(self, queue: list, rows_of: Callable[[Any], int], decoding: int, room: int) -> list:
        """Queued jobs for this turn (lock held): rows up to max_batch_rows, `room` of them already taken (the rows
        decoding, for generation; a request is never split, so one larger than the limit goes alone). Static
        batching takes nothing while rows decode."""
        if decoding and not self.continuous:
            return []
        taken, rows = [], room
        while queue and (rows == 0 or rows + rows_of(queue[0]) <= self.max_batch_rows):
            rows += rows_of(queue[0])
            taken.append(queue.pop(0))
        return taken

    def _observe(self, slot_indices: Any) -> None:
        """Each request counts once for the merge policy, when it is admitted (a rerun after a failure does not)."""
        if self.merge_policy is not None:
            for index in slot_indices:
                self.merge_policy.observe(index)

    def _isolated(self, jobs: list, run: Callable[[list], None]) -> None:
        """Run jobs in one forward; if that fails, each alone, so that a bad request fails only itself."""
        try:
            run(jobs)
        except Exception as exc:  # noqa: BLE001 - it goes to the request that caused it
            if len(jobs) == 1:
                log.warning("request failed on the model: %r", exc, extra={"request_id": jobs[0].request.request_id})
                _settle(jobs[0].future, error=exc)
                return
            for job in jobs:
                self._isolated([job], run)

    # ---- forwards ---------------------------------------------------------------------------------------------

    def _forward_rows(self, slot_indices: list[int]) -> LoraContext:
        """Before a forward over rows of these slots: count it, settle the merge state, and assign the rows."""
        self.batch_sizes[len(slot_indices)] += 1
        for observer in self.observers:
            observer.batch_ran(len(slot_indices))
        decoding = {row.job.slot_index for row in self._batch.rows} if self._batch is not None else set()
        self._prepare_merge_state(set(slot_indices) | decoding)
        effective = [BASE_SLOT if i == self.merged else i for i in slot_indices]  # merged rows are base rows now
        return self.context.rows(effective, self.device)

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def _encode_jobs(self, jobs: list[ClassifyJob | EmbedJob]) -> None:
        """Classification and embedding jobs: one forward of the body over their right-padded inputs."""
        rows = [row for job in jobs for row in job.rows]
        ids, mask = self._pad(rows, "right")
        with self._forward_rows([job.slot_index for job in jobs for _ in job.rows]):
            output = self.body(input_ids=ids, attention_mask=mask)  # last_hidden_state [rows, tokens, hidden]
        start = 0
        for job in jobs:
            part = slice(start, start + len(job.rows))
            start += len(job.rows)
            if isinstance(job, EmbedJob):
                _settle(job.future, self._embedded(job, output.last_hidden_state[part], mask[part]))
            else:
                _settle(job.future, self._classified(job, ids[part], mask[part], output_rows(output, part)))

    def _classified(self, job: ClassifyJob, ids: torch.Tensor, mask: torch.Tensor, output: Any
                    ) -> list[ClassificationResult]:
        """The architecture's own classification forward (its pooling) with the adapter's head (server/heads.py)."""
        logits = self.classifier.logits(ids, mask, output, job.slot.adapter.head)  # [rows, labels]
        labels = job.slot.adapter.labels
        results = []
        for i, row in enumerate(job.rows):
            probs = logits[i].float().softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append(ClassificationResult(labels[best], probs[best], dict(zip(labels, probs)), len(row)))
        return results

    @staticmethod
    def _embedded(job: EmbedJob, hidden: torch.Tensor, mask: torch.Tensor) -> list[EmbeddingResult]:
        weights = mask[..., None].float()  # [rows, tokens, 1]: 1 on each input's own tokens
        mean = (hidden.float() * weights).sum(1) / weights.sum(1)  # [rows, hidden] float32
        vectors = torch.nn.functional.normalize(mean, dim=-1).tolist()
        return [EmbeddingResult(vector, len(row)) for vector, row in zip(vectors, job.rows)]

    def _new_cache(self, kv: KV | None = None, width: int = 0) -> DynamicCache:
        """An empty cache (a prefill), or one over the decode batch's buffers whose steps write in place."""
        cache = DynamicCache(config=self.model.config)
        if kv is not None:
            cache.layers = [InPlaceLayer(keys, values, width) for keys, values in kv]
        return cache

    @torch.no_grad()
    def _prefill(self, jobs: list[GenerateJob]) -> None:
        """One forward over the new requests' prompts; their rows get a first token and join the decode batch."""
        rows = [
            Row(job, i, len(prompt), None if job.params.seed is None else
                torch.Generator(self.device).manual_seed(job.params.seed))
            for job in jobs for i, prompt in enumerate(job.prompts)
        ]
        prompts = [prompt for job in jobs for prompt in job.prompts]
        ids, mask = self._pad(prompts, "left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        head = self.model.get_output_embeddings()
        with self._forward_rows([row.job.slot_index for row in rows]):
            hidden = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True).last_hidden_state  # [rows, width, hidden]
            logits = head(hidden[:, -1:])[:, -1]  # [rows, vocab]: what the model's forward with logits_to_keep=1 does
            for i, row in enumerate(rows):
                if row.job.params.prompt_logprobs:  # the prompt's positions only for rows that ask (echo)
                    prompt = prompts[i]
                    predicted = head(hidden[i, ids.shape[1] - len(prompt) : -1])  # [prompt - 1, vocab]
                    first = TokenLogprob(prompt[0], None)
                    top = row.job.params.logprobs or 0
                    row.job.prompt_logprobs[row.index] = [first, *token_logprobs(predicted, prompt[1:], top)]
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        joined = DecodeBatch(rows, kv, mask, mask.sum(-1), torch.zeros(len(rows), dtype=torch.long, device=self.device))
        self._batch = joined if self._batch is None else DecodeBatch.join([self._batch, joined])
        self._take_tokens(logits, range(len(self._batch) - len(rows), len(self._batch)))

    @torch.no_grad()
    def _decode_step(self) -> None:
        """One step for every decoding row. If the forward fails, each row steps alone from the cache as it was
        before the step, so a row that fails leaves alone and its batch mates go on."""
        batch = self._batch
        try:
            logits = self._step(batch)
        except Exception as exc:  # noqa: BLE001 - it goes to the row that caused it
            if len(batch) == 1:
                self._batch = None
                self._fail_row(batch.rows[0], exc)
                return
            kept = []
            for i in range(len(batch)):
                self._batch = batch.select([i])
                self._decode_step()
                if self._batch is not None:
                    kept.append(self._batch)
            self._batch = DecodeBatch.join(kept) if kept else None
            return
        self._take_tokens(logits, range(len(batch)))

    def _step(self, batch: DecodeBatch) -> torch.Tensor:
        """One decode forward; commits the batch's new cache, mask and positions only if it succeeds."""
        width = batch.mask.shape[1]
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], 1)
        batch.kv = grow_kv(batch.kv, width, width + 1)  # the valid columns are unchanged: safe before the forward
        with self._forward_rows([row.job.slot_index for row in batch.rows]):
            if self.lean is not None:
                logits = self.lean.step(batch.last, batch.positions, mask, batch.kv, width)
            else:
                logits = self.model(input_ids=batch.last[:, None], attention_mask=mask,
                                    position_ids=batch.positions[:, None], cache=self._new_cache(batch.kv, width),
                                    use_cache=True).logits[:, -1]  # [rows, vocab]
        batch.mask, batch.positions = mask, batch.positions + 1
        return logits

    def _take_tokens(self, logits: torch.Tensor, positions: Sequence[int] | range) -> None:
        """Each of these rows of the batch takes its next token from its logits row; finished rows leave."""
        batch = self._batch
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        finished = set()
        for i, at in enumerate(positions):
            row = batch.rows[at]
            if row.finished:  # static batching: a finished row rides along until the batch ends
                continue
            try:
                params = row.job.params
                if params.max_new_tokens == 0:  # scoring the prompt only: the prefill did it
                    self._finish(row, "length")
                    finished.add(at)
                    continue
                token = greedy[i] if params.temperature == 0 else sample(logits[i], params, row.generator)
                batch.last[at] = token
                if params.logprobs is not None:
                    [entry] = token_logprobs(logits[i : i + 1], [token], params.logprobs)
                    row.job.logprobs[row.index].append(entry)  # before _advance streams the token
                if self._advance(row, token):
                    finished.add(at)
            except Exception as exc:  # noqa: BLE001 - a row that fails here fails alone
                self._fail_row(row, exc)
                finished.add(at)
        if finished:
            self._leave(finished)

    def _advance(self, row: Row, token: int) -> bool:
        """Add a token to a row; answer the row and return True if it is finished."""
        params = row.job.params
        if token == self.eos and not params.ignore_eos:
            return self._finish(row, "stop")
        row.ids.append(token)
        if row.job.stream is not None:
            row.job.stream.put(token)
        if params.stop and stop_cut(self.tokenizer.decode(row.ids, skip_special_tokens=True), params.stop) >= 0:
            return self._finish(row, "stop")
        if len(row.ids) >= params.max_new_tokens:
            return self._finish(row, "length")
        return False

    def _finish(self, row: Row, reason: str) -> bool:
        job = row.job
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        cut = stop_cut(text, job.params.stop)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        logprobs = job.logprobs[row.index] if job.params.logprobs is not None else None
        job.results[row.index] = GenerationResult(
            text, reason, len(row.ids), row.ids, row.prompt_tokens, logprobs, job.prompt_logprobs[row.index]
        )
        if all(result is not None for result in job.results):
            _settle(job.future, job.results)
        return True

    def _fail_row(self, row: Row, exc: BaseException) -> None:
        log.warning("generation row failed: %r", exc, extra={"request_id": row.job.request.request_id})
        _settle(row.job.future, error=exc)  # its other rows leave at the next turn (gone)

    def _leave(self, rows: set[int]) -> None:
        """These rows of the batch are finished: they leave now (static batching: once every row is finished)."""
        batch = self._batch
        if self.continuous:
            keep = [i for i in range(len(batch)) if i not in rows]
            self._batch = batch.select(keep) if keep else None
        elif all(row.finished for row in batch.rows):
            self._batch = None

    def _drop_gone_rows(self) -> None:
        """Rows of requests cancelled, failed, past their deadline or left by their client leave before the next
        forward (and before any control job frees their adapter's slot)."""
        if self._batch is not None:
            for job in {id(row.job): row.job for row in self._batch.rows}.values():
                _end_if_abandoned(job)
            gone = {i for i, row in enumerate(self._batch.rows) if row.gone}
            if gone:
                self._leave(gone)

    # ---- adapter slots and merging (worker thread only; callers go through call()) -----------------------------

    def clear_slot(self, index: int) -> None:
        if self.merged == index:
            self.unmerge()
        if self.merge_policy is not None:
            self.merge_policy.forget(index)
        for layer in self.layers.values():
            layer.clear_slot(index)

    def merge(self, index: int) -> None:
        """Fold one loaded adapter into the base weights; its rows then run at exactly base cost."""
        if self.merged == index:
            return
        self.unmerge()
        for layer in self.layers.values():
            layer.merge(index)
        self.merged = index
        log.info("merged slot %d into the base weights", index)

    def unmerge(self) -> None:
        if self.merged is None:
            return
        for layer in self.layers.values():
            layer.unmerge()
        log.info("unmerged slot %d", self.merged)
        self.merged = None

    def _prepare_merge_state(self, slots: set[int]) -> None:
        """Mixed forwards never run merged; follow the policy when every row in flight allows it."""
        want = self.merged if self.merge_policy is None else self.merge_policy.choose(self.merged)
        if self.merged is not None and (slots != {self.merged} or want != self.merged):
            self.unmerge()
        if want is not None and want != BASE_SLOT and self.merged is None and slots == {want}:
            self.merge(want)
