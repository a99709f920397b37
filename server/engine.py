"""The engine: the one object that owns torch — tokenizer, base model, adapter slots — and runs every model call.

Every forward and every change to the model's modules runs on one worker thread (server/scheduler.py), which
batches queued requests across adapters: PEFT-style shared per-call state is not thread-safe, and a single
serializing point makes batching and merge decisions simple.
Reading and checking adapter files happens in the caller's thread, so a broken adapter never reaches the model
("validate, load, only then evict").
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from transformers import (
    GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
)
from transformers.generation.streamers import BaseStreamer

from .adapter_format import AdapterWeights, Task, read_adapter
from .base_model import BaseInfo, load_base
from .errors import AdapterChanged, AdapterInvalid, InvalidInput, LoraswapError
from .lora import BASE_SLOT, LoraContext, MultiLoraLinear, fit_problems, resolve_module_path, wrap_linear_layers
from .scheduler import Job, Scheduler
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AdapterLocation:
    """Where the registry keeps one version of an adapter; also the key of its slot (a re-created name never
    meets a stale slot: the folder or digest differs)."""

    name: str
    version: int
    folder: Path
    sha256: str = ""


@dataclass
class Slot:
    index: int
    location: AdapterLocation
    task: Task
    labels: list[str] | None
    head_weight: torch.Tensor | None  # [labels, hidden]
    head_bias: torch.Tensor | None
    in_use: int = 0
    pinned: bool = False
    retired: bool = False  # unloaded while in use: freed by the last release()
    load_ms: float = 0.0


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chat: bool = True


@dataclass
class ClassificationResult:
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class GenerationResult:
    generated_text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    tokens: int
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the base's chat template, ending with the assistant's turn opened."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a generation prompt: a user message in the base's chat template when it has one."""
    if chat and tokenizer.chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


class SlotsBusy(LoraswapError):
    """Every adapter slot is in use by a running request."""


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


class RowBudget(StoppingCriteria):
    """Per-row max_new_tokens, so requests with different budgets share one generate call."""

    def __init__(self, budgets: list[int], prompt_width: int, device: torch.device):
        self.budgets = torch.tensor(budgets, device=device)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.budgets


@dataclass
class _Work:
    """One request's rows inside the scheduler."""

    rows: list[list[int]]
    slots: list[Slot] | None = None  # classification
    slot_index: int = BASE_SLOT  # generation
    params: GenerationParams | None = None
    stream: _TokenQueue | None = None  # a streamed generation (one row): its tokens as they come
    observed: bool = False  # counted by the merge policy (a failed batch is retried job by job: count once)


class EngineObserver(Protocol):
    """Listens to engine events (server/metrics.py). Called on engine threads, some under the slot lock: it must
    return quickly and never call back into the engine."""

    def adapter_loaded(self, name: str, seconds: float) -> None: ...

    def adapter_evicted(self, name: str) -> None: ...

    def batch_ran(self, rows: int) -> None: ...


def stop_cut(text: str, stop: tuple[str, ...]) -> int:
    """Where the answer ends: the earliest stop string's position in text, or -1."""
    return min((text.find(s) for s in stop if s in text), default=-1)


class TextDeltas:
    """Incremental decoding for streams: only text that can no longer change goes out.

    Held back: an unfinished multi-byte character (it decodes as U+FFFD until its last byte-token arrives), and as
    many characters as a stop string could still need to match (the answer is cut before a stop string).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold_back = max((len(s) - 1 for s in stop), default=0)
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        """The new stable text after one more generated token ("" if none)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = stop_cut(text, self.stop)
        if cut >= 0:
            stable = text[:cut]
        else:
            stable = text.rstrip("\ufffd")
            stable = stable[: max(len(stable) - self.hold_back, 0)]
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""
        delta, self.sent = stable[len(self.sent):], stable
        return delta

    def finish(self, final_text: str) -> str:
        """What the final answer adds to the text already sent."""
        if not final_text.startswith(self.sent):  # not with prefix-stable decoding; the final result stays the truth
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent, final_text)
            return ""
        return final_text[len(self.sent):]


