"""Reading and checking standard PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

Everything here is pure: it reads files and returns tensors and facts, it never touches a loaded model.
Pickled weights (.bin, .pt) are never opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import AdapterInvalid
from .types import Task

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "loraswap.json"  # our own metadata: task, labels, metrics, training facts
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# the weight whose rows are the labels, in the heads PEFT saves (modules_to_save): decoders and GPT-2 `score`,
# BERT/DistilBERT `classifier`, RoBERTa's `classifier` block
LABEL_WEIGHTS = ("score.weight", "classifier.weight", "classifier.out_proj.weight")
MAX_HEADER_BYTES = 16 * 1024 * 1024

TASK_TYPES: dict[str | None, Task | None] = {
    "CAUSAL_LM": "generation", "SEQ_CLS": "classification", "FEATURE_EXTRACTION": "embedding", None: None
}

# base_model.model.<module path>.lora_A.weight (an optional adapter name may sit before .weight)
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
# DoRA's magnitude vector (PEFT saves it without the adapter name and without ".weight"; older PEFT with them)
MAGNITUDE_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"
)
# LoRA on an Embedding layer (PEFT's lora_embedding_A/B): read only to be refused by the layer's type
EMBEDDING_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_[AB](?:\.[A-Za-z0-9_-]+)?$")
# a module saved whole (modules_to_save): base_model.model.<module>[.modules_to_save[.<adapter>]].<param path>
SAVED_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)(?:\.modules_to_save(?:\.[^.]+)?(?=\.))?(?P<param>(?:\.[^.]+)+)$"
)


@dataclass
class LoraModuleWeights:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: the trained norm of each output row [out]; None for plain LoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class AdapterWeights:
    """A parsed adapter: LoRA pairs per module path (relative to the task model: causal LM or sequence classifier),
    and for classification the head modules it saved whole, as {"classifier.weight": tensor, ...}."""

    task: Task
    modules: dict[str, LoraModuleWeights]
    labels: list[str] | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors by module.param path
    other_lora_modules: list[str] = field(default_factory=list)  # LoRA on layers we do not serve (Embedding)
    rank: int = 0
    alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    sha256: str = ""
    size_bytes: int = 0
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def dora(self) -> bool:
        return any(pair.magnitude is not None for pair in self.modules.values())

    def describe(self) -> dict:
        return {
            "task": self.task,
            "dora": self.dora,
            "labels": self.labels,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> list[str]:
    """Cheap structural checks before the library parses the file: header length within bounds and file size."""
    size = path.stat().st_size
    if size < 8:
        return [f"{WEIGHTS_FILE} is truncated ({size} bytes)"]
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > max_header_bytes:
            return [f"{WEIGHTS_FILE} header is {header_len} bytes, over the limit of {max_header_bytes}"]
        if 8 + header_len > size:
            return [f"{WEIGHTS_FILE} is truncated: header says {header_len} bytes, file has {size - 8}"]
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return [f"{WEIGHTS_FILE} header is not valid JSON"]
    if not isinstance(header, dict):
        return [f"{WEIGHTS_FILE} header is not a JSON object"]
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    offsets = [v.get("data_offsets") if isinstance(v, dict) else None for v in tensors.values()]
    bad = [k for k, o in zip(tensors, offsets)
           if not (isinstance(o, list) and len(o) == 2 and all(type(x) is int and x >= 0 for x in o))]
    if bad:
        return [f"{WEIGHTS_FILE} header: tensor {bad[0]!r} has no valid data_offsets"]
    end = max((o[1] for o in offsets), default=0)
    if 8 + header_len + end > size:
        return [f"{WEIGHTS_FILE} is truncated: tensors need {end} bytes, file has {size - 8 - header_len}"]
    return []


def _read_json(path: Path, problems: list[str]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{path.name} is not valid JSON ({exc.__class__.__name__})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path.name} must hold a JSON object")
        return {}
    return data


def _check_config(config: dict, problems: list[str]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r} is not supported; only LORA adapters are")
    if not isinstance(config.get("use_dora", False), bool):
        problems.append("use_dora must be true or false")
    for flag in ("lora_bias", "use_qalora", "use_bdlora"):
        if config.get(flag):
            problems.append(f"{flag}=true is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} is not supported; only bias='none'")
    if config.get("target_parameters"):
        problems.append("target_parameters (LoRA on raw parameters) is not supported")
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices is not supported")
    task_type = config.get("task_type")
    if not isinstance(task_type, (str, type(None))) or task_type not in TASK_TYPES:
        problems.append(f"task_type {task_type!r} is not supported; use CAUSAL_LM, SEQ_CLS or FEATURE_EXTRACTION")
    if not isinstance(config.get("r", 8), int) or not isinstance(config.get("lora_alpha", 8), (int, float)):
        problems.append("r must be an integer and lora_alpha a number")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) for v in pattern.values()):
            problems.append(f"{name} must map module patterns to numbers")
            continue
        for key in pattern:
            try:
                re.compile(key)
            except re.error as exc:
                problems.append(f"{name} key {key!r} is not a valid regular expression ({exc})")


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern: a key matches a module path by regex suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _labels(folder: Path, metadata: dict, n_labels: int, problems: list[str]) -> list[str]:
    labels = metadata.get("labels")
    if labels is None and (folder / "config.json").is_file():
        id2label = _read_json(folder / "config.json", problems).get("id2label")
        if isinstance(id2label, dict):
            if not all(isinstance(k, str) and k.isdigit() for k in id2label):
                problems.append("config.json id2label keys must be label indices ('0', '1', ...)")
                return [f"LABEL_{i}" for i in range(n_labels)]
            labels = [id2label[k] for k in sorted(id2label, key=int)]
    if labels is None:
        return [f"LABEL_{i}" for i in range(n_labels)]
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        problems.append("labels must be a list of non-empty strings")
        return [f"LABEL_{i}" for i in range(n_labels)]
    if len(set(labels)) != len(labels):
        problems.append("labels must be unique")
    if len(labels) != n_labels:
        problems.append(f"classification head has {n_labels} outputs but {len(labels)} labels are given")
    return labels


def _dora_problems(config: dict, modules: dict[str, LoraModuleWeights], magnitudes: dict[str, torch.Tensor],
                   other_lora: set[str]) -> list[str]:
    """A DoRA adapter (use_dora=true) has one magnitude vector per LoRA pair, as long as the layer's output; a
    plain one has none."""
    if not config.get("use_dora"):
        return [f"tensor for {module!r}: lora_magnitude_vector is DoRA's, but the config does not say use_dora=true"
                for module in sorted(magnitudes)]
    problems = [f"{module}: lora_magnitude_vector without its lora_A/lora_B pair"
                for module in sorted(set(magnitudes) - set(modules) - other_lora)]
    for module, pair in modules.items():
        magnitude = pair.magnitude
        if magnitude is None:
            problems.append(f"{module}: use_dora=true but no lora_magnitude_vector for it")
        elif magnitude.dim() != 1 or magnitude.shape[0] != pair.B.shape[0]:
            problems.append(f"{module}: lora_magnitude_vector {tuple(magnitude.shape)} does not fit lora_B "
                            f"{tuple(pair.B.shape)} (one magnitude per output feature)")
    return problems


def read_adapter(folder: Path, max_rank: int | None = None) -> AdapterWeights:
    """Parse and check an adapter folder; raise AdapterInvalid listing every problem found."""
    problems: list[str] = []
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        problems.append(f"pickled weights are never loaded ({', '.join(pickles)}); save with safetensors")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config: dict = {}
    if config_path.is_file():
        config = _read_json(config_path, problems)
        _check_config(config, problems)
    else:
        problems.append(f"{CONFIG_FILE} is missing")
    metadata = _read_json(folder / METADATA_FILE, problems) if (folder / METADATA_FILE).is_file() else {}
    if weights_path.is_file():
        problems += check_safetensors_header(weights_path)
    else:
        problems.append(f"{WEIGHTS_FILE} is missing")
    if problems:
        raise AdapterInvalid(problems)
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterInvalid([f"{WEIGHTS_FILE} cannot be read: {exc}"]) from None

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    other_lora: set[str] = set()
    for key, tensor in tensors.items():
        if match := LORA_KEY.match(key):
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
        elif match := MAGNITUDE_KEY.match(key):
            magnitudes[match["module"]] = tensor
        elif match := EMBEDDING_LORA_KEY.match(key):
            other_lora.add(match["module"])
        elif match := SAVED_KEY.match(key):
            head[match["path"] + match["param"]] = tensor  # which of these the base has: server/heads.py
        else:
            problems.append(f"tensor {key!r} is neither a LoRA A/B weight nor a classifier head")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            problems.append(f"tensor {key!r} holds NaN or Inf values")
        elif not tensor.is_floating_point():
            problems.append(f"tensor {key!r} has dtype {tensor.dtype}; LoRA weights must be floating point")

    alpha = float(config.get("lora_alpha", 8))
    modules: dict[str, LoraModuleWeights] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{module} has lora_{''.join(ab)} but not its pair")
            continue
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            problems.append(f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not pair (A: r x in, B: out x r)")
            continue
        rank = A.shape[0]
        if rank == 0:
            problems.append(f"{module}: rank 0 (empty lora_A and lora_B)")
            continue
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        scale = module_alpha / math.sqrt(rank) if config.get("use_rslora") else module_alpha / rank
        modules[module] = LoraModuleWeights(A=A, B=B, scale=scale, magnitude=magnitudes.get(module))
    problems += _dora_problems(config, modules, magnitudes, other_lora)

    if not modules and not other_lora:
        problems.append("no LoRA weights found: the adapter would change nothing")
    max_found = max((m.rank for m in modules.values()), default=0)
    if max_rank is not None and max_found > max_rank:
        problems.append(f"rank {max_found} exceeds the configured maximum of {max_rank}")

    task = TASK_TYPES.get(config.get("task_type")) or ("classification" if head else "generation")
    labels = None
    if task == "classification":
        label_weight = next((head[key] for key in LABEL_WEIGHTS if key in head), None)
        if label_weight is None:
            problems.append("a SEQ_CLS adapter needs its classifier head (PEFT saves it with modules_to_save: "
                            "'score' on decoders and GPT-2, 'classifier' on encoders)")
        elif label_weight.dim() != 2:
            problems.append(f"classifier head has shape {tuple(label_weight.shape)}; expected [labels, features]")
        else:
            labels = _labels(folder, metadata, label_weight.shape[0], problems)
    elif head:
        problems += [f"tensor {key!r} is neither a LoRA A/B weight nor a classifier head" for key in head
                     if not key.startswith(("score.", "classifier."))]
        if any(key.startswith(("score.", "classifier.")) for key in head):
            problems.append(f"a {'FEATURE_EXTRACTION' if task == 'embedding' else 'CAUSAL_LM'} adapter must not "
                            "carry a classifier head")
    if problems:
        raise AdapterInvalid(problems)

    targets = sorted({module.rsplit(".", 1)[-1] for module in modules})
    return AdapterWeights(
        task=task,
        modules=modules,
        labels=labels,
        head=head if task == "classification" else {},
        other_lora_modules=sorted(other_lora),
        rank=max_found,
        alpha=alpha,
        target_modules=targets,
        sha256=file_sha256(weights_path),
        size_bytes=weights_path.stat().st_size,
        config=config,
        metadata=metadata,
    )
