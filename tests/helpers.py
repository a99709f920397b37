"""Building blocks for tests: tiny random Llama bases and PEFT adapters made with PEFT itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM,
)

from server.adapter_format import METADATA_FILE
from server.lora import LoraContext
from server.types import AdapterLocation


def make_tiny_base(folder: Path, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A random Llama with the real tokenizer's vocab: loads in milliseconds, behaves like the real thing."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(
    base: Path,
    out: Path,
    task: str = "CAUSAL_LM",
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    labels: list[str] | None = None,
    seed: int = 1,
    alpha: int | None = None,
    write_labels: bool = True,
    modules_to_save: list[str] | None = None,
    dora: bool = False,
) -> Path:
    """A PEFT adapter saved by plain PEFT, with random (non-zero) A and B so it really changes the output; a SEQ_CLS
    adapter on the architecture's own *ForSequenceClassification, its head (saved by modules_to_save) random too.
    With `dora`, a DoRA adapter (use_dora) whose magnitude vectors are moved off their initial value (the norm of
    W + scale B A, where DoRA would change nothing) by up to +-50 %."""
    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels), dtype=torch.float32)
    elif task == "FEATURE_EXTRACTION":  # a bare LlamaModel: its keys lack the causal LM's leading "model."
        model = AutoModel.from_pretrained(base, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        task_type=task, r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), init_lora_weights=False,
        modules_to_save=modules_to_save, use_dora=dora,
    )
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.data *= 1 + (torch.rand_like(param) - 0.5)
    if task == "SEQ_CLS":
        for name in ("score", "classifier", "pre_classifier"):
            wrapper = getattr(peft_model.base_model.model, name, None)
            if wrapper is not None:
                for param in wrapper.modules_to_save["default"].parameters():
                    torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(out)
    if labels and write_labels:
        (out / METADATA_FILE).write_text(json.dumps({"task": "classification", "labels": labels}))
    return out


def peft_reference_probs(base: Path, adapter: Path, tokenizer, texts: list[str], n_labels: int) -> torch.Tensor:
    """Plain PEFT on the architecture's own *ForSequenceClassification: softmax of its logits (float32)."""
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=n_labels, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        return peft_model(**batch).logits.float().softmax(-1)


def peft_reference_greedy(base: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return greedy_ids(model, prompt_ids, max_new_tokens)


def peft_mixture(base: Path, adapters: list[Path], weights: list[float], combination: str,
                 density: float | None = None, seed: int | None = None) -> PeftModel:
    """Plain PEFT's add_weighted_adapter of these adapters (named a0, a1, ...) into the active adapter "mix", on the
    causal LM (float32). DARE prunes with torch's global RNG, which add_weighted_adapter also draws from before (it
    initialises the new adapter's weights): with a seed, torch.manual_seed(seed) runs just before its first pruning
    draw, which is where the server's per-mixture generator starts."""
    from unittest import mock

    import peft.tuners.lora.model as lora_model

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapters[0],
                                      adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    seeded = []

    def seeded_first(merge):
        def run(*args, **kwargs):
            if not seeded:
                torch.manual_seed(seed)
                seeded.append(True)
            return merge(*args, **kwargs)
        return run

    with mock.patch.object(lora_model, "dare_linear", seeded_first(lora_model.dare_linear)), \
            mock.patch.object(lora_model, "dare_ties", seeded_first(lora_model.dare_ties)):
        model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "mix",
                                   combination_type=combination, density=density)
    model.set_adapter("mix")
    return model.eval()


def greedy_ids(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy generate() of one prompt (float32), up to EOS."""
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def engine_with(settings, **overrides) -> Iterator:
    """For a fixture (`yield from engine_with(tiny_settings, auto_merge=False)`): an engine of its own on these
    settings with `overrides`, closed once the fixture ends."""
    from server.engine import Engine

    engine = Engine.from_settings(settings.model_copy(update=overrides))
    try:
        yield engine
    finally:
        engine.close()


def location(store: Path, name: str) -> AdapterLocation:
    """Version 1 of an adapter in a test store, as the registry would locate it."""
    return AdapterLocation(name, 1, store / name)


def write_tiny_adapter(folder: Path, seed: int, r: int = 1, hidden: int = 64) -> Path:
    """A minimal valid LoRA adapter (one q_proj pair) written directly: fast enough to make thousands."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    folder.mkdir(parents=True)
    save_file({f"{prefix}.lora_A.weight": torch.randn(r, hidden, generator=generator),
               f"{prefix}.lora_B.weight": torch.randn(hidden, r, generator=generator)},
              str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": ["q_proj"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def archive_bytes(folder: Path, kind: str, top: str | None = None) -> bytes:
    """The files of an adapter folder as a .zip or .tar.gz, at the root or under one top-level folder."""
    import io
    import tarfile
    import zipfile

    buffer = io.BytesIO()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    arcname = (lambda p: f"{top}/{p.name}") if top else (lambda p: p.name)
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, arcname(p))
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
            for p in files:
                tf.add(p, arcname(p))
    return buffer.getvalue()


ADMIN_TOKEN = "s3cret-token"
UPLOAD_LIMITS = {"max_upload_bytes": 2 * 1024**2, "max_archive_members": 8, "max_uncompressed_bytes": 1024**2}


def app_client(settings, engine, store: Path, **overrides):
    """A TestClient on an app with its own writable store, the admin token and small upload limits."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from server.api import create_app

    update = {"adapters_dir": store, "admin_token": SecretStr(ADMIN_TOKEN), **UPLOAD_LIMITS, **overrides}
    return TestClient(create_app(settings.model_copy(update=update), engine=engine))


def folder_files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """An adapter folder's files as multipart file parts."""
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]


