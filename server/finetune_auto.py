"""`auto` fine-tuning choices, decided from the data and the loaded base (torch-free).

One implementation for both trainers: a fine-tuning job decides its plan when it is created (and states every
choice in its events), and train-adapter decides the same plan for the same data and base. Each choice a caller
gives explicitly wins over the automatic one.

- LoRA targets: every Linear/Conv1D layer name inside the base's repeated blocks (the layers the server wraps), so
  Llama gets q/k/v/o/gate/up/down_proj, GPT-2 c_attn/c_proj/c_fc, BERT query/key/value/dense, without a table of
  names. Adapting all of a block's linear layers beats attention-only LoRA at the same rank (QLoRA, Dettmers 2023).
- Layers and learning rate per family: a decoder adapts its top half of layers (the backward pass stops at the
  lowest adapted layer: on a CPU that is most of the cost) at 8e-4 for a classifier (its head starts random) and
  3e-4 for generation; a small encoder adapts every layer at 1e-3. These are the shipped adapters' settings
  (adapters/*/loraswap.json). Measured on SmolLM2 with 200 rows (benchmarks/finetune_auto.py's draws; dev
  accuracy): sst2 73.5 % with the top quarter at 8e-4, 81.5 % with the top half at 4e-4 or 8e-4; sms_spam 98.5 %
  with the top quarter or half at 8e-4 but 95.0 % with the top half at 4e-4 (its 15 spam rows need the higher rate).
- Epochs from the number of rows: three passes, but at least MIN_EXAMPLES and at most MAX_EXAMPLES rows seen.
- Class weights (inverse frequency) when the largest class has 1.5 times the rows of the smallest: a skewed file
  otherwise teaches "always the majority class".
- max_length: the 95th percentile of the rows' token lengths (classification; longer rows are cut) or the longest
  row (generation: a cut answer teaches a cut answer), within the base's context.
- A validation split held out from the training file when none is given, stratified by label.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

MIN_ROWS_PER_CLASS = 5  # fewer cannot both train a label and hold one out to check it
MIN_GENERATION_ROWS = 5
MIN_EXAMPLES = 640  # rows seen in training, at least (80 steps of 8)
MAX_EXAMPLES = 3200  # ... and at most: a CPU trains about one step of 8 rows a second or slower
TARGET_EPOCHS = 3
VALIDATION_FRACTION = 0.15
MAX_VALIDATION_ROWS = 200
SKEW_RATIO = 1.5  # largest / smallest class from which the loss is weighted
LENGTH_PERCENTILE = 0.95
BATCH_SIZE = 8
LEARNING_RATES = {("decoder", "classification"): 8e-4, ("decoder", "generation"): 3e-4,
                  ("encoder", "classification"): 1e-3}
DECODER_LAYER_FRACTION = 0.5  # a decoder adapts its top half of layers
MIN_DECODER_LAYERS = 2
MAX_NEW_TOKENS_CAP = 256
_BLOCK = re.compile(r"\.(\d+)\.")  # a module path inside a repeated block: ....layers.3.self_attn.q_proj


class DataUnusable(ValueError):
    """The data cannot make a useful adapter; the message says why, before any training."""


@dataclass(frozen=True)
class DataStats:
    """What the plan needs to know about the data: token lengths as the trainer will see them."""

    task: str  # "classification" or "generation"
    lengths: list[int]  # tokens per row (classification: the text; generation: prompt + answer + end token)
    labels: list[str] | None = None  # classification: each row's label, in file order
    prompt_lengths: list[int] | None = None  # generation: the prompt's tokens alone
    answer_lengths: list[int] | None = None  # generation: the answer's tokens

    @property
    def rows(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class BaseShape:
    """What the plan needs to know about the base: its family and the layers LoRA can go on."""

    family: str  # "decoder" or "encoder" (server.base_model.FAMILIES)
    num_layers: int
    max_context: int
    linear_paths: tuple[str, ...]  # module paths of the Linear/Conv1D layers the server wraps


@dataclass(frozen=True)
class Requested:
    """The caller's explicit choices; None is `auto`."""

    epochs: float | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    target_modules: tuple[str, ...] | None = None
    top_layers: int | None = None
    max_length: int | None = None
    truncation: bool | None = None
    class_weights: bool | None = None
    validation: bool = True  # hold rows out of the training file when no validation file is given
    max_new_tokens: int | None = None


