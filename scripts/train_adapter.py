"""train-adapter: CSV/JSONL in, a served LoRA adapter out, with its quality measured.

    train-adapter --task classification --name spam --train train.csv --eval dev.csv
    train-adapter --task generation --name qa --train train.jsonl --eval dev.jsonl \
        --prompt-template "Question: {question}" --answer-template "{answer}"

The adapter is written to trained/NAME (never into the served store: a running server reads its store only at start
and refuses an upload whose name a folder written there behind its back already takes); --push uploads it.

The base is loaded by the server's own code (server.base_model), classification inputs are tokenized exactly as
the server tokenizes them (raw text, right padding, rightmost non-pad token pooled) and generation prompts go
through the base's chat template as the server wraps them. The final metrics are measured by the server's Engine
on the saved adapter, so they are the numbers `/predict` gives.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch
import torch.nn.functional as F

from scripts.adapter_data import (
    DataError,
    DataSource,
    DatasetSplit,
    check_labels_known,
    column,
    data_sha256,
    parse_truncate,
    read_rows,
    render,
)
from scripts.metrics import classification_metrics, format_metrics, generation_metrics
from server.adapter_format import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from server.base_model import BaseInfo, load_base, make_readable
from server.encoding import encode_chat, encode_prompt
from server.settings import Settings

PROG = "train-adapter"
PLOT_FILE = "training.png"
OUTPUT_ROOT = Path("trained")  # the default output is OUTPUT_ROOT/NAME, relative to the working directory

# receives progress as it happens: {"event": "start", "total_steps"}, {"event": "step", "step", "loss", "tokens"},
# {"event": "eval", "step", "eval_loss"}, {"event": "saved"}, {"event": "metrics", "metrics"} (fine-tuning jobs)
Progress = Callable[[dict], None]


@dataclass
class Example:
    input_ids: list[int]
    target: int | None = None  # classification: the label index
    prompt_len: int = 0  # generation: the loss covers input_ids[prompt_len:]


@dataclass
class Prepared:
    """Everything checked and tokenized before any training starts."""

    train: list[Example]
    eval: list[Example]
    eval_inputs: list[str | list[int]] = field(default_factory=list)  # texts, prompts or encoded conversations
    eval_gold: list[str] = field(default_factory=list)  # labels, or reference answers
    eval_decisions: list[str] | None = None
    labels: list[str] = field(default_factory=list)  # classification labels or decision words
    data: dict = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["classification", "generation"], required=True)
    p.add_argument("--name", required=True, help=f"adapter name (also the default output folder {OUTPUT_ROOT}/NAME)")
    p.add_argument("--train", type=Path, nargs="+", help="training file(s), .csv or .jsonl")
    p.add_argument("--eval", type=Path, help="eval file: metrics at the end and the eval-loss curve")
    p.add_argument("--dataset", metavar="NAME",
                   help="instead of --train: a Hugging Face dataset (a name, a local data folder, or a folder saved "
                        "with save_to_disk), read with the datasets library (pip install 'loraswap[datasets]')")
    p.add_argument("--train-split", default="train", help="with --dataset: the split trained on")
    p.add_argument("--eval-split", help="with --dataset: the split evaluated on (unless --eval names a file)")
    p.add_argument("--output", type=Path, help=f"output folder (default: {OUTPUT_ROOT}/NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--limit", type=int, metavar="N",
                   help="only the first N rows of each training and eval file: a quick check of data and setup")
    d = p.add_argument_group("data")
    d.add_argument("--text-column", default="text", help="classification: the input text column")
    d.add_argument("--label-column", default="label", help="classification: the label column")
    d.add_argument("--prompt-template", default="{prompt}", help="generation: user message, e.g. 'Q: {question}'")
    d.add_argument("--answer-template", default="{answer}", help="generation: assistant answer, e.g. '{answer}'")
    d.add_argument("--decision-column", help="generation: column holding a decision word scored by exact match")
    d.add_argument("--messages-column",
                   help="generation: column holding an OpenAI chat conversation ([{role, content}, ...]) ending "
                        "with the assistant's answer; replaces the templates")
    d.add_argument("--truncate-column", action="append", default=[], metavar="COLUMN=CHARS",
                   help="generation: cut a column to its first CHARS (-CHARS: last) characters before templating")
    d.add_argument("--max-length", type=int, default=256, help="most tokens per training row (prompt + answer)")
    d.add_argument("--truncation", action="store_true",
                   help="cut rows longer than --max-length instead of failing (classification: keeps the start)")
    m = p.add_argument_group("model and training")
    m.add_argument("--base-model", "--base", type=Path, help="local base folder or .gguf file, or a packaged base's "
                   "name (all-MiniLM-L6-v2); default: the embedded base the server uses")
    m.add_argument("--cache-dir", type=Path, default=Settings.model_fields["cache_dir"].default)
    m.add_argument("--rank", type=int, default=8)
    m.add_argument("--alpha", type=float, default=16)
    m.add_argument("--dropout", type=float, default=0.05)
    m.add_argument("--target-modules", nargs="+",
                   help="default: PEFT's choice for the architecture (q_proj v_proj; GPT-2 c_attn; BERT query value)")
    m.add_argument("--top-layers", type=int,
                   help="LoRA only in the last N layers (default: all); the backward pass stops there (cheaper)")
    m.add_argument("--epochs", type=float, default=1.0, help="may be fractional")
    m.add_argument("--lr", type=float, default=2e-4)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32",
                   help="training compute dtype: bfloat16 = autocast (weights stay float32); measured slower on "
                        "CPUs without fast bf16 kernels")
    m.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    m.add_argument("--device", default="cpu", help="torch device for training and evaluation: cpu, cuda, cuda:1 ...")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-dtype", choices=["bfloat16", "float32"], default="float32",
                   help="dtype of the final evaluation by the server's engine (float32: the exact PEFT answers)")
    e.add_argument("--eval-points", type=int, default=4, help="how often eval loss is measured for the curve")
    e.add_argument("--eval-curve-rows", type=int, default=128, help="eval rows used for the eval-loss curve")
    e.add_argument("--max-new-tokens", type=int, default=128, help="generation: tokens generated per eval answer")
    u = p.add_argument_group("upload")
    u.add_argument("--push", metavar="URL", help="upload the trained adapter to a running server (POST URL/adapters)")
    u.add_argument("--token", default=os.environ.get("LORASWAP_TOKEN"), help="bearer token (env LORASWAP_TOKEN)")
    u.add_argument("--replace", action="store_true", help="replace an adapter of the same name on the server")
    return p


# ---- data -------------------------------------------------------------------------------------------------------


def _check_length(ids: list[int], max_length: int, truncation: bool, path: DataSource, number: int) -> list[int]:
    if len(ids) <= max_length:
        return ids
    if truncation:
        return ids[:max_length]
    raise DataError(f"{path}: row {number} has {len(ids)} tokens, over --max-length {max_length} "
                    f"(raise --max-length or pass --truncation)")


def rows_of(args, path: DataSource) -> list[dict]:
    """The file's rows, cut to --limit."""
    return read_rows(path)[: args.limit]


