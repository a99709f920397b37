"""The engine: the one object that owns torch (tokenizer, base model, adapter slots) and serves requests on it.

Three parts, each in its own module: the adapter slots (server/slots.py: LRU, pinning, load-once; no torch), the
model runner (server/runner.py: the one worker thread, whose step loop batches every request across adapters), and
input encoding (server/encoding.py). Reading and checking adapter files happens in the caller's thread, so a broken
adapter never reaches the model ("validate, load, only then evict").
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from queue import Queue
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import panels
from .adapter_format import AdapterWeights, read_adapter
from .admission import AdmissionGate
from .base_model import BaseInfo, load_base
from .encoding import InputEncoder, TextDeltas
from .errors import AdapterChanged, AdapterForOtherBase, AdapterInvalid, InvalidInput, LoraswapError
from .heads import SequenceClassifier
from .jobs import ClassifyJob, EmbedJob, GenerateJob
from .lora import LoraContext, MultiLoraLinear, fit_problems, resolve_module_path, wrap_linear_layers
from .merging import MergePolicy
from .mixtures import combine, config_rank, mixture_problems
from .request_context import current_request
from .runner import ModelRunner
from .settings import Settings
from .slots import BASE_SLOT, AdapterSlots, Installer, LoadedAdapter, Slot, SlotsBusy
from .types import (
    AdapterLocation, ClassificationResult, EmbeddingResult, GenerationParams, GenerationResult, MixtureKey, SlotKey,
    Task, TokenLogprob,
)

log = logging.getLogger(__name__)
SLOT_WAIT_S = 60.0  # how long a request without a deadline waits for an adapter slot when all are in use


class EngineObserver(Protocol):
    """Listens to engine events (server/metrics.py). Called on engine threads, some under the slot lock: it must
    return quickly and never call back into the engine."""

    def adapter_loaded(self, name: str, seconds: float) -> None: ...

    def adapter_evicted(self, name: str) -> None: ...

    def batch_ran(self, rows: int) -> None: ...


def attention_weight(config, layers: dict[str, MultiLoraLinear]) -> float:
    """What attending to one earlier position costs a token, relative to the token's linear layers (multiply-adds:
    QK and AV over every head, against every wrapped weight of one transformer layer)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    linear = sum(layer.base.weight.numel() for layer in layers.values()) / config.num_hidden_layers
    return 2 * heads * head_dim / linear