class _TokenQueue:
    """One streamed row: its new token ids from model.generate (worker thread) to the stream's reader."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[int | None] = queue.Queue()  # None: generation is over
        self.closed = threading.Event()  # the reader has gone: the row stops at its next token
        self.sent = 0  # tokens handed over so far; a rerun of the row (its batch failed) does not send them again


class _BatchStreamer(BaseStreamer):
    """Fans each decode step's new tokens out to the streamed rows of a batch, until each row's EOS or budget."""

    def __init__(self, queues: list[_TokenQueue | None], budgets: list[int], eos: int):
        self.queues = queues
        self.budgets = budgets
        self.eos = eos
        self.produced = [0] * len(queues)
        self.done = [q is None for q in queues]
        self._prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_skipped:  # generate() first puts the whole prompt
            self._prompt_skipped = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            self.produced[i] += 1
            stream = self.queues[i]
            if self.produced[i] > stream.sent:
                stream.tokens.put(token)
                stream.sent += 1
            self.done[i] = token == self.eos or self.produced[i] >= self.budgets[i]

    def end(self) -> None:
        """Nothing: each stream learns its end from its request's future (errors included)."""


class _ClosedRows(StoppingCriteria):
    """Finishes the rows whose stream reader has gone; the batch ends early once every row is finished."""

    def __init__(self, queues: list[_TokenQueue | None], device: torch.device):
        self.queues = queues
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        closed = [q is not None and q.closed.is_set() for q in self.queues]
        return torch.tensor(closed, dtype=torch.bool, device=self.device)


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        info: BaseInfo,
        *,
        max_loaded_adapters: int = 8,
        max_rank: int | None = None,
        max_batch_size: int = 16,
        max_wait_ms: float = 2.0,
        merge_policy: MergePolicy | None = None,
        pinned: list[str] | tuple[str, ...] = (),
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.device = model.device
        self.dtype = model.dtype
        self.context = LoraContext()
        self.layers: dict[str, MultiLoraLinear] = wrap_linear_layers(model, self.context, max_loaded_adapters + 1)
        self.body = getattr(model, model.base_model_prefix)  # the transformer without its LM head
        self.max_rank = max_rank
        # torch's CPU slow path: F.linear on a non-contiguous 3-D input with a frozen weight copies it per row
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].contiguous(),))
        self.observers: list[EngineObserver] = []
        self.merge_policy = merge_policy  # None: never merge automatically
        self._merged: int | None = None  # slot index folded into the base weights (worker thread only)
        self.batch_sizes: Counter[int] = Counter()  # rows per forward, for metrics and benchmarks
        self._scheduler = Scheduler(self._run_batch, max_batch_rows=max_batch_size, max_wait_s=max_wait_ms / 1000)
        self._capacity = max_loaded_adapters
        self._slots: OrderedDict[AdapterLocation, Slot] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(max_loaded_adapters, 0, -1))  # slot 0 is the base
        self._lock = threading.Lock()  # guards _slots/_free/_loading/_pinned
        self._loading: dict[AdapterLocation, threading.Event] = {}
        self._pinned: set[str] = set(pinned)
        self.evictions = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        model, tokenizer, info = load_base(settings.base_model, settings.cache_dir, settings.dtype, settings.device)
        policy = (
            MergePolicy(settings.merge_window, settings.merge_share, settings.unmerge_share)
            if settings.auto_merge
            else None
        )
        return cls(
            model,
            tokenizer,
            info,
            max_loaded_adapters=settings.max_loaded_adapters,
            max_rank=settings.max_rank,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            merge_policy=policy,
            pinned=settings.pinned_adapters,
        )

    def close(self) -> None:
        self._scheduler.close()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread: the one serializing point for every model call."""
        return self._scheduler.call(fn)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the engine thread (not counting the one running)."""
        return self._scheduler.depth()

    def _record_batch(self, rows: int) -> None:
        """Every forward (batched, streamed or seeded) is counted here, on the engine thread."""
        self.batch_sizes[rows] += 1
        for observer in self.observers:
            observer.batch_ran(rows)

    # ---- adapter slots ---------------------------------------------------------------------------------------

    def loaded(self) -> list[AdapterLocation]:
        with self._lock:
            return [slot.location for slot in self._slots.values()]

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return any(key.name == name for key in self._slots)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep an adapter's slots out of LRU eviction (applies to loaded versions and to later loads)."""
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(name)
            for key, slot in self._slots.items():
                if key.name == name:
                    slot.pinned = pinned

    def check_adapter(self, folder: Path) -> AdapterWeights:
        """Read an adapter and check that it fits this base; raise AdapterInvalid with every problem."""
        adapter = read_adapter(folder, max_rank=self.max_rank)
        problems = fit_problems(adapter, self.layers, self.info.hidden_size)
        trained_on = adapter.metadata.get("base_model")
        fingerprint = trained_on.get("fingerprint") if isinstance(trained_on, dict) else None
        if fingerprint and fingerprint != self.info.fingerprint:
            problems.append(f"the adapter was trained on base {trained_on.get('name')!r} ({fingerprint}), not on "
                            f"the loaded {self.info.name!r} ({self.info.fingerprint})")
        if problems:
            raise AdapterInvalid(problems)
        return adapter

    def acquire(self, location: AdapterLocation) -> Slot:
        """Return the slot serving this adapter version, loading it on first use; the caller must release() it.

        Concurrent first requests for one adapter load it once: later callers wait for the first one's load.
        """
        key = location
        while True:
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None:
                    self._slots.move_to_end(key)
                    slot.in_use += 1
                    return slot
                pending = self._loading.get(key)
                if pending is None:
                    pending = self._loading[key] = threading.Event()
                    break
            pending.wait()
        try:
            return self._load(location)
        finally:
            with self._lock:
                del self._loading[key]
            pending.set()

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.in_use -= 1
            free = slot.retired and slot.in_use == 0
        if free:
            self._free_slot(slot)

    def _load(self, location: AdapterLocation) -> Slot:
        started = time.perf_counter()
        try:
            adapter = self.check_adapter(location.folder)  # a broken adapter fails here and evicts nothing
        except (OSError, AdapterInvalid):
            if not location.folder.is_dir():  # deleted or replaced while we read it
                raise AdapterChanged(location.name) from None
            raise
        if location.sha256 and adapter.sha256 != location.sha256:
            raise AdapterChanged(location.name)  # its folder now holds other weights: never serve them as this
        head_weight = head_bias = None
        if adapter.head_weight is not None:
            head_weight = adapter.head_weight.to(self.device, self.dtype)
            head_bias = None if adapter.head_bias is None else adapter.head_bias.to(self.device, self.dtype)
        index, evicted = self._take_free_index()

        def install() -> None:  # one worker call: clearing the evicted adapter and filling the slot
            if evicted:
                self._uninstall(index)
            self._install(index, adapter)

        slot = Slot(index, location, adapter.task, adapter.labels, head_weight, head_bias)
        try:
            self._call(install)
        except BaseException:
            # an install cut short may have filled some layers: clear them, or the next adapter in this slot
            # would inherit them in the modules it does not cover itself
            self._call(lambda: self._uninstall(index))
            with self._lock:
                self._free.append(index)
            raise
        slot.load_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            slot.in_use = 1  # acquired before it becomes visible: nothing can evict or retire it in between
            slot.pinned = location.name in self._pinned
            self._slots[location] = slot
        for observer in self.observers:
            observer.adapter_loaded(location.name, slot.load_ms / 1000)
        log.info("loaded adapter %s v%d (%s, sha256 %s) into slot %d in %.1f ms", location.name,
                 location.version, adapter.task, adapter.sha256[:12], index, slot.load_ms)
        return slot

    def _take_free_index(self) -> tuple[int, bool]:
        """A free slot index, evicting the least recently used idle, unpinned adapter if none is free; and whether
        it was evicted (its layers still hold the old pairs until the caller's install clears them)."""
        with self._lock:
            if self._free:
                return self._free.pop(), False
            victim = next((k for k, s in self._slots.items() if s.in_use == 0 and not s.pinned), None)
            if victim is None:
                raise SlotsBusy(f"all {self._capacity} adapter slots are in use or pinned; retry shortly")
            slot = self._slots.pop(victim)
            self.evictions += 1
            for observer in self.observers:
                observer.adapter_evicted(victim.name)
        log.info("evicting adapter %s v%d from slot %d", victim.name, victim.version, slot.index)
        return slot.index, True

    def unload(self, name: str) -> None:
        """Drop every loaded version of an adapter (deleted or replaced): later requests cannot acquire them, and
        each slot's weights are freed once its last in-flight request releases it, so those finish unchanged."""
        with self._lock:
            slots = [self._slots.pop(k) for k in [k for k in self._slots if k.name == name]]
            for slot in slots:
                slot.retired = True
            idle = [slot for slot in slots if slot.in_use == 0]
        for slot in idle:
            self._free_slot(slot)

    def _free_slot(self, slot: Slot) -> None:
        self._call(lambda: self._uninstall(slot.index))
        slot.head_weight = slot.head_bias = None
        with self._lock:
            self._free.append(slot.index)
        log.info("unloaded adapter %s v%d from slot %d", slot.location.name, slot.location.version, slot.index)

    def _install(self, index: int, adapter: AdapterWeights) -> None:
        for module, pair in adapter.modules.items():
            self.layers[resolve_module_path(module, self.layers)].set_slot(index, pair.A, pair.B, pair.scale)

    def _uninstall(self, index: int) -> None:
        if self._merged == index:
            self._unmerge()
        if self.merge_policy is not None:
            self.merge_policy.forget(index)
        for layer in self.layers.values():
            layer.clear_slot(index)

    # ---- merging (worker thread only) ---------------------------------------------------------------------------

    @property
    def merged_adapter(self) -> str | None:
        """The adapter folded into the base weights now, if any."""
        merged = self._merged
        with self._lock:
            return next((s.location.name for s in self._slots.values() if s.index == merged), None)

    def merge(self, slot: Slot) -> None:
        """Fold one loaded adapter into the base weights; its requests then run at exactly base cost."""
        self._call(lambda: self._merge(slot.index))

    def unmerge(self) -> None:
        self._call(self._unmerge)

    def _merge(self, index: int) -> None:
        if self._merged == index:
            return
        self._unmerge()
        for layer in self.layers.values():
            layer.merge(index)
        self._merged = index
        log.info("merged slot %d into the base weights", index)

    def _unmerge(self) -> None:
        if self._merged is None:
            return
        for layer in self.layers.values():
            layer.unmerge()
        log.info("unmerged slot %d", self._merged)
        self._merged = None

    def _prepare_merge_state(self, batch_slots: set[int]) -> None:
        """Before a forward: mixed batches never run merged; follow the policy when the batch allows it."""
        want = self._merged if self.merge_policy is None else self.merge_policy.choose(self._merged)
        if self._merged is not None and (batch_slots != {self._merged} or want != self._merged):
            self._unmerge()
        if want is not None and want != BASE_SLOT and self._merged is None and batch_slots == {want}:
            self._merge(want)

    def _effective(self, indices: list[int]) -> list[int]:
        """Rows of the merged adapter run as base rows: its weights are already in the base."""
        return [BASE_SLOT if i == self._merged else i for i in indices]

    # ---- inference -------------------------------------------------------------------------------------------

    def _check_lengths(self, lengths: list[int], extra: int, field: str) -> None:
        limit = self.info.max_context
        for i, length in enumerate(lengths):
            if length == 0:
                raise InvalidInput(f"{field}[{i}]", "input is empty")
            if length + extra > limit:
                more = f" + {extra} new tokens" if extra else ""
                raise InvalidInput(
                    f"{field}[{i}]", f"input has {length} tokens{more}, over the model's context of {limit}"
                )

    def encode_for_classification(self, texts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer(text)["input_ids"] for text in texts]
        self._check_lengths([len(x) for x in ids], 0, "inputs")
        return ids

    def encode_for_generation(self, prompts: list[str | list[int]], params: GenerationParams) -> list[list[int]]:
        """Token ids of each prompt: a text (wrapped as `params.chat` says) or ids already encoded (a conversation
        from encode_messages)."""
        ids = [list(p) if isinstance(p, list) else encode_prompt(self.tokenizer, p, params.chat) for p in prompts]
        self._check_lengths([len(x) for x in ids], params.max_new_tokens, "inputs")
        return ids

    def encode_messages(self, messages: list[dict[str, str]], params: GenerationParams) -> list[int]:
        """Prompt ids of a whole conversation ({role, content} dicts) in the base's chat template."""
        if not self.tokenizer.chat_template:
            raise InvalidInput("messages", f"the base {self.info.name!r} has no chat template")
        ids = encode_chat(self.tokenizer, messages)
        self._check_lengths([len(ids)], params.max_new_tokens, "messages")
        return ids

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def _classify_rows(self, rows: list[list[int]], slots: list[Slot]) -> list[ClassificationResult]:
        self._record_batch(len(rows))
        indices = [s.index for s in slots]
        self._prepare_merge_state(set(indices))
        ids, mask = self._pad(rows, "right")
        self.context.set_rows(self._effective(indices), self.device)
        hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, tokens, hidden]
        # pool the rightmost non-pad token, as LlamaForSequenceClassification does (it looks at ids, not mask)
        non_pad = (ids != self.tokenizer.pad_token_id).long()
        last = (torch.arange(ids.shape[1], device=ids.device) * non_pad).argmax(-1)
        pooled = hidden[torch.arange(len(rows), device=ids.device), last]  # [batch, hidden]
        results = []
        for row, slot in enumerate(slots):
            logits = torch.nn.functional.linear(pooled[row], slot.head_weight, slot.head_bias)
            probs = logits.float().softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append(ClassificationResult(slot.labels[best], probs[best], dict(zip(slot.labels, probs))))
        return results

    @torch.no_grad()
    def _generate_rows(
        self,
        rows: list[list[int]],
        slot_indices: list[int],
        params: GenerationParams,
        budgets: list[int],
        streams: list[_TokenQueue | None] | None = None,
    ) -> list[GenerationResult]:
        """One generate call for rows of any adapters sharing sampling settings; budgets: max_new_tokens per row;
        streams: the streamed rows' token queues (None for the others)."""
        self._record_batch(len(rows))
        self._prepare_merge_state(set(slot_indices))
        ids, mask = self._pad(rows, "left")
        self.context.set_rows(self._effective(slot_indices), self.device)
        eos = self.tokenizer.eos_token_id
        sampling = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(budgets),
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=0 if sampling else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            stop_strings=list(params.stop) or None,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        stopping = StoppingCriteriaList()
        if len(set(budgets)) > 1:
            stopping.append(RowBudget(budgets, ids.shape[1], ids.device))
        streamer = None
        if streams is not None and any(streams):
            stopping.append(_ClosedRows(streams, ids.device))
            streamer = _BatchStreamer(streams, budgets, eos)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=self.tokenizer,
            stopping_criteria=stopping, streamer=streamer,
        )
        results = []
        for row, prompt, budget in zip(out[:, ids.shape[1]:].tolist(), rows, budgets):
            row = row[:budget]
            if eos in row:
                row, finish = row[: row.index(eos)], "stop"
            else:
                finish = "length"
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            cut = stop_cut(text, params.stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            results.append(GenerationResult(text, finish, len(row), row, len(prompt)))
        return results

    def _run_batch(self, jobs: list[Job]) -> list[list]:
        """Scheduler callback (worker thread): one forward for every job's rows; results split back per job."""
        works: list[_Work] = [job.payload for job in jobs]
        if self.merge_policy is not None:
            for work in works:
                if not work.observed:
                    self.merge_policy.observe(work.slots[0].index if work.slots is not None else work.slot_index)
                    work.observed = True
        rows = [row for w in works for row in w.rows]
        if works[0].slots is not None:
            flat = self._classify_rows(rows, [slot for w in works for slot in w.slots])
        else:
            indices = [w.slot_index for w in works for _ in w.rows]
            budgets = [w.params.max_new_tokens for w in works for _ in w.rows]
            streams = [w.stream for w in works for _ in w.rows]
            flat = self._generate_rows(rows, indices, works[0].params, budgets, streams)
        results, start = [], 0
        for work in works:
            results.append(flat[start : start + len(work.rows)])
            start += len(work.rows)
        return results

    def classify(self, texts: list[str], slot: Slot) -> list[ClassificationResult]:
        if slot.task != "classification":
            raise InvalidInput("adapter", f"{slot.location.name!r} is a {slot.task} adapter, not classification")
        rows = self.encode_for_classification(texts)
        work = _Work(rows, slots=[slot] * len(rows))
        return self._scheduler.submit("classify", len(rows), work).result()

    def generate(
        self, prompts: list[str | list[int]], slot: Slot | None, params: GenerationParams
    ) -> list[GenerationResult]:
        if slot is not None and slot.task != "generation":
            raise InvalidInput("adapter", f"{slot.location.name!r} is a {slot.task} adapter, not generation")
        rows = self.encode_for_generation(prompts, params)
        work = _Work(rows, slot_index=BASE_SLOT if slot is None else slot.index, params=params)
        return self._submit_generation(work).result()

    def _submit_generation(self, work: _Work) -> Future:
        """Queue a generation; it shares a batch with others of the same sampling settings (the future's result is
        its rows' results). Seeded sampling runs alone so that its random stream does not depend on others."""
        params = work.params
        if params.seed is not None:
            return self._scheduler.call_async(lambda: self._run_batch([Job(None, len(work.rows), work)])[0])
        top_p = params.top_p if params.temperature > 0 else None  # greedy ignores top_p: batch those together
        return self._scheduler.submit(("generate", params.temperature, top_p, params.stop), len(work.rows), work)

    def predict(
        self, location: AdapterLocation | None, texts: list[str | list[int]], params: GenerationParams
    ) -> tuple[Task, list[ClassificationResult] | list[GenerationResult]]:
        """Serve texts with one adapter version (None: the base generates); loads the adapter if needed.
        Generation also takes prompt ids (encode_messages); classification takes texts only."""
        if location is None:
            return "generation", self.generate(texts, None, params)
        slot = self.acquire(location)
        try:
            if slot.task == "classification":
                return "classification", self.classify(texts, slot)
            return "generation", self.generate(texts, slot, params)
        finally:
            self.release(slot)

    def generate_stream(
        self, prompt: str | list[int], slot: Slot | None, params: GenerationParams
    ) -> Iterator[str | GenerationResult]:
        """Yield text deltas while one prompt (text, or ids from encode_messages) generates, then the final result.

        The final result is generate()'s answer (the same `_generate_rows` runs, with a streamer that copies each
        new token id into a queue) and the deltas concatenate to its text (see TextDeltas). Closing the iterator
        early stops the generation at its next token.
        """
        if slot is not None and slot.task != "generation":
            raise InvalidInput("adapter", f"{slot.location.name!r} is a {slot.task} adapter, not generation")
        stream = _TokenQueue()
        work = _Work(self.encode_for_generation([prompt], params), slot_index=BASE_SLOT if slot is None else slot.index,
                     params=params, stream=stream)
        future = self._submit_generation(work)
        future.add_done_callback(lambda _: stream.tokens.put(None))
        deltas = TextDeltas(self.tokenizer, params.stop)
        try:
            while (token := stream.tokens.get()) is not None:
                if delta := deltas.add(token):
                    yield delta
            [result] = future.result()
        finally:
            stream.closed.set()
        if rest := deltas.finish(result.generated_text):
            yield rest
        yield result

    def predict_stream(
        self, location: AdapterLocation | None, prompt: str | list[int], params: GenerationParams
    ) -> Iterator[str | GenerationResult | ClassificationResult]:
        """predict() for one input as a stream: a generation adapter (or the base) yields text deltas then its
        GenerationResult, a classification adapter (text prompts only) yields its ClassificationResult.
        The adapter is held until the stream ends or is closed."""
        if location is None:
            yield from self.generate_stream(prompt, None, params)
            return
        slot = self.acquire(location)
        try:
            if slot.task == "classification":
                if not isinstance(prompt, str):
                    raise InvalidInput("adapter", f"{location.name!r} is a classification adapter: it takes text")
                yield from self.classify([prompt], slot)
            else:
                yield from self.generate_stream(prompt, slot, params)
        finally:
            self.release(slot)