def classification_examples(
    args, tokenizer, path: DataSource, labels: list[str]
) -> tuple[list[Example], list[str], list[str]]:
    rows = rows_of(args, path)
    texts = column(rows, args.text_column, path)
    gold = column(rows, args.label_column, path)
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    for number, (text, label) in enumerate(zip(texts, gold), 1):
        ids = tokenizer(text)["input_ids"]  # exactly as the server encodes classification inputs
        ids = _check_length(ids, args.max_length, args.truncation, path, number)
        examples.append(Example(ids, target=index.get(label)))
    return examples, texts, gold


def conversations(rows: list[dict], name: str, path: DataSource) -> tuple[list[list[int]], list[str]]:
    """Each row's conversation split into the prompt (every message before the last) and the answer (the last,
    an assistant message)."""
    prompts, answers = [], []
    for number, row in enumerate(rows, 1):
        messages = row.get(name)
        if not (isinstance(messages, list) and len(messages) >= 2 and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise DataError(f"{path}: row {number}'s {name!r} is not a list of at least 2 {{role, content}} messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{path}: row {number}'s last message is from {messages[-1]['role']!r}, not the assistant")
        prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:-1]])
        answers.append(messages[-1]["content"])
    return prompts, answers


def generation_examples(
    args, tokenizer, path: DataSource
) -> tuple[list[Example], list[str | list[int]], list[str], list[str] | None]:
    rows = rows_of(args, path)
    if args.messages_column:
        chats, answers = conversations(rows, args.messages_column, path)
        prompts: list[str | list[int]] = [encode_chat(tokenizer, chat) for chat in chats]  # as /v1/chat does
    else:
        truncate = parse_truncate(args.truncate_column)
        prompts = render(args.prompt_template, rows, path, truncate)
        answers = render(args.answer_template, rows, path, truncate)
    decisions = column(rows, args.decision_column, path) if args.decision_column else None
    examples = []
    for number, (prompt, answer) in enumerate(zip(prompts, answers), 1):
        # exactly as /predict wraps a generation prompt (a conversation is already encoded)
        prompt_ids = prompt if isinstance(prompt, list) else encode_prompt(tokenizer, prompt)
        if len(prompt_ids) >= args.max_length:
            raise DataError(f"{path}: row {number}'s prompt alone has {len(prompt_ids)} tokens, over --max-length "
                            f"{args.max_length}; shorten it with --truncate-column")
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = _check_length(prompt_ids + answer_ids, args.max_length, args.truncation, path, number)
        examples.append(Example(ids, prompt_len=len(prompt_ids)))
    return examples, prompts, answers, decisions