def pack_weights(model: PreTrainedModel, layers: dict[str, MultiLoraLinear]) -> None:
    """Inference matmuls on weights packed in panels (server/panels.py): every wrapped layer and the LM head. Where
    that path is unavailable (not float32 on the CPU, no C compiler) the layers stay as they are."""
    for layer in layers.values():
        layer.pack()
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and (weight := panels.pack(head.weight)) is not None:
        model.set_output_embeddings(panels.PanelLinear(head, weight))


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
        max_batch_tokens: int = 256,
        max_wait_ms: float = 2.0,
        merge_policy: MergePolicy | None = None,
        pinned: list[str] | tuple[str, ...] = (),
        continuous: bool = True,
        packed_weights: bool = True,
        compile_decode: bool = True,
        admission: AdmissionGate | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.device = model.device
        self.dtype = model.dtype
        self.max_rank = max_rank
        self.encoder = InputEncoder(tokenizer, info.max_context, info.name)
        context = LoraContext()
        self.layers: dict[str, MultiLoraLinear] = wrap_linear_layers(model, context, max_loaded_adapters + 1)
        self.classifier = SequenceClassifier(
            model.config, tokenizer.pad_token_id, {name: getattr(model, name) for name in info.trained_heads}
        )
        if (lm_head := model.get_output_embeddings()) is not None:
            # torch's CPU slow path: F.linear on a non-contiguous 3-D input with a frozen weight copies it per row
            lm_head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(),))
        if packed_weights:
            pack_weights(model, self.layers)
        self.runner = ModelRunner(
            model, tokenizer, self.layers, context, self.classifier, max_batch_rows=max_batch_size,
            max_batch_tokens=max_batch_tokens, max_wait_s=max_wait_ms / 1000, merge_policy=merge_policy,
            continuous=continuous, chunkable="generation" in info.tasks,  # a decoder: causal attention
            context_weight=attention_weight(model.config, self.layers), compile_decode=compile_decode,
        )
        self.slots = AdapterSlots(max_loaded_adapters, self._prepare, self._clear, pinned)
        self.admission = admission or AdmissionGate(max_rows=2**31, max_tokens=2**62)  # default: unbounded
        self.observers: list[EngineObserver] = []  # shared with the slots and the runner
        self.slots.observers = self.runner.observers = self.observers
        self.runner.call(self.runner.calibrate)  # the admission gate's first estimates of what work costs

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
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_ms=settings.max_wait_ms,
            merge_policy=policy,
            pinned=settings.pinned_adapters,
            continuous=settings.scheduling == "continuous",
            packed_weights=settings.packed_weights,
            compile_decode=settings.compile_decode,
            admission=AdmissionGate(settings.max_rows_in_flight, settings.max_tokens_in_flight, settings.retry_after_s,
                                    settings.max_request_share, settings.admission_wait_share),
        )

    def close(self) -> None:
        self.runner.close()

    def abort(self, error: LoraswapError) -> None:
        """Stop at the next turn, answering every request queued or running with `error` (shutdown)."""
        self.runner.abort(error)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the engine thread (not counting rows being generated)."""
        return self.runner.depth()

    @property
    def batch_sizes(self) -> Counter[int]:
        """Rows per forward (classification, prefill or decode step)."""
        return self.runner.batch_sizes

    @property
    def evictions(self) -> int:
        return self.slots.evictions

    @property
    def merge_policy(self) -> MergePolicy | None:
        return self.runner.merging.policy

    # ---- adapter slots ---------------------------------------------------------------------------------------

    def acquire(self, location: SlotKey) -> Slot:
        """The slot serving this adapter version (or mixture), loaded (built) on first use (once, however many ask
        at the same time); the caller must release() it. With every slot in use, it waits for one until the
        request's deadline (without one, SLOT_WAIT_S)."""
        request = current_request()
        deadline = request.deadline
        wait_s = SLOT_WAIT_S if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return self.slots.acquire(location, wait_s)
        except SlotsBusy:
            if request.expired():
                raise request.deadline_error() from None
            raise

    def release(self, slot: Slot) -> None:
        self.slots.release(slot)

    def unload(self, name: str) -> None:
        """Drop every loaded version of an adapter (deleted or replaced), and every mixture of it; requests in
        flight finish on them."""
        self.slots.unload(name)

    def loaded(self) -> list[SlotKey]:
        return self.slots.loaded()

    def loaded_kinds(self) -> Counter[str]:
        """Slots in memory by what they hold: "lora", "dora" or "mixture"."""
        return self.slots.kinds()

    def mixtures(self) -> list[dict]:
        """The mixtures in memory now (least recently used first): name, combination, parts and weights."""
        return [key.describe() for key in self.slots.loaded() if isinstance(key, MixtureKey)]

    def is_loaded(self, name: str) -> bool:
        return self.slots.is_loaded(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        self.slots.pin(name, pinned)

    def check_adapter(self, folder: Path) -> AdapterWeights:
        """Read an adapter and check that it fits this base; raise AdapterInvalid with every problem."""
        adapter, _ = self._checked(folder)
        return adapter

    def _checked(self, folder: Path) -> tuple[AdapterWeights, dict[str, torch.nn.Module] | None]:
        """The adapter and its classification head modules (built here, in the caller's thread), or AdapterInvalid
        listing every way it does not fit this base."""
        adapter = read_adapter(folder, max_rank=self.max_rank)
        trained_on = adapter.metadata.get("base_model")
        fingerprint = trained_on.get("fingerprint") if isinstance(trained_on, dict) else None
        if fingerprint and fingerprint != self.info.fingerprint:  # says it all: the rest would list every module
            raise AdapterForOtherBase(f"the adapter was trained on base {trained_on.get('name')!r} ({fingerprint}), "
                                      f"not on the loaded {self.info.name!r} ({self.info.fingerprint})",
                                      str(trained_on.get("name")))
        problems = fit_problems(adapter, self.layers, self.model)
        if adapter.task not in self.info.tasks:
            problems.append(f"a {adapter.task} adapter does not fit the base {self.info.name!r}: it is a "
                            f"{self.info.architecture} ({self.info.family}), serving {', '.join(self.info.tasks)}")
        head = None
        if adapter.task == "classification" and adapter.labels is not None:
            head, head_problems = self.classifier.build(adapter.head, len(adapter.labels), self.device, self.dtype)
            problems += head_problems
        problems += self._modules_to_save_problems(adapter)
        if problems:
            raise AdapterInvalid(problems)
        return adapter, head

    def _modules_to_save_problems(self, adapter: AdapterWeights) -> list[str]:
        """modules_to_save names (besides the 'classifier' and 'score' PEFT adds to every SEQ_CLS adapter) that
        match no module of the base, as PEFT matches them (by path suffix)."""
        named = adapter.config.get("modules_to_save") or []
        if not isinstance(named, list):
            return ["modules_to_save must be a list of module names"]
        paths = [path for path, _ in self.model.named_modules()]
        return [f"modules_to_save names {name!r}, a module the base {self.info.architecture} does not have"
                for name in named if name not in ("classifier", "score")
                and not any(path == name or path.endswith(f".{name}") for path in paths)]

    def _prepare(self, location: SlotKey) -> Installer:
        """Read and check one adapter version, or build a mixture (caller's thread); return what installs it into
        a slot."""
        if isinstance(location, MixtureKey):
            return self._prepare_mixture(location)
        adapter, head = self._read(location)

        def install(index: int, evicting: bool) -> LoadedAdapter:
            self.runner.call(lambda: self._fill(index, adapter, evicting))
            log.info("adapter %s v%d has sha256 %s", location.name, location.version, adapter.sha256[:12])
            return LoadedAdapter(adapter.task, adapter.labels, head, kind="dora" if adapter.dora else "lora")

        return install

    def _read(self, location: AdapterLocation) -> tuple[AdapterWeights, dict[str, torch.nn.Module] | None]:
        """One adapter version as checked by _checked; AdapterChanged if its folder no longer holds that version."""
        try:
            adapter, head = self._checked(location.folder)
        except (OSError, AdapterInvalid):
            if not location.folder.is_dir():  # deleted or replaced while we read it
                raise AdapterChanged(location.name) from None
            raise
        if location.sha256 and adapter.sha256 != location.sha256:
            raise AdapterChanged(location.name)  # its folder now holds other weights: never serve them as this
        return adapter, head

    def _prepare_mixture(self, key: MixtureKey) -> Installer:
        """Read the parts and combine their LoRA pairs as PEFT's add_weighted_adapter does (server/mixtures.py);
        InvalidInput (field `adapters`) with every reason they cannot be combined."""
        parts = [(part.location.name, self._read(part.location)[0]) for part in key.parts]
        problems = mixture_problems(parts, key.combination)
        if problems:
            raise InvalidInput("adapters", "; ".join(problems))
        prefix = self.model.base_model_prefix
        resolved = [{resolve_module_path(module, self.layers, prefix): pair for module, pair in adapter.modules.items()}
                    for _, adapter in parts]
        modules = combine(resolved, [part.weight for part in key.parts], key.combination, list(self.layers),
                          density=key.density, seed=key.seed or 0, rslora=bool(parts[0][1].config.get("use_rslora")))
        if not all(torch.isfinite(t).all() for pair in modules.values() for t in (pair.A, pair.B)):
            raise InvalidInput("adapters", "these weights make the mixture's tensors overflow (Inf or NaN)")
        rank = max(pair.rank for pair in modules.values())
        if self.max_rank is not None and rank > self.max_rank:
            raise InvalidInput("adapters", f"the mixture has rank {rank} ({key.combination} of ranks "
                               f"{[config_rank(a) for _, a in parts]}), over the configured maximum of {self.max_rank}")
        mixture = AdapterWeights(task=parts[0][1].task, modules=modules, rank=rank)

        def install(index: int, evicting: bool) -> LoadedAdapter:
            self.runner.call(lambda: self._fill(index, mixture, evicting))
            return LoadedAdapter(mixture.task, kind="mixture")

        return install

    def _fill(self, index: int, adapter: AdapterWeights, evicting: bool) -> None:
        """Worker thread: clear the evicted adapter and fill the slot, in one call; a fill cut short is cleared,
        or the next adapter in this slot would inherit pairs in the modules it does not cover itself."""
        if evicting:
            self.runner.clear_slot(index)
        try:
            for module, pair in adapter.modules.items():
                path = resolve_module_path(module, self.layers, self.model.base_model_prefix)
                self.layers[path].set_slot(index, pair.A, pair.B, pair.scale, pair.magnitude)
        except BaseException:
            self.runner.clear_slot(index)
            raise

    def _clear(self, index: int) -> None:
        self.runner.call(lambda: self.runner.clear_slot(index))

    # ---- merging ---------------------------------------------------------------------------------------------

    @property
    def merged_adapter(self) -> str | None:
        """The adapter folded into the base weights now, if any."""
        merged = self.runner.merging.merged
        return None if merged is None else self.slots.name_of(merged)

    def merge(self, slot: Slot) -> None:
        """Fold one loaded adapter into the base weights; its requests then run at exactly base cost."""
        self.runner.call(lambda: self.runner.merging.merge(slot.index))

    def unmerge(self) -> None:
        self.runner.call(self.runner.merging.unmerge)

    # ---- inference -------------------------------------------------------------------------------------------

    def encode_for_classification(self, texts: list[str]) -> list[list[int]]:
        return self.encoder.for_classification(texts)

    def check_generates(self) -> None:
        """InvalidInput (422) saying why, where the base cannot generate text (an encoder)."""
        if "generation" not in self.info.tasks:
            raise InvalidInput("model", f"the base {self.info.name!r} is a {self.info.architecture} (an encoder): it "
                               f"serves {' and '.join(self.info.tasks)}, it cannot generate text")

    def encode_for_generation(self, prompts: list[str | list[int]], params: GenerationParams) -> list[list[int]]:
        self.check_generates()
        return self.encoder.for_generation(prompts, params)

    def encode_messages(self, messages: list[dict[str, str]], params: GenerationParams) -> list[int]:
        self.check_generates()
        return self.encoder.messages(messages, params)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens included: a prompt sent as ids echoed back, a token in logprobs."""
        return self.tokenizer.decode(ids)

    def classify(self, texts: list[str], slot: Slot) -> list[ClassificationResult]:
        if slot.task != "classification":
            raise InvalidInput("adapter", f"{slot.location.name!r} is an adapter for {slot.task}, not classification")
        rows = self.encoder.for_classification(texts)
        return self._admitted(ClassifyJob(rows, slot)).result()

    def embed(self, location: SlotKey | None, inputs: list[str | list[int]]) -> list[EmbeddingResult]:
        """Mean-pooled, L2-normalized last hidden states (float32) of texts or token ids, with an adapter's LoRA
        applied (any adapter: its body is what counts) or the base's own (None). Batched with classifications."""
        self.admission.check()
        rows = self.encoder.for_embedding(inputs)
        if location is None:
            return self._admitted(EmbedJob(rows, BASE_SLOT)).result()
        slot = self.acquire(location)
        try:
            return self._admitted(EmbedJob(rows, slot.index)).result()
        finally:
            self.release(slot)

    def _admitted(self, job: ClassifyJob | EmbedJob | GenerateJob) -> Future:
        """Queue a job if the admission gate lets it in (else Overloaded, or InvalidInput for a request larger than
        one may be); its future's end frees what it holds. Generation rows hold KV tokens (prompt plus
        max_new_tokens); every job brings work to the scheduler's lanes, which the gate weighs against the time
        before the request's deadline."""
        kv_tokens = sum(len(row) + job.params.max_new_tokens for row in job.rows) if isinstance(job, GenerateJob) else 0
        deadline = job.request.deadline
        time_left_s = None if deadline is None else deadline - time.monotonic()
        steps = job.params.max_new_tokens if isinstance(job, GenerateJob) else 0
        job.ticket = ticket = self.admission.reserve(len(job.rows), kv_tokens, self.runner.scheduler.work(job),
                                                     time_left_s, self.runner.costs, steps)
        try:
            future = self.runner.generate(job) if isinstance(job, GenerateJob) else self.runner.classify(job)
        except BaseException:
            ticket.release()
            raise
        future.add_done_callback(ticket.release)
        return future

    def _generation_job(
        self, prompts: list[str | list[int]], slot: Slot | None, params: GenerationParams, stream: bool = False
    ) -> GenerateJob:
        if slot is not None and slot.task != "generation":
            raise InvalidInput("adapter", f"{slot.location.name!r} is an adapter for {slot.task}, not generation")
        rows = self.encode_for_generation(prompts, params)
        return GenerateJob(rows, BASE_SLOT if slot is None else slot.index, params, Queue() if stream else None)

    def generate(
        self, prompts: list[str | list[int]], slot: Slot | None, params: GenerationParams
    ) -> list[GenerationResult]:
        """Every prompt is one row of the shared decode batch; the answers come when the last row finishes."""
        job = self._generation_job(prompts, slot, params)
        return self._admitted(job).result()

    def predict(
        self, location: SlotKey | None, texts: list[str | list[int]], params: GenerationParams
    ) -> tuple[Task, list[ClassificationResult] | list[GenerationResult]]:
        """Serve texts with one adapter version (None: the base generates); loads the adapter if needed.
        Generation also takes prompt ids (encode_messages); classification takes texts only."""
        self.admission.check()  # a full engine refuses before it loads anything
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
    ) -> Iterator[str | TokenLogprob | GenerationResult]:
        """Yield text deltas while one prompt (text, or ids from encode_messages) generates, then the final result.

        The row gets one token per decode step; the deltas concatenate to the final text (see TextDeltas). With
        params.logprobs, each token's TokenLogprob comes before the delta it makes (text may be held back).
        Closing the iterator early cancels the request: its row leaves the batch at the next step.
        """
        job = self._generation_job([prompt], slot, params, stream=True)
        future = self._admitted(job)
        deltas = TextDeltas(self.tokenizer, params.stop)
        try:
            while (token := job.stream.get()) is not None:
                if params.logprobs is not None:
                    yield job.logprobs[0][len(deltas.ids)]  # the runner adds it before it streams the token
                if delta := deltas.add(token):
                    yield delta
            [result] = future.result()
        finally:
            future.cancel()  # no-op once answered
        yield from (result.logprobs or [])[len(deltas.ids):]  # the EOS that ended it: scored, never streamed
        if rest := deltas.finish(result.generated_text):
            yield rest
        yield result

    def predict_stream(
        self, location: SlotKey | None, prompt: str | list[int], params: GenerationParams
    ) -> Iterator[str | TokenLogprob | GenerationResult | ClassificationResult]:
        """predict() for one input as a stream: a generation adapter (or the base) yields text deltas then its
        GenerationResult, a classification adapter (text prompts only) yields its ClassificationResult.
        The adapter is held until the stream ends or is closed."""
        self.admission.check()
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
