"""The engine: the one object that owns torch — tokenizer, base model, adapter slots — and runs every model call.

Every forward and every change to the model's modules runs on one worker thread (`_call`): PEFT-style shared
per-call state is not thread-safe, and a single serializing point also makes batching decisions simple.
Reading and checking adapter files happens in the caller's thread, so a broken adapter never reaches the model
("validate, load, only then evict").
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from .adapter_format import AdapterWeights, Task, read_adapter
from .base_model import BaseInfo, load_base
from .errors import AdapterInvalid, InvalidInput, LoraswapError
from .lora import BASE_SLOT, LoraContext, MultiLoraLinear, fit_problems, resolve_module_path, wrap_linear_layers
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AdapterLocation:
    """Where the registry keeps one version of an adapter."""

    name: str
    version: int
    folder: Path
    sha256: str = ""


class AdapterSource(Protocol):
    def locate(self, name: str) -> AdapterLocation: ...


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


class SlotsBusy(LoraswapError):
    """Every adapter slot is in use by a running request."""


class EngineObserver(Protocol):
    """Listens to engine events (server/metrics.py). Called on engine threads, some under the slot lock: it must
    return quickly and never call back into the engine."""

    def adapter_loaded(self, name: str, seconds: float) -> None: ...

    def adapter_evicted(self, name: str) -> None: ...

    def batch_ran(self, rows: int) -> None: ...


class StreamClosed(Exception):
    """Raised inside model.generate when the reader of a stream has gone: it frees the engine thread."""


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
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
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


class _TokenQueue(BaseStreamer):
    """Hands each new token id from model.generate (engine thread) to the reader of a stream (caller thread)."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[int | None] = queue.Queue()  # None: generation is over
        self.closed = threading.Event()
        self._prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if self.closed.is_set():
            raise StreamClosed
        if not self._prompt_skipped:  # generate() first puts the whole prompt
            self._prompt_skipped = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self) -> None:
        """Nothing: the job that runs generate() marks the end in its `finally`, which also covers errors."""


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        info: BaseInfo,
        *,
        max_loaded_adapters: int = 8,
        max_rank: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.device = model.device
        self.dtype = model.dtype
        self.context = LoraContext()
        self.layers: dict[str, MultiLoraLinear] = wrap_linear_layers(model, self.context)
        self.body = getattr(model, model.base_model_prefix)  # the transformer without its LM head
        self.max_rank = max_rank
        # torch's CPU slow path: F.linear on a non-contiguous 3-D input with a frozen weight copies it per row
        model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].contiguous(),))
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._capacity = max_loaded_adapters
        self._slots: OrderedDict[tuple[str, int], Slot] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(max_loaded_adapters, 0, -1))  # slot 0 is the base
        self._lock = threading.Lock()  # guards _slots/_free/_loading
        self._loading: dict[tuple[str, int], threading.Event] = {}
        self.evictions = 0
        self.observers: list[EngineObserver] = []
        self.merged_adapter: str | None = None  # the adapter merged into the base weights (merge mode), if any
        self._waiting = 0  # jobs submitted to the engine thread and not started yet
        self._waiting_lock = threading.Lock()  # separate from _lock: _take_free_index calls _call holding _lock

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        model, tokenizer, info = load_base(settings.base_model, settings.cache_dir, settings.dtype, settings.device)
        return cls(model, tokenizer, info, max_loaded_adapters=settings.max_loaded_adapters)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread: the one serializing point for every model call."""
        return self._submit(fn).result()

    def _submit(self, fn: Callable[[], T]) -> Future[T]:
        with self._waiting_lock:
            self._waiting += 1

        def started() -> T:
            with self._waiting_lock:
                self._waiting -= 1
            return fn()

        return self._worker.submit(started)

    @property
    def queue_depth(self) -> int:
        """Model calls waiting for the engine thread (not counting the one running)."""
        with self._waiting_lock:
            return self._waiting

    # ---- adapter slots ---------------------------------------------------------------------------------------

    def loaded(self) -> list[AdapterLocation]:
        with self._lock:
            return [slot.location for slot in self._slots.values()]

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return any(key[0] == name for key in self._slots)

    def check_adapter(self, folder: Path) -> AdapterWeights:
        """Read an adapter and check that it fits this base; raise AdapterInvalid with every problem."""
        adapter = read_adapter(folder, max_rank=self.max_rank)
        problems = fit_problems(adapter, self.layers, self.info.hidden_size)
        if problems:
            raise AdapterInvalid(problems)
        return adapter

    def acquire(self, location: AdapterLocation) -> Slot:
        """Return the slot serving this adapter version, loading it on first use; the caller must release() it.

        Concurrent first requests for one adapter load it once: later callers wait for the first one's load.
        """
        key = (location.name, location.version)
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
            slot = self._load(location)
            with self._lock:
                slot.in_use += 1
            return slot
        finally:
            with self._lock:
                del self._loading[key]
            pending.set()

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.in_use -= 1

    def _load(self, location: AdapterLocation) -> Slot:
        started = time.perf_counter()
        adapter = self.check_adapter(location.folder)  # a broken adapter fails here and evicts nothing
        with self._lock:
            index = self._take_free_index()
        slot = Slot(index, location, adapter.task, adapter.labels, None, None)
        if adapter.head_weight is not None:
            slot.head_weight = adapter.head_weight.to(self.device, self.dtype)
            slot.head_bias = None if adapter.head_bias is None else adapter.head_bias.to(self.device, self.dtype)
        try:
            self._call(lambda: self._install(index, adapter))
        except BaseException:
            with self._lock:
                self._free.append(index)
            raise
        slot.load_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            self._slots[(location.name, location.version)] = slot
        for observer in self.observers:
            observer.adapter_loaded(location.name, slot.load_ms / 1000)
        log.info("loaded adapter %s v%d (%s, sha256 %s) into slot %d in %.1f ms", location.name,
                 location.version, adapter.task, adapter.sha256[:12], index, slot.load_ms)
        return slot

    def _take_free_index(self) -> int:
        """A free slot index, evicting the least recently used idle adapter if needed (caller holds _lock)."""
        if not self._free:
            victim = next((k for k, s in self._slots.items() if s.in_use == 0 and not s.pinned), None)
            if victim is None:
                raise SlotsBusy(f"all {self._capacity} adapter slots are in use or pinned; retry shortly")
            slot = self._slots.pop(victim)
            self._call(lambda: self._uninstall(slot.index))
            self._free.append(slot.index)
            self.evictions += 1
            for observer in self.observers:
                observer.adapter_evicted(victim[0])
            log.info("evicted adapter %s v%d from slot %d", victim[0], victim[1], slot.index)
        return self._free.pop()

    def unload(self, name: str) -> None:
        """Drop every loaded version of an adapter (waits for nothing: in-flight users keep their tensors)."""
        with self._lock:
            keys = [k for k in self._slots if k[0] == name]
            slots = [self._slots.pop(k) for k in keys]
        for slot in slots:
            self._call(lambda s=slot: self._uninstall(s.index))
            with self._lock:
                self._free.append(slot.index)
            log.info("unloaded adapter %s v%d", slot.location.name, slot.location.version)

    def _install(self, index: int, adapter: AdapterWeights) -> None:
        for module, pair in adapter.modules.items():
            self.layers[resolve_module_path(module, self.layers)].set_slot(index, pair.A, pair.B, pair.scale)

    def _uninstall(self, index: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(index)

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

    def encode_for_generation(self, prompts: list[str], params: GenerationParams) -> list[list[int]]:
        if params.chat and self.tokenizer.chat_template:
            ids = [self._apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        else:
            ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        self._check_lengths([len(x) for x in ids], params.max_new_tokens, "inputs")
        return ids

    def encode_messages(self, messages: list[dict[str, str]], params: GenerationParams) -> list[int]:
        """Prompt ids of a whole conversation ({role, content} dicts) in the base's chat template."""
        if not self.tokenizer.chat_template:
            raise InvalidInput("messages", f"the base {self.info.name!r} has no chat template")
        ids = self._apply_chat_template(messages)
        self._check_lengths([len(ids)], params.max_new_tokens, "messages")
        return ids

    def _apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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

    @torch.inference_mode()
    def _classify_rows(self, rows: list[list[int]], slots: list[Slot]) -> list[ClassificationResult]:
        self._notify_batch(len(rows))
        ids, mask = self._pad(rows, "right")
        self.context.set_rows([s.index for s in slots], self.device)
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

    @torch.inference_mode()
    def _generate_rows(
        self,
        rows: list[list[int]],
        slot_indices: list[int],
        params: GenerationParams,
        streamer: BaseStreamer | None = None,
    ) -> list[GenerationResult]:
        self._notify_batch(len(rows))
        ids, mask = self._pad(rows, "left")
        self.context.set_rows(slot_indices, self.device)
        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None,
            top_p=params.top_p if params.temperature > 0 else None,
            top_k=0 if params.temperature > 0 else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            stop_strings=list(params.stop) or None,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=self.tokenizer, streamer=streamer
        )
        results = []
        for row, prompt in zip(out[:, ids.shape[1]:].tolist(), rows):
            if eos in row:
                row, finish = row[: row.index(eos)], "stop"
            else:
                finish = "length"
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            results.append(GenerationResult(text, finish, len(row), row, len(prompt)))
        return results

    def _notify_batch(self, rows: int) -> None:
        for observer in self.observers:
            observer.batch_ran(rows)

    def classify(self, texts: list[str], slot: Slot) -> list[ClassificationResult]:
        if slot.task != "classification":
            raise InvalidInput("adapter", f"{slot.location.name!r} is a {slot.task} adapter, not classification")
        rows = self.encode_for_classification(texts)
        return self._call(lambda: self._classify_rows(rows, [slot] * len(rows)))

    def generate(self, prompts: list[str], slot: Slot | None, params: GenerationParams) -> list[GenerationResult]:
        if slot is not None and slot.task != "generation":
            raise InvalidInput("adapter", f"{slot.location.name!r} is a {slot.task} adapter, not generation")
        rows = self.encode_for_generation(prompts, params)
        index = BASE_SLOT if slot is None else slot.index
        return self._call(lambda: self._generate_rows(rows, [index] * len(rows), params))

    def predict(
        self, location: AdapterLocation | None, texts: list[str], params: GenerationParams
    ) -> tuple[Task, list[ClassificationResult] | list[GenerationResult]]:
        """Serve texts with one adapter version (None: the base generates); loads the adapter if needed."""
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
        if isinstance(prompt, str):
            [row] = self.encode_for_generation([prompt], params)
        else:
            row = list(prompt)
            self._check_lengths([len(row)], params.max_new_tokens, "inputs")
        index = BASE_SLOT if slot is None else slot.index
        streamer = _TokenQueue()

        def job() -> list[GenerationResult]:
            try:
                return self._generate_rows([row], [index], params, streamer)
            finally:
                streamer.tokens.put(None)

        future = self._submit(job)
        deltas = TextDeltas(self.tokenizer, params.stop)
        try:
            while (token := streamer.tokens.get()) is not None:
                if delta := deltas.add(token):
                    yield delta
            [result] = future.result()
        finally:
            streamer.closed.set()
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