def upload(client, name: str, files, replace: bool = False):
    data = {"name": name, **({"replace": "true"} if replace else {})}
    return client.post("/adapters", data=data, files=files)


def tree(root: Path) -> dict[str, str]:
    """Every file and link under root: content digest or link target (empty folders do not count)."""
    import hashlib
    import os

    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def classify_together(engine, jobs) -> list[list]:
    """Classification jobs in exactly one forward (on the engine's worker); each job's results."""
    from server.scheduler import whole_rows

    engine.runner.call(lambda: engine.runner._encode(whole_rows(jobs)))
    return [job.future.result(timeout=60) for job in jobs]


def generate_together(engine, jobs) -> list[list]:
    """Generation jobs prefilled in one forward, so that they decode as one batch; each job's results."""
    from server.scheduler import whole_rows

    engine.runner.call(lambda: engine.runner._prefill(whole_rows(jobs)))
    return [job.future.result(timeout=60) for job in jobs]


def assert_together_equals_alone(engine, slot_indices: list[int], params) -> None:
    """Four prompts of different lengths, one per slot index, generated in one batch: each gives the tokens it gives
    alone."""
    from server.jobs import GenerateJob

    prompts = ["first prompt", "a somewhat longer second prompt here", "third", "fourth for the base"]
    rows = engine.encode_for_generation(prompts, params)
    together = generate_together(engine, [GenerateJob([row], index, params) for row, index in zip(rows, slot_indices)])
    for row, index, [result] in zip(rows, slot_indices, together):
        [[alone]] = generate_together(engine, [GenerateJob([row], index, params)])
        assert result.token_ids == alone.token_ids


@contextmanager
def before_every_forward(engine, check: Callable[[LoraContext], None]) -> Iterator[None]:
    """`check(context)` runs before every forward of the engine: a pre-hook on its first LoRA layer, and before the
    compiled step of one or two rows and the C step (which call no layer's forward). Hooks change on the worker thread (directly once it has
    stopped)."""
    runner = engine.runner
    layer = next(iter(engine.layers.values()))

    def on_worker(fn):  # type: ignore[no-untyped-def]
        return runner.call(fn) if runner._thread.is_alive() else fn()

    handle = on_worker(lambda: layer.register_forward_pre_hook(lambda module, args: check(module.context)))
    lean = runner.lean
    steps = [step for step in (lean.row_step, lean.fused) if step is not None] if lean is not None else []
    for step in steps:
        def checked_step(*args, original=step.step):  # type: ignore[no-untyped-def]
            check(layer.context)
            return original(*args)

        step.step = checked_step
    try:
        yield
    finally:
        on_worker(handle.remove)
        for step in steps:
            del step.step  # the class's method again


def poisoned(engine, slot_index: int):
    """Every forward that holds a row of this slot fails (a stand-in for a row that breaks the model)."""

    def check(context: LoraContext) -> None:
        slots = context.row_slots.tolist() if context.row_slots is not None else [context.uniform_slot]
        if slot_index in slots:
            raise RuntimeError(f"poisoned slot {slot_index}")

    return before_every_forward(engine, check)


def slowed(engine, seconds: float):
    """Every forward takes at least `seconds` longer: long work stays in flight long enough to be watched."""
    return before_every_forward(engine, lambda _context: time.sleep(seconds))