def prepare(args, tokenizer) -> Prepared:
    """Read, check and tokenize all data; every DataError is raised here, before a model is built."""
    train_hashes = [data_sha256(p) for p in args.train]
    eval_hash = data_sha256(args.eval) if args.eval else None
    if eval_hash in train_hashes:
        raise DataError(f"{args.eval}: the eval file is also a training file; evaluate on held-out data")
    if args.task == "classification":
        train, gold = [], []
        for path in args.train:
            gold += column(rows_of(args, path), args.label_column, path)
        labels = sorted(set(gold))
        if len(labels) < 2:
            raise DataError(f"{args.train[0]}: classification needs at least 2 labels, found {labels}")
        for path in args.train:
            train += classification_examples(args, tokenizer, path, labels)[0]
        prepared = Prepared(train, [], labels=labels)
        if args.eval:
            eval_gold = column(rows_of(args, args.eval), args.label_column, args.eval)
            check_labels_known(labels, eval_gold, args.eval)
            prepared.eval, prepared.eval_inputs, prepared.eval_gold = classification_examples(
                args, tokenizer, args.eval, labels)
    else:
        train, decisions = [], []
        for path in args.train:
            examples, _, _, file_decisions = generation_examples(args, tokenizer, path)
            train += examples
            decisions += file_decisions or []
        prepared = Prepared(train, [], labels=sorted(set(decisions)))
        if args.eval:
            prepared.eval, prepared.eval_inputs, prepared.eval_gold, prepared.eval_decisions = generation_examples(
                args, tokenizer, args.eval)
            if prepared.eval_decisions is not None:
                check_labels_known(decisions, prepared.eval_decisions, args.eval, "decision")
    prepared.data = {
        "train": [{"file": str(p), "sha256": h} for p, h in zip(args.train, train_hashes)],
        "train_rows": len(prepared.train),
        "limit": args.limit,
        "eval": {"file": str(args.eval), "sha256": eval_hash, "rows": len(prepared.eval)}
        if args.eval else None,
    }
    return prepared