@dataclass
class Plan:
    epochs: float
    batch_size: int
    learning_rate: float
    target_modules: list[str]
    top_layers: int | None  # None: every layer
    max_length: int
    truncation: bool
    class_weights: dict[str, float] | None
    validation_rows: int  # held out of the training file (0: a validation file is given, or too few rows)
    train_rows: int
    steps: int
    max_new_tokens: int | None  # generation: tokens generated per validation answer
    reasons: list[str] = field(default_factory=list)  # one line per automatic choice, for events and logs

    def as_dict(self) -> dict:
        return asdict(self)


def block_layer_names(linear_paths: tuple[str, ...] | list[str]) -> list[str]:
    """The distinct names of the linear layers inside repeated blocks, in the order the first block has them."""
    names: dict[str, None] = {}
    for path in linear_paths:
        if _BLOCK.search(path):
            names[path.rpartition(".")[2]] = None
    return list(names)


def check_usable(stats: DataStats, max_context: int) -> None:
    """DataUnusable when the data cannot make a useful adapter: one label only, too few rows of a label (or in
    all, for generation), every row longer than the context (or, for generation, a prompt that fills it)."""
    if stats.task == "classification":
        counts = Counter(stats.labels or [])
        if len(counts) < 2:
            raise DataUnusable(f"a classification file needs at least 2 labels, found {sorted(counts)}")
        few = sorted((n, label) for label, n in counts.items() if n < MIN_ROWS_PER_CLASS)
        if few:
            n, label = few[0]
            raise DataUnusable(f"label {label!r} has {n} row{'s' * (n != 1)}; every label needs at least "
                               f"{MIN_ROWS_PER_CLASS} to learn it and to check it on held-out rows")
        if all(length > max_context for length in stats.lengths):
            raise DataUnusable(f"all {stats.rows} texts are longer than the base's context of {max_context} tokens "
                               f"(the shortest has {min(stats.lengths)})")
        return
    if stats.rows < MIN_GENERATION_ROWS:
        raise DataUnusable(f"{stats.rows} rows; a generation adapter needs at least {MIN_GENERATION_ROWS}")
    prompts = stats.prompt_lengths or []
    if prompts and all(length >= max_context for length in prompts):
        raise DataUnusable(f"all {stats.rows} prompts are longer than the base's context of {max_context} tokens "
                           f"(the shortest has {min(prompts)}): no answer token fits")
    if over := [i for i, length in enumerate(prompts) if length >= max_context]:
        raise DataUnusable(f"row {over[0] + 1}'s prompt alone has {prompts[over[0]]} tokens, over the base's context "
                           f"of {max_context}; shorten it ({len(over)} row{'s' * (len(over) != 1)} like it)")