def peft_reference_logprobs(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """[tokens, vocab] float32 log-softmax of plain PEFT's logits over `ids` (row t predicts token t + 1)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def peft_reference_embeddings(base: Path, adapter: Path | None, texts: list[str], tokenizer) -> torch.Tensor:
    """[texts, hidden] mean-pooled, L2-normalized last hidden states of plain PEFT (float32): a FEATURE_EXTRACTION
    adapter on a bare LlamaModel, any other on the causal LM's body."""
    task = json.loads((adapter / "adapter_config.json").read_text())["task_type"] if adapter else None
    if task == "FEATURE_EXTRACTION":
        body = PeftModel.from_pretrained(AutoModel.from_pretrained(base, dtype=torch.float32), adapter)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        body = (PeftModel.from_pretrained(model, adapter) if adapter else model).get_decoder()
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")  # positions from 0 in each row
    with torch.no_grad():
        hidden = body.eval()(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def wait_for_health(process: subprocess.Popen, url: str, log_path: Path, seconds: float) -> None:
    """Poll a server process's /health until it answers 200; fail with the server's log if the process exits or
    is not ready within `seconds`."""
    import httpx
    import pytest

    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server was not ready after {seconds:.0f} s:\n{log_path.read_text()}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_in_thread(app, seconds: float = 30) -> Iterator[str]:
    """A real uvicorn server of `app` in a thread of this process, on a free port; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + seconds
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(seconds)


REPO = Path(__file__).resolve().parent.parent


@contextmanager
def server_process(
    base: Path | None, store: Path, log_path: Path, *flags: str, ready_s: float = 90
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m server` (float32, the admin token) on a free port, its log appended to `log_path` (base None: the
    embedded one); yields its URL and process once /health answers, and stops it at the end if it still runs."""
    port = free_port()
    command = [sys.executable, "-m", "server", "--adapters-dir", str(store), "--port", str(port),
               "--dtype", "float32", "--admin-token", ADMIN_TOKEN, *(["--base-model", str(base)] if base else []),
               *flags]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(process, url, log_path, ready_s)
        yield url, process
    finally:
        if process.poll() is None:
            stop_process(process, 30)


def fresh_clone(dest: Path) -> Path:
    """A git repository at `dest` holding this checkout's tracked files as they are now (edits included), committed:
    what a user's fresh clone of this tree holds, where `git status` tells what running it wrote."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A", "--force"], ["commit", "-q", "-m", "clone"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


def git_status(repo: Path) -> str:
    """`git status --porcelain --ignored`: every file written into the repository, ignored ones included."""
    return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout


def stop_process(process: subprocess.Popen, seconds: float = 10) -> None:
    """SIGTERM a server process and wait for it; SIGKILL if it has not exited within `seconds`."""
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- tiny random bases of each supported family (tests/test_bases.py) -----------------------------------------

ENCODER_WORDS = ("a stirring funny and finally transporting film one long string of cliches ok the movie was great "
                 "bad free prize call now win cash meeting at noon tomorrow").split()


def make_wordpiece_tokenizer(folder: Path):
    """A BERT-style tokenizer ([CLS] text [SEP], [PAD] = 0) over a small vocabulary, built locally."""
    from transformers import BertTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz,.!?'0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(ENCODER_WORDS), *letters,
             *(f"##{c}" for c in letters)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_family_base(folder: Path, family: str, tokenizer, seed: int = 0) -> Path:
    """A tiny random base of one architecture, saved as its bare body (encoders, like MiniLM's BertModel) or
    its causal LM (decoders), with the tokenizer it is served with."""
    from transformers import (
        BertConfig, BertModel, DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel, MistralConfig,
        MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, RobertaConfig, RobertaModel,
    )

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        return make_tiny_base(folder, tokenizer, seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **special))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **special))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                           **special))
    elif family == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, pad_token_id=0))
    elif family == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                 max_position_embeddings=128, pad_token_id=0))
    elif family == "roberta":
        model = RobertaModel(RobertaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=130, pad_token_id=0))
    else:
        raise ValueError(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FAMILY_TARGETS = {  # what the tutorials train: attention projections (GPT-2: its Conv1D c_attn and both c_proj)
    "llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "k_proj", "v_proj", "down_proj"),
    "mistral": ("q_proj", "o_proj", "gate_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"), "bert": ("query", "value", "dense"), "distilbert": ("q_lin", "v_lin", "lin1"),
    "roberta": ("query", "value"),
}


def make_family_adapter(base: Path, out: Path, family: str, task: str, labels: list[str] | None = None, r: int = 4,
                        seed: int = 1, dora: bool = False) -> Path:
    """make_adapter with the family's usual targets (DistilBERT's pre_classifier named in modules_to_save: PEFT's
    SEQ_CLS saves only the classifier, and a bare DistilBertModel has no trained pre_classifier)."""
    to_save = ["pre_classifier"] if family == "distilbert" and task == "SEQ_CLS" else None
    return make_adapter(base, out, task, r, FAMILY_TARGETS[family], labels, seed, modules_to_save=to_save, dora=dora)