def make_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding): sort within shuffled windows of 16 batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask (as the server pads for classification); answer-token targets for generation."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)  # positions whose next token is an answer token
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        if e.prompt_len:
            answer[i, e.prompt_len - 1: len(e.input_ids) - 1] = True
    batch = {"input_ids": ids, "attention_mask": mask, "answer": answer}
    if examples[0].target is not None:
        batch["targets"] = torch.tensor([e.target for e in examples])
    return batch


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---- model ------------------------------------------------------------------------------------------------------

DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"]}  # where PEFT has no default of its own


def build_model(args, base_path: Path, n_labels: int, pad_id: int, num_layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(args.seed)  # the classifier head's initialization
    if args.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=n_labels,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = pad_id
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(
        task_type="SEQ_CLS" if args.task == "classification" else "CAUSAL_LM",
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        # PEFT chooses per architecture when None; it has no default for DistilBERT's attention names
        target_modules=args.target_modules or DEFAULT_TARGETS.get(model.config.model_type),
        # the whole classification head: `score`, `classifier`, and DistilBERT's pre_classifier, which a bare
        # DistilBertModel checkpoint does not hold
        modules_to_save=[name for name, module in model.named_children()
                         if name != model.base_model_prefix and any(True for _ in module.parameters())]
        if args.task == "classification" else None,
        layers_to_transform=list(range(num_layers - args.top_layers, num_layers)) if args.top_layers else None,
    )
    peft_model = get_peft_model(model, config).to(args.device)
    args.target_modules = sorted(peft_model.peft_config["default"].target_modules)  # PEFT's default, if it chose
    return peft_model


def batch_loss(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["targets"])
    # the LM head only on positions that predict answer tokens: most tokens are prompt, and the head is a quarter
    # of the model's compute
    lm = model.get_base_model()
    body = getattr(lm, lm.base_model_prefix)  # model.model; GPT-2: transformer
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = lm.lm_head(hidden[batch["answer"]])
    targets = batch["input_ids"][:, 1:][batch["answer"][:, :-1]]
    return F.cross_entropy(logits.float(), targets)


@torch.no_grad()
def eval_loss(model, examples: list[Example], args, pad_id: int) -> float:
    model.eval()
    total, weight = 0.0, 0
    lengths = [len(e.input_ids) for e in examples]
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    for start in range(0, len(order), args.batch_size):
        batch = to_device(collate([examples[i] for i in order[start:start + args.batch_size]], pad_id), args.device)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = batch_loss(model, batch, args.task)
        n = int(batch["answer"].sum()) if args.task == "generation" else len(batch["input_ids"])
        total, weight = total + float(loss) * n, weight + n
    model.train()
    return total / weight


def train(
    model, prepared: Prepared, args, pad_id: int, progress: Progress | None = None
) -> tuple[list[float], list[tuple[int, float]]]:
    """Plain AdamW loop with linear warmup/decay; returns per-step losses and (step, eval loss) points."""
    report = progress or (lambda event: None)
    from tqdm import tqdm

    rng = random.Random(args.seed)
    lengths = [len(e.input_ids) for e in prepared.train]
    per_epoch = math.ceil(len(lengths) / args.batch_size)
    total_steps = max(1, round(per_epoch * args.epochs))
    batches: list[list[int]] = []
    while len(batches) < total_steps:
        batches += make_batches(lengths, args.batch_size, rng)
    batches = batches[:total_steps]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, round(0.06 * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    curve_rows = prepared.eval[: args.eval_curve_rows]
    eval_at = {round(total_steps * k / args.eval_points) for k in range(1, args.eval_points + 1)}
    if not curve_rows:
        eval_at = set()
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    report({"event": "start", "total_steps": total_steps})
    if curve_rows:
        curve.append((0, eval_loss(model, curve_rows, args, pad_id)))
        report({"event": "eval", "step": 0, "eval_loss": curve[-1][1]})
    model.train()
    bar = tqdm(batches, desc=f"training {args.name}", unit="step", file=sys.stderr, mininterval=5)
    for step, indices in enumerate(bar, 1):
        batch = to_device(collate([prepared.train[i] for i in indices], pad_id), args.device)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = batch_loss(model, batch, args.task)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        report({"event": "step", "step": step, "loss": losses[-1], "tokens": int(batch["attention_mask"].sum())})
        recent = losses[-50:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if step in eval_at:
            curve.append((step, eval_loss(model, curve_rows, args, pad_id)))
            report({"event": "eval", "step": step, "eval_loss": curve[-1][1]})
            bar.write(f"step {step}: eval loss {curve[-1][1]:.4f}", file=sys.stderr)
    bar.close()
    return losses, curve


def plot(losses: list[float], curve: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (step)")
    window = max(1, len(losses) // 25)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    ax.plot(steps, smooth, color="tab:blue", label=f"train loss ({window}-step mean)")
    if curve:
        ax.plot([s for s, _ in curve], [v for _, v in curve], "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- evaluation through the server's engine ---------------------------------------------------------------------


def evaluate(args, folder: Path, prepared: Prepared) -> dict:
    """Serve the saved adapter with the server's Engine and score its answers, as /predict would give them."""
    from server.engine import Engine
    from server.types import AdapterLocation, GenerationParams

    model, tokenizer, info = load_base(args.base_model, args.cache_dir, args.eval_dtype, args.device)
    engine = Engine(model, tokenizer, info, max_loaded_adapters=1)
    try:
        params = GenerationParams(max_new_tokens=args.max_new_tokens)
        outputs = []
        batch = 16 if args.task == "classification" else 8
        for start in range(0, len(prepared.eval_inputs), batch):
            _, results = engine.predict(AdapterLocation(args.name, 1, folder),
                                        prepared.eval_inputs[start:start + batch], params)
            outputs += results
    finally:
        engine.close()
    if args.task == "classification":
        return classification_metrics(prepared.eval_gold, [r.label for r in outputs], prepared.labels)
    return generation_metrics([r.generated_text for r in outputs], prepared.eval_gold, prepared.eval_decisions,
                              prepared.labels or None)


# ---- upload -----------------------------------------------------------------------------------------------------


def push(folder: Path, url: str, name: str, token: str | None, replace: bool,
         client: httpx.Client | None = None) -> dict:
    """POST the adapter's files to a running server's upload endpoint (multipart, bearer token)."""
    files = [(f, (f, (folder / f).read_bytes(), "application/octet-stream"))
             for f in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE) if (folder / f).is_file()]
    data = {"name": name}
    if replace:
        data["replace"] = "true"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = client or httpx.Client(timeout=120)
    with client:
        response = client.post(url.rstrip("/") + "/adapters", data=data, files=files, headers=headers)
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise RuntimeError(f"upload to {url} failed: HTTP {response.status_code}: {detail}")
    return response.json()


# ---- main -------------------------------------------------------------------------------------------------------


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over an existing folder unless told to."""
    if output.exists() and not overwrite:
        raise DataError(f"{output} already exists; pass --overwrite to replace it, or choose another --output")
    if output.exists() and not output.is_dir():
        raise DataError(f"{output} exists and is not a folder")


def install_output(staged: Path, output: Path) -> None:
    """Move the finished adapter into place; an existing folder (--overwrite) is replaced only now."""
    if output.exists():
        shutil.rmtree(output)
    os.replace(staged, output)


def main(argv: list[str] | None = None, progress: Progress | None = None) -> int:
    """The command; `progress` (a fine-tuning job's trainer) receives each step's loss as it happens."""
    args = build_parser().parse_args(argv)
    report = progress or (lambda event: None)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.limit is not None and args.limit < 1:
        return fail(f"--limit must be at least 1, not {args.limit}")
    if bool(args.train) == bool(args.dataset):
        return fail("give the training data as --train FILE ... or as --dataset NAME (one of them)")
    if args.dataset:
        args.train = [DatasetSplit(args.dataset, args.train_split)]
        args.eval = args.eval or (DatasetSplit(args.dataset, args.eval_split) if args.eval_split else None)
    output = args.output or OUTPUT_ROOT / args.name
    try:
        check_output(output, args.overwrite)
        base, tokenizer, info = load_base(args.base_model, args.cache_dir, "float32")
        del base
        if args.task not in info.tasks:
            return fail(f"the base {info.name} is a {info.architecture} ({info.family}): it serves "
                        f"{', '.join(info.tasks)}, not {args.task}")
        prepared = prepare(args, tokenizer)
    except (DataError, OSError) as exc:
        return fail(str(exc))
    except Exception as exc:  # the base cannot load: a clear one-liner, not a traceback
        return fail(f"{exc.__class__.__name__}: {exc}")
    print(f"{PROG}: {len(prepared.train)} training rows, {len(prepared.eval)} eval rows, base {info.name} "
          f"({info.fingerprint})", file=sys.stderr)

    model = build_model(args, Path(info.path), len(prepared.labels), tokenizer.pad_token_id, info.num_layers)
    model.print_trainable_parameters()
    train_started = time.perf_counter()
    losses, curve = train(model, prepared, args, tokenizer.pad_token_id, progress)
    train_seconds = time.perf_counter() - train_started
    output.parent.mkdir(parents=True, exist_ok=True)
    # written next to the output and moved into place when complete: an interrupted run leaves no half adapter
    staged = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        model.peft_config["default"].base_model_name_or_path = info.name  # not this machine's cache path
        model.save_pretrained(staged)
        del model
        gc.collect()

        metadata = metadata_for(args, info, prepared, losses, curve, train_seconds)
        (staged / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        report({"event": "saved"})
        if args.eval:
            eval_started = time.perf_counter()
            metadata["metrics"] = evaluate(args, staged, prepared)
            metadata["eval_seconds"] = round(time.perf_counter() - eval_started, 1)
            print(format_metrics(metadata["metrics"]))
            report({"event": "metrics", "metrics": metadata["metrics"]})
        metadata["wall_seconds"] = round(time.perf_counter() - started, 1)
        (staged / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        plot(losses, curve, staged / PLOT_FILE, f"{args.name}: {args.task}, r={args.rank}, lr={args.lr}")
        make_readable(staged)
        install_output(staged, output)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"{PROG}: wrote {output} in {metadata['wall_seconds']:.0f} s", file=sys.stderr)

    if args.push:
        try:
            answer = push(output, args.push, args.name, args.token, args.replace)
        except (RuntimeError, httpx.HTTPError) as exc:
            return fail(str(exc))
        print(f"{PROG}: pushed to {args.push}: {json.dumps(answer)}", file=sys.stderr)
    return 0


def metadata_for(args, info: BaseInfo, prepared: Prepared, losses: list[float], curve: list[tuple[int, float]],
                 train_seconds: float) -> dict:
    """loraswap.json: what the server needs (task, labels) plus everything to reproduce and judge the adapter."""
    hyper = {k: getattr(args, k) for k in ("rank", "alpha", "dropout", "target_modules", "top_layers", "epochs", "lr",
                                           "batch_size", "max_length", "truncation", "seed", "dtype", "eval_dtype",
                                           "device",
                                           "max_new_tokens")}
    metadata: dict = {"task": args.task}
    if args.task == "classification":
        metadata.update(labels=prepared.labels, text_column=args.text_column, label_column=args.label_column)
    else:
        metadata.update(prompt_template=args.prompt_template, answer_template=args.answer_template,
                        truncate_columns=parse_truncate(args.truncate_column), decision_column=args.decision_column,
                        decision_labels=prepared.labels or None, messages_column=args.messages_column)
    metadata.update(
        base_model={"name": info.name, "fingerprint": info.fingerprint},
        data=prepared.data,
        hyperparameters=hyper,
        steps=len(losses),
        final_train_loss=round(sum(losses[-50:]) / len(losses[-50:]), 4),
        eval_loss_curve=[[s, round(v, 4)] for s, v in curve],
        train_losses=[round(loss, 4) for loss in losses],  # per step: the plot can always be drawn again
        train_seconds=round(train_seconds, 1),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return metadata


if __name__ == "__main__":
    raise SystemExit(main())
