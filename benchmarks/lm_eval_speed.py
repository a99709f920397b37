"""lm-evaluation-harness log-likelihood scoring through the server against the harness's own `hf` model with `peft=`:
the same adapter (pubmedqa), data and batch size, float32, one thread each; wall time and accuracy of each, in
alternating order over the rounds.

    .venv/bin/python benchmarks/lm_eval_speed.py [--questions 24] [--rounds 2]

The task is written here on local files (nothing from a dataset hub): PubMedQA dev questions (then train ones) in the
adapter's prompt template, their context cut to its last --context characters, three choices " yes", " no",
" maybe" after "Answer:". Needs `pip install "lm-eval[api]==0.4.13"` in .venv (scripts/dev.sh setup installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DATA = ROOT.parent / "shared" / "data" / "pubmedqa"
ADAPTER = ROOT / "server" / "shipped_adapters" / "pubmedqa"  # what the server serves as "pubmedqa"
TASK = """
task: pubmedqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: [" yes", " no", " maybe"]
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""


def write_task(folder: Path, questions: int, context: int) -> None:
    rows = []
    for split in ("dev", "train"):
        rows += [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().split("\n") if line.strip()]
    docs = [{"prompt": f"Question: {row['question']}\nResults: {row['context'][-context:]}\n\nAnswer:",
             "answer": ["yes", "no", "maybe"].index(row["answer"])} for row in rows[:questions]]
    (folder / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "task.yaml").write_text(TASK.format(data=folder / "data.jsonl"))


def evaluate(model: str, model_args: dict, tasks: Path) -> tuple[float, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["pubmedqa_local"],
                                     task_manager=TaskManager(include_path=str(tasks)))
    return time.perf_counter() - started, result["results"]["pubmedqa_local"]["acc,none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--context", type=int, default=400, help="characters of each question's context kept")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the hf model runs in this process
    base = Path.home() / ".cache" / "loraswap" / "SmolLM2-135M-Instruct"  # the converted base (the server makes it)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp)
        write_task(tasks, args.questions, args.context)
        log = (tasks / "server.log").open("wb")
        server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--dtype", "float32",
                                   "--num-threads", "1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        try:
            for _ in range(600):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                        break
                except OSError:
                    time.sleep(1)
            runs = {
                "loraswap (local-completions)": ("local-completions", {
                    "model": "pubmedqa", "base_url": f"http://127.0.0.1:{port}/v1/completions",
                    "tokenizer": str(base), "tokenizer_backend": "huggingface", "batch_size": args.batch_size}),
                "lm-eval hf + peft": ("hf", {"pretrained": str(base), "peft": str(ADAPTER), "dtype": "float32",
                                             "device": "cpu", "batch_size": args.batch_size}),
            }
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            accuracy: dict[str, float] = {}
            loads = []
            for round_ in range(args.rounds):
                for name in list(runs)[:: 1 if round_ % 2 == 0 else -1]:
                    took, accuracy[name] = evaluate(*runs[name], tasks)
                    seconds[name].append(took)
                    loads.append(os.getloadavg()[0])
                    print(f"round {round_ + 1} {name}: {took:.1f} s, acc {accuracy[name]:.3f} (load {loads[-1]:.1f})",
                          flush=True)
        finally:
            server.terminate()
            server.wait(30)
    total = {name: sum(values) for name, values in seconds.items()}
    names = list(runs)
    print(f"{args.questions} questions x 3 choices, batch {args.batch_size}, float32, one thread each, load "
          f"{min(loads):.1f}-{max(loads):.1f}: hf time / loraswap time = {total[names[1]] / total[names[0]]:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lm_eval_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "questions": args.questions, "context_chars": args.context, "batch_size": args.batch_size, "seconds": seconds,
        "accuracy": accuracy, "load_average": [min(loads), max(loads)]}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
