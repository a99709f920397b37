"""The model runner: the engine's one worker thread, which alone runs the model and changes its modules.

It executes the step plans of server/scheduler.py (continuous batching across adapters, bounded forwards). Each
turn of the loop:
1. control jobs (adapter installs and evictions, merges) run, in order;
2. requests past their deadline (answered DeadlineExceeded) or whose client went away leave the queues, and rows
   whose request was cancelled (a closed stream), failed or so ended leave the decode batch;
3. one chunk of the long row in progress, if any: a row longer than `max_batch_tokens` runs a chunk per turn
   through its own KV cache, and with its last chunk gets its answer (a class, an embedding, or a first token and
   a place in the decode batch);
4. queued classification and embedding rows run as one forward (so a classification waits at most one step);
5. new generation rows are prefilled as one forward of their own; each gets its first token there and joins the
   decode batch (its KV cache is left-padded to the batch's width and concatenated); classification rows that
   arrived meanwhile run next, before the decode step;
6. one decode step: one forward over every active row, whatever its adapter and sampling settings; a row that
   finishes (EOS, its budget, a stop string) leaves at once and its request is answered then.
Every forward holds at most `max_batch_tokens` tokens and `max_batch_rows` rows, so between two turns (where
deadlines, departed clients and shutdown take effect) there is at most a bounded amount of work.
With `continuous=False` (static batching, kept to measure against) no new work starts while a row is decoding, and
finished rows keep their place (computed, their tokens dropped) until the last row is done: a batch runs to the end
of its longest row and everything else waits, as `model.generate()` did.

Failures: a forward that fails is rerun request by request (a decode step: row by row, from the cache as it was
before the step), so one bad request fails alone and its batch mates go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .admission import WorkCosts
from .decode import KV, DecodeBatch, InPlaceLayer, LeanDecoder, Row, grow_kv
from .row_step import RowStep, compiled_graphs, compiled_or_none
from .encoding import stop_cut
from .fused import FusedLayers
from .errors import LoraswapError
from .heads import SequenceClassifier, output_rows
from .jobs import (
    ClassifyJob, ControlJob, EmbedJob, GenerateJob, RowJob, end_if_abandoned, progress, row_done, settle
)
from .lora import LoraContext, MultiLoraLinear
from .merging import MergePolicy, Merging
from .prefixes import PackedRows, Prefilled, PrefixStore
from .sampling import sample, token_logprobs
from .scheduler import Piece, Prompt, Scheduler, pack
from .slots import BASE_SLOT
from .types import ClassificationResult, EmbeddingResult, GenerationResult, TokenLogprob

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchObserver(Protocol):
    """Listens to forwards (server/metrics.py); called on the worker thread, must return quickly."""

    def batch_ran(self, rows: int) -> None: ...


# ---- the runner ------------------------------------------------------------------------------------------------


@dataclass
class LongRow:
    """A row running in chunks (server/scheduler.py): its KV cache so far and what its answer accumulates."""

    piece: Piece  # its latest chunk
    cache: DynamicCache
    hidden_sum: torch.Tensor | None = None  # [hidden] float32: an embedding's sum of last hidden states
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # an echo's, chunk by chunk

    def continues(self, piece: Piece) -> bool:
        return piece.start > 0 and self.piece.job is piece.job and self.piece.row == piece.row \
            and self.piece.stop == piece.start


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
        max_batch_tokens: int = 256,
        max_wait_s: float = 0.002,
        merge_policy: MergePolicy | None = None,
        continuous: bool = True,
        chunkable: bool = True,
        context_weight: float = 0.0,
        compile_decode: bool = True,
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
        self.max_wait_s = max_wait_s
        self.merging = Merging(layers, merge_policy)  # the adapter folded into the base weights (worker thread only)
        self.lean = LeanDecoder.for_model(model)  # the decode step without transformers' machinery; None: full forward
        if self.lean is not None:
            self.lean.fused = FusedLayers.for_model(model, context)
        self.compile_decode = compile_decode  # one or two rows' step compiled (server/row_step.py), at calibrate()
        self.observers: list[BatchObserver] = []
        self.batch_sizes: Counter[int] = Counter()  # rows per forward, for metrics and benchmarks
        self.scheduler = Scheduler(max_batch_rows, max_batch_tokens, continuous, chunkable, context_weight,
                                   self._cached_tokens)  # under _cond
        self.costs = WorkCosts(max_batch_tokens, max_batch_rows)  # measured here, read by the admission gate
        self._batch: DecodeBatch | None = None  # worker thread only
        self._long: LongRow | None = None  # worker thread only
        self.prefixes = PrefixStore()  # prompts just scored, for scored prompts that begin with them (worker only)
        self._cond = threading.Condition()
        self._closed = False
        self._abort: LoraswapError | None = None  # set: stop at the next turn, answering everything with it
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
    def continuous(self) -> bool:
        """Continuous batching, or static (False): the scheduler's policy, which the runner's own rows follow."""
        return self.scheduler.continuous

    @continuous.setter
    def continuous(self, value: bool) -> None:
        """Switchable on a running engine (benchmarks/run.py measures both on one): rows that finished under static
        batching leave at the next row's end."""
        with self._cond:
            self.scheduler.continuous = value

    @property
    def decoding(self) -> int:
        """Rows in the decode batch now."""
        batch = self._batch
        return 0 if batch is None else len(batch)

    def depth(self) -> int:
        """Requests waiting for the worker (not counting rows being decoded)."""
        with self._cond:
            return self.scheduler.depth()

    def close(self) -> None:
        """Finish what is queued and running, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def abort(self, error: LoraswapError) -> None:
        """Stop at the next turn (after at most one bounded forward): every request queued or running is answered
        with `error`, and the worker ends. The server's shutdown after its drain timeout."""
        with self._cond:
            self._abort = error
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _enqueue(self, job: ControlJob | RowJob) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self.scheduler.add(job)
            self._cond.notify()
        return job.future

    # ---- the loop (worker thread) ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.scheduler.has_work() or self._batch or self._abort):
                    if self._closed:
                        return
                    self._cond.wait()
                if self._abort is not None:
                    self._answer_everything(self._abort)
                    return
                if self._batch is None:
                    self._wait_for_company()
                plan = self.scheduler.plan(self.decoding)
            for control in plan.controls:
                try:
                    settle(control.future, control.fn())
                except BaseException as exc:  # noqa: BLE001 - every failure must reach its caller
                    settle(control.future, error=exc)
            self._drop_gone_rows()
            self._run_chunk(plan.chunk)
            self._run_encode(plan.encode)
            prefill = [piece for piece in plan.prefill if not piece.job.future.done()]
            if prefill:
                self._observe(prefill)
                self._run_prefill(prefill)
                with self._cond:  # what arrived during the prefill does not wait for the decode step too
                    encode = self.scheduler.take_encode()
                self._run_encode(encode)
            if self._batch is not None:
                rows, started, graphs = len(self._batch), time.perf_counter(), compiled_graphs()
                self._decode_step()
                if compiled_graphs() == graphs:  # a step that compiled a graph says nothing of the steps to come
                    # a step as its rows see it: the forward, sampling, streaming and cache upkeep
                    self.costs.observe_step(rows, time.perf_counter() - started)

    def _answer_everything(self, error: LoraswapError) -> None:
        """Shutdown (lock held): every request queued, in chunks or decoding is answered with `error`."""
        jobs = self.scheduler.abandon_all() + ([row.job for row in self._batch.rows] if self._batch else [])
        for job in [*self.scheduler.controls, *jobs]:
            settle(job.future, error=error)
        self.scheduler.controls = []
        self._batch = self._long = None
        log.warning("engine stopped: %d requests answered with %r", len({id(job) for job in jobs}), str(error))

    def _run_encode(self, pieces: list[Piece]) -> None:
        """One forward of the body for classification and embedding rows."""
        if pieces:
            self._observe(pieces)
            self._isolated(pieces, self._encode)

    def _run_prefill(self, pieces: list[Piece]) -> None:
        """New prompts, each forward isolated: scored prompts that begin with one just scored (server/prefixes.py)
        run their own last tokens only, through its cache, one forward per number of tokens; then the others."""
        reusing: dict[int, list[Piece]] = {}  # by the tokens each runs: one forward per length, unpadded
        for piece in pieces:
            if (reuse := self.prefixes.find(piece)) is not None:
                reusing.setdefault(len(piece.ids) - reuse.shared, []).append(piece)
        for group in reusing.values():
            self._isolated(group, self._prefill_reusing)
        reused = {id(piece) for group in reusing.values() for piece in group}
        if rest := [piece for piece in pieces if id(piece) not in reused and not piece.job.future.done()]:
            self._isolated(rest, self._prefill)

    def _cached_tokens(self, job: GenerateJob, row: int) -> int:
        """How many first tokens of this prompt a prompt just scored lends it (the scheduler plans with it)."""
        reuse = self.prefixes.find(Piece(job, row, 0, len(job.rows[row])))
        return 0 if reuse is None else reuse.shared

    def _wait_for_company(self) -> None:
        """With nothing decoding, give the first queued request up to max_wait for batch mates (lock held)."""
        oldest = self.scheduler.oldest()
        if self.scheduler.controls or oldest is None:
            return
        deadline = oldest + self.max_wait_s
        while (remaining := deadline - time.perf_counter()) > 0 and not self._closed:
            if self.scheduler.queued_rows() >= self.scheduler.max_rows or self.scheduler.controls:
                return
            self._cond.wait(timeout=remaining)

    def _observe(self, pieces: list[Piece]) -> None:
        """Each request counts once for the merge policy, with its first piece (a rerun after a failure does not)."""
        for piece in pieces:
            if piece.row == 0 and piece.start == 0:
                self.merging.observe(piece.job.slot_index)

    def _isolated(self, pieces: list[Piece], run: Callable[[list[Piece]], None]) -> None:
        """Run pieces in one forward; if that fails, each request's alone, so that a bad request fails only itself."""
        try:
            run(pieces)
        except Exception as exc:  # noqa: BLE001 - it goes to the request that caused it
            jobs = list({id(piece.job): piece.job for piece in pieces}.values())
            if len(jobs) == 1:
                log.warning("request failed on the model: %r", exc, extra={"request_id": jobs[0].request.request_id})
                settle(jobs[0].future, error=exc)
                return
            for job in jobs:
                self._isolated([piece for piece in pieces if piece.job is job], run)

    # ---- forwards ---------------------------------------------------------------------------------------------

    def _forward_rows(self, slot_indices: list[int]) -> LoraContext:
        """Before a forward over rows of these slots: count it, settle the merge state, and assign the rows."""
        self.batch_sizes[len(slot_indices)] += 1
        for observer in self.observers:
            observer.batch_ran(len(slot_indices))
        decoding = {row.job.slot_index for row in self._batch.rows} if self._batch is not None else set()
        self.merging.prepare(set(slot_indices) | decoding)
        merged = self.merging.merged
        effective = [BASE_SLOT if i == merged else i for i in slot_indices]  # merged rows are base rows now
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
    def _encode(self, pieces: list[Piece]) -> None:
        """Classification and embedding rows (whole): one forward of the body over them, right-padded."""
        ids, mask = self._pad([piece.ids for piece in pieces], "right")
        started = time.perf_counter()
        with self._forward_rows([piece.job.slot_index for piece in pieces]):
            output = self.body(input_ids=ids, attention_mask=mask)  # last_hidden_state [rows, tokens, hidden]
        self.costs.observe("encode", time.perf_counter() - started, ids.numel())
        start = 0
        while start < len(pieces):  # each request's rows (consecutive) together: one head call per request
            job = pieces[start].job
            stop = start
            while stop < len(pieces) and pieces[stop].job is job:
                stop += 1
            part = slice(start, stop)
            if isinstance(job, EmbedJob):
                weights = mask[part, :, None].float()  # [rows, tokens, 1]: 1 on each input's own tokens
                means = (output.last_hidden_state[part].float() * weights).sum(1) / weights.sum(1)  # [rows, hidden]
                answers = self._embeddings(job, pieces[part], means)
            else:
                logits = self.classifier.logits(ids[part], mask[part], output_rows(output, part), job.slot.adapter.head)
                answers = self._classifications(job, pieces[part], logits)
            for piece, answer in zip(pieces[part], answers):
                progress(job, "encode", len(piece.ids))
                row_done(job, piece.row, answer)
            start = stop

    @staticmethod
    def _classifications(job: ClassifyJob, pieces: list[Piece], logits: torch.Tensor) -> list[ClassificationResult]:
        """[rows, labels] logits of the architecture's own classification forward (its pooling) with the adapter's
        head (server/heads.py) -> each row's answer."""
        labels = job.slot.adapter.labels
        results = []
        for piece, row_logits in zip(pieces, logits):
            probs = row_logits.float().softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append(ClassificationResult(labels[best], probs[best], dict(zip(labels, probs)),
                                                len(job.rows[piece.row])))
        return results

    @staticmethod
    def _embeddings(job: EmbedJob, pieces: list[Piece], means: torch.Tensor) -> list[EmbeddingResult]:
        """[rows, hidden] float32 means of the last hidden state -> each row's L2-normalized embedding."""
        vectors = torch.nn.functional.normalize(means, dim=-1).tolist()
        return [EmbeddingResult(vector, len(job.rows[piece.row])) for vector, piece in zip(vectors, pieces)]

    def _new_cache(self, kv: KV | None = None, width: int = 0) -> DynamicCache:
        """An empty cache (a prefill), or one over the decode batch's buffers whose steps write in place."""
        cache = DynamicCache(config=self.model.config)
        if kv is not None:
            cache.layers = [InPlaceLayer(keys, values, width) for keys, values in kv]
        return cache

    def _new_row(self, job: GenerateJob, index: int) -> Row:
        seed = job.params.seed
        return Row(job, index, len(job.prompts[index]), None if seed is None else
                   torch.Generator(self.device).manual_seed(seed))

    @torch.no_grad()
    def _prefill(self, pieces: list[Piece]) -> None:
        """One forward over new prompts (whole); their rows get a first token and join the decode batch. Scored
        prompts that share most of their tokens run packed (_prefill_packed)."""
        groups = pack(pieces)
        if len(groups) < len(pieces):
            self._prefill_packed(groups)
            return
        rows = [self._new_row(piece.job, piece.row) for piece in pieces]
        prompts = [piece.ids for piece in pieces]
        ids, mask = self._pad(prompts, "left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        head = self.model.get_output_embeddings()
        started = time.perf_counter()
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
        self.costs.observe("prefill", time.perf_counter() - started, ids.numel())
        for piece in pieces:
            progress(piece.job, "prefill", len(piece.ids))
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if scored := [Prefilled.of_row(piece, i, kv, hidden, row.job.prompt_logprobs[row.index])
                      for i, (piece, row) in enumerate(zip(pieces, rows)) if row.job.params.prompt_logprobs]:
            self.prefixes.replace(scored)
        self._join(rows, cache, mask, logits)

    @torch.no_grad()
    def _prefill_reusing(self, pieces: list[Piece]) -> None:
        """Scored prompts that begin with stored ones (server/prefixes.py), each running the same number of its own
        last tokens: one forward over those, through a cache of the stored keys and values of the tokens before
        them (left-padded, as a prefill's); then as _prefill."""
        reuses = [self.prefixes.find(piece) for piece in pieces]
        rows = [self._new_row(piece.job, piece.row) for piece in pieces]
        cache, shared_mask = self._left_padded_cache([reuse.source.kv for reuse in reuses],
                                                     [reuse.shared for reuse in reuses])
        ids = torch.tensor([piece.ids[reuse.shared:] for piece, reuse in zip(pieces, reuses)])  # [rows, tokens]
        positions = torch.stack([torch.arange(reuse.shared, len(piece.ids)) for piece, reuse in zip(pieces, reuses)])
        ids, positions = ids.to(self.device), positions.to(self.device)
        mask = torch.cat([shared_mask, torch.ones_like(ids)], 1)  # [rows, shared + tokens]
        head = self.model.get_output_embeddings()
        started = time.perf_counter()
        with self._forward_rows([row.job.slot_index for row in rows]):
            hidden = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True).last_hidden_state  # [rows, tokens, hidden]
            # one head call (its weights read once): each row's last position, whose logits choose its first token,
            # then each row's positions that predict its own tokens (the first of them is the source's last shared)
            predicting = [torch.cat([reuse.source.hidden[reuse.shared - 1 : reuse.shared], hidden[i, :-1]])
                          for i, reuse in enumerate(reuses)]
            logits = head(torch.cat([hidden[:, -1], *predicting]))  # [rows + rows x tokens, vocab]
            for piece, row, reuse, predicted in zip(pieces, rows, reuses, logits[len(rows):].split(ids.shape[1])):
                own = token_logprobs(predicted, piece.ids[reuse.shared:], row.job.params.logprobs or 0)
                row.job.prompt_logprobs[row.index] = reuse.source.prompt_logprobs[: reuse.shared] + own
        # per token of the whole prompts: the prefill lane's work is counted so (server/admission.py)
        self.costs.observe("prefill", time.perf_counter() - started, sum(len(piece.ids) for piece in pieces))
        for piece in pieces:
            progress(piece.job, "prefill", len(piece.ids))
        self._join(rows, cache, mask, logits[: len(rows)])

    @torch.no_grad()
    def _prefill_packed(self, groups: list[list[Piece]]) -> None:
        """One forward over new prompts packed in rows (server/scheduler.py: pack): each row holds a prompt, then the
        own last tokens of the scored prompts that share most of its tokens, at their own positions; a 4-D mask lets
        every prompt's tokens attend to its own (the shared ones included) only, as in a row of its own. Each prompt
        then takes its cache from its columns and joins the decode batch, as after _prefill."""
        pieces = [piece for group in groups for piece in group]
        rows = [self._new_row(piece.job, piece.row) for piece in pieces]
        layout = PackedRows.of(groups, self.pad)
        ids, positions, shared, leaders = layout.ids, layout.positions, layout.shared, layout.leaders
        spans = [(r, index.to(self.device)) for r, index in layout.spans]
        dtype = self.model.dtype
        mask = torch.zeros(layout.allowed.shape, dtype=dtype).masked_fill_(~layout.allowed, torch.finfo(dtype).min)
        cache = self._new_cache()
        head = self.model.get_output_embeddings()
        scored = [i for i, row in enumerate(rows) if row.job.params.prompt_logprobs]
        starts = [max(common - 1, 0) for common in shared]  # each prompt's first position predicting its own token
        started = time.perf_counter()
        with self._forward_rows([group[0].job.slot_index for group in groups]):
            hidden = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=positions.to(self.device), cache=cache,
                               use_cache=True).last_hidden_state  # [packed rows, width, hidden]
            own_hidden = [hidden[r, index] for r, index in spans]  # per prompt [tokens, hidden]
            predicting = [own_hidden[i][starts[i] : -1] for i in scored]
            # one head call: each prompt's last position (its first token), then what each scored one predicts
            logits = head(torch.cat([torch.stack([h[-1] for h in own_hidden]), *predicting]))
            for i, predicted in zip(scored, logits[len(pieces):].split([len(h) for h in predicting])):
                prompt, row, leader = pieces[i].ids, rows[i], rows[leaders[i]]
                before = ([TokenLogprob(prompt[0], None)] if not shared[i]
                          else leader.job.prompt_logprobs[leader.index][: shared[i]])
                own = token_logprobs(predicted, prompt[starts[i] + 1 :], row.job.params.logprobs or 0)
                row.job.prompt_logprobs[row.index] = before + own
        self.costs.observe("prefill", time.perf_counter() - started, sum(len(piece.ids) for piece in pieces))
        for piece in pieces:
            progress(piece.job, "prefill", len(piece.ids))
        kv = [[(layer.keys[r][:, index], layer.values[r][:, index]) for layer in cache.layers] for r, index in spans]
        if kept := [Prefilled(Prompt.of(pieces[i]), kv[i], own_hidden[i], rows[i].job.prompt_logprobs[rows[i].index])
                    for i in scored]:
            self.prefixes.replace(kept)
        joined, joined_mask = self._left_padded_cache(kv, [len(piece.ids) for piece in pieces])
        self._join(rows, joined, joined_mask, logits[: len(pieces)])

    def _left_padded_cache(self, kvs: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int]
                           ) -> tuple[DynamicCache, torch.Tensor]:
        """A cache over prompts' first `lengths` columns of their keys and values (per prompt, per layer
        [kv_heads, tokens, head_dim]), left-padded as a prefill's, and its mask [prompts, widest]."""
        width = max(lengths)
        mask = torch.zeros((len(kvs), width), dtype=torch.long, device=self.device)
        for i, length in enumerate(lengths):
            mask[i, width - length:] = 1
        cache = self._new_cache()
        for layer in range(len(kvs[0])):
            parts = []
            for part in (0, 1):
                first = kvs[0][layer][part]
                out = first.new_zeros(len(kvs), first.shape[0], width, first.shape[2])  # [prompts, heads, width, dim]
                for i, length in enumerate(lengths):
                    out[i, :, width - length:] = kvs[i][layer][part][:, :length]
                parts.append(out)
            cache.update(parts[0], parts[1], layer)
        return cache, mask

    def _join(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Prefilled rows join the decode batch and take their first token from `logits` [rows, vocab]."""
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        joined = DecodeBatch(rows, kv, mask, mask.sum(-1), torch.zeros(len(rows), dtype=torch.long, device=self.device))
        self._batch = joined if self._batch is None else DecodeBatch.join([self._batch, joined])
        self._take_tokens(logits, range(len(self._batch) - len(rows), len(self._batch)))

    @torch.no_grad()
    def calibrate(self) -> None:
        """Time a classification forward of `max_batch_tokens` tokens and (on a decoder) decode steps of one row
        and of a full batch, on the base: the admission gate's estimates until real forwards have been measured.
        On a decoder without the C step (server/fused.py) the step of one or two rows is compiled first
        (server/row_step.py)."""
        rows = self.scheduler.max_rows
        width = max(1, self.scheduler.max_tokens // rows)
        ids = torch.full((rows, width), self.pad if self.pad is not None else 0, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        with self.context.rows([BASE_SLOT] * rows, self.device):
            started = time.perf_counter()
            self.body(input_ids=ids, attention_mask=mask)
            seconds = time.perf_counter() - started
        self.costs.observe("encode", seconds, ids.numel())
        if not self.scheduler.chunkable:
            return
        self.costs.observe("prefill", seconds, ids.numel())
        self.costs.observe("long", seconds, ids.numel())
        if self.compile_decode and self.lean is not None and self.lean.row_step is None and self.lean.fused is None:
            self.lean.row_step = compiled_or_none(lambda: RowStep.for_model(self.model, self.context),
                                                  lambda row_step: (row_step.warm_up(), self._time_step(ids[:1], width)))
        for size in sorted({1, rows}):
            self.costs.observe_step(size, self._time_step(ids[:size], width))

    def _time_step(self, ids: torch.Tensor, width: int) -> float:
        """Seconds of one decode step of the base after a prompt of `ids` [rows, width], by the path serving takes."""
        size = len(ids)
        with self.context.rows([BASE_SLOT] * size, self.device):
            cache = self._new_cache()
            self.body(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
            kv = grow_kv([(layer.keys, layer.values) for layer in cache.layers], width, width + 1)
            step_mask = torch.ones((size, width + 1), dtype=torch.long, device=self.device)
            started = time.perf_counter()
            if self.lean is not None:
                self.lean.step(ids[:, -1], torch.full((size,), width, device=self.device), step_mask, kv, width)
            else:
                self.model(input_ids=ids[:, -1:], attention_mask=step_mask, cache=self._new_cache(kv, width),
                           use_cache=True)
            return time.perf_counter() - started

    # ---- a long row, one chunk per turn ---------------------------------------------------------------------------

    def _run_chunk(self, piece: Piece | None) -> None:
        """The long row's next chunk; its state is dropped when the scheduler has dropped the row (its request
        ended) or a chunk fails (the request fails alone)."""
        if piece is None or piece.job.future.done():
            self._long = None
            return
        if self._long is None or not self._long.continues(piece):
            self._observe([piece])
            self._long = LongRow(piece, self._new_cache())
        self._long.piece = piece
        try:
            self._chunk(self._long, piece)
        except Exception as exc:  # noqa: BLE001 - it goes to the request that caused it
            log.warning("request failed on the model: %r", exc, extra={"request_id": piece.job.request.request_id})
            settle(piece.job.future, error=exc)
            self._long = None

    @torch.no_grad()
    def _chunk(self, long: LongRow, piece: Piece) -> None:
        """One chunk of a long row through its KV cache (causal attention: the same hidden states as one forward
        over the whole row); with the last chunk, the row's answer."""
        job = piece.job
        ids = torch.tensor([piece.ids], dtype=torch.long, device=self.device)  # [1, chunk]
        positions = torch.arange(piece.start, piece.stop, device=self.device)[None]
        mask = torch.ones((1, piece.stop), dtype=torch.long, device=self.device)  # the cache's tokens and these
        started = time.perf_counter()
        with self._forward_rows([job.slot_index]):
            output = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=long.cache,
                               use_cache=True)
        self.costs.observe("long", time.perf_counter() - started, ids.shape[1])
        progress(job, "long", ids.shape[1])
        hidden = output.last_hidden_state  # [1, chunk, hidden]
        if isinstance(job, EmbedJob):
            chunk_sum = hidden[0].float().sum(0)
            long.hidden_sum = chunk_sum if long.hidden_sum is None else long.hidden_sum + chunk_sum
        elif isinstance(job, GenerateJob) and job.params.prompt_logprobs:
            prompt = job.prompts[piece.row]
            head = self.model.get_output_embeddings()
            predicting = hidden[0] if not piece.last else hidden[0, :-1]  # each position scores the next token
            if piece.start == 0:
                long.prompt_logprobs.append(TokenLogprob(prompt[0], None))
            long.prompt_logprobs += token_logprobs(head(predicting), prompt[piece.start + 1 : piece.stop + 1],
                                                   job.params.logprobs or 0)
        if not piece.last:
            return
        self._long = None
        if isinstance(job, EmbedJob):
            [answer] = self._embeddings(job, [piece], (long.hidden_sum / piece.stop)[None])
            row_done(job, piece.row, answer)
        elif isinstance(job, ClassifyJob):
            logits = self.classifier.logits(ids, mask[:, piece.start:], output_rows(output, slice(0, 1)),
                                            job.slot.adapter.head)
            [answer] = self._classifications(job, [piece], logits)
            row_done(job, piece.row, answer)
        else:
            if job.params.prompt_logprobs:
                job.prompt_logprobs[piece.row] = long.prompt_logprobs
            logits = self.model.get_output_embeddings()(hidden[:, -1:])[:, -1]  # [1, vocab]
            self._join([self._new_row(job, piece.row)], long.cache, mask, logits)

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
        any_finished = False
        for i, at in enumerate(positions):
            row = batch.rows[at]
            if row.finished:  # static batching: a finished row rides along until the batch ends
                continue
            try:
                params = row.job.params
                if params.max_new_tokens == 0:  # scoring the prompt only: the prefill did it
                    self._finish(row, "length")
                    any_finished = True
                    continue
                token = greedy[i] if params.temperature == 0 else sample(logits[i], params, row.generator)
                batch.last[at] = token
                if params.logprobs is not None:
                    [entry] = token_logprobs(logits[i : i + 1], [token], params.logprobs)
                    row.job.logprobs[row.index].append(entry)  # before _advance streams the token
                if self._advance(row, token):
                    any_finished = True
            except Exception as exc:  # noqa: BLE001 - a row that fails here fails alone
                self._fail_row(row, exc)
                any_finished = True
        if any_finished:
            self._leave()

    def _advance(self, row: Row, token: int) -> bool:
        """Add a token to a row; answer the row and return True if it is finished."""
        params = row.job.params
        progress(row.job, "generate", 1)
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
            settle(job.future, job.results)
        return True

    def _fail_row(self, row: Row, exc: BaseException) -> None:
        log.warning("generation row failed: %r", exc, extra={"request_id": row.job.request.request_id})
        settle(row.job.future, error=exc)  # its other rows leave at the next turn (gone)

    def _leave(self) -> None:
        """Finished rows leave the batch now (static batching: once every row is finished)."""
        batch = self._batch
        if self.continuous:
            keep = [i for i, row in enumerate(batch.rows) if not row.finished]
            self._batch = batch.select(keep) if keep else None
        elif all(row.finished for row in batch.rows):
            self._batch = None

    def _drop_gone_rows(self) -> None:
        """Rows of requests cancelled, failed, past their deadline or left by their client leave before the next
        forward (and before any control job frees their adapter's slot)."""
        if self._batch is not None:
            for job in {id(row.job): row.job for row in self._batch.rows}.values():
                end_if_abandoned(job)
            if any(row.gone for row in self._batch.rows):
                self._leave()

    # ---- adapter slots and merging (worker thread only; callers go through call()) -----------------------------

    def clear_slot(self, index: int) -> None:
        self.merging.forget(index)
        self.prefixes.forget(index)
        for layer in self.layers.values():
            layer.clear_slot(index)