def split_validation(labels: list[str] | None, rows: int, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) by index: VALIDATION_FRACTION of each label (at least 1 while the label keeps
    MIN_ROWS_PER_CLASS for training), at most MAX_VALIDATION_ROWS in all; none from a file of under 10 rows."""
    if rows < 10:
        return list(range(rows)), []
    fraction = min(VALIDATION_FRACTION, MAX_VALIDATION_ROWS / rows)
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for index in range(rows):
        groups.setdefault(labels[index] if labels else "", []).append(index)
    held: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        keep = MIN_ROWS_PER_CLASS if labels else 1
        take = min(max(1, round(len(members) * fraction)), max(0, len(members) - keep))
        held += members[:take]
    held_set = set(held)
    return [i for i in range(rows) if i not in held_set], sorted(held)


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _round_up(value: int, multiple: int = 8) -> int:
    return -(-value // multiple) * multiple


def plan(stats: DataStats, base: BaseShape, requested: Requested = Requested(), has_validation_file: bool = False,
         seed: int = 0) -> Plan:
    """Every hyperparameter of a run: the caller's where given, else chosen from the data and the base."""
    reasons: list[str] = []
    classification = stats.task == "classification"

    held = 0
    if not has_validation_file and requested.validation:
        held = len(split_validation(stats.labels, stats.rows, seed)[1])
        reasons.append(f"validation: {held} of {stats.rows} rows held out of the training file"
                       + (", stratified by label" if classification else "") if held
                       else f"validation: none, {stats.rows} rows are too few to hold any out")
    train_rows = stats.rows - held

    batch_size = requested.batch_size or min(BATCH_SIZE, train_rows)
    if requested.batch_size is None:
        reasons.append(f"batch size: {batch_size}")

    if requested.epochs is not None:
        epochs = float(requested.epochs)
    else:
        examples = min(MAX_EXAMPLES, max(MIN_EXAMPLES, TARGET_EPOCHS * train_rows))
        epochs = round(examples / train_rows, 2)
        reasons.append(f"epochs: {epochs:g} ({TARGET_EPOCHS} over {train_rows} training rows, kept between "
                       f"{MIN_EXAMPLES} and {MAX_EXAMPLES} rows seen)")
    steps = max(1, round(math.ceil(train_rows / batch_size) * epochs))

    family = base.family
    if requested.learning_rate is not None:
        learning_rate = requested.learning_rate
    else:
        learning_rate = LEARNING_RATES.get((family, stats.task), 2e-4)
        reasons.append(f"learning rate: {learning_rate:g} ({family} base, {stats.task})")

    available = block_layer_names(base.linear_paths)
    if requested.target_modules:
        target_modules = list(requested.target_modules)
    else:
        target_modules = available
        reasons.append(f"LoRA targets: {' '.join(target_modules)} (every linear layer of the base's blocks)")

    if requested.top_layers is not None:
        top_layers: int | None = requested.top_layers or None  # 0: every layer
    elif family == "decoder":
        top = min(base.num_layers, max(MIN_DECODER_LAYERS, math.ceil(base.num_layers * DECODER_LAYER_FRACTION)))
        top_layers = None if top >= base.num_layers else top
        reasons.append(f"layers: LoRA in the top {top} of {base.num_layers} (the backward pass stops there)"
                       if top_layers else f"layers: LoRA in all {base.num_layers}")
    else:
        top_layers = None
        reasons.append(f"layers: LoRA in all {base.num_layers}")

    longest = max(stats.lengths)
    if requested.max_length is not None:
        max_length = requested.max_length
        truncation = bool(requested.truncation)
    elif classification:
        covered = _percentile(stats.lengths, LENGTH_PERCENTILE)
        max_length = min(base.max_context, max(16, _round_up(covered)))
        truncation = longest > max_length if requested.truncation is None else requested.truncation
        cut = sum(length > max_length for length in stats.lengths)
        reasons.append(f"max length: {max_length} tokens (the {LENGTH_PERCENTILE:.0%} percentile of the rows is "
                       f"{covered}, the longest {longest})" + (f"; {cut} longer rows are cut" if cut else ""))
    else:
        max_length = min(base.max_context, _round_up(longest))
        truncation = longest > max_length if requested.truncation is None else requested.truncation
        cut = sum(length > max_length for length in stats.lengths)
        reasons.append(f"max length: {max_length} tokens (the longest row has {longest})"
                       + (f"; {cut} rows over the context are cut" if cut else ""))

    class_weights = None
    if classification:
        counts = Counter(stats.labels or [])
        skewed = max(counts.values()) >= SKEW_RATIO * min(counts.values())
        if requested.class_weights if requested.class_weights is not None else skewed:
            class_weights = {label: round(stats.rows / (len(counts) * n), 4) for label, n in sorted(counts.items())}
        if requested.class_weights is None:
            shown = ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
            reasons.append(f"class weights: {', '.join(f'{k} {v:g}' for k, v in class_weights.items())} (labels "
                           f"skewed: {shown})" if class_weights else f"class weights: none (labels balanced: {shown})")

    max_new_tokens = requested.max_new_tokens
    if not classification and max_new_tokens is None:
        max_new_tokens = min(MAX_NEW_TOKENS_CAP, max(stats.answer_lengths or [16]) + 8)
        reasons.append(f"max new tokens: {max_new_tokens} (the longest answer and 8)")

    return Plan(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, target_modules=target_modules,
                top_layers=top_layers, max_length=max_length, truncation=truncation, class_weights=class_weights,
                validation_rows=held, train_rows=train_rows, steps=steps, max_new_tokens=max_new_tokens,
                reasons=reasons)
