"""A fine-tuning job with only `training_file` (every hyperparameter auto) on the real base, scored on dev rows.

    .venv/bin/python benchmarks/finetune_auto.py                  # sms_spam, then sst2: about 10-20 minutes
    .venv/bin/python benchmarks/finetune_auto.py --data sst2

For each data set: 200 rows drawn at random from `../shared/data/<data>/train.csv` (natural class balance), uploaded
and trained with the official openai client exactly as a user who sends nothing else would
(`fine_tuning.jobs.create(model=..., training_file=...)`), on a server started on the embedded base with
`--dtype float32`; then 200 rows drawn at random from `dev.csv` (never seen in training) are classified through
/predict. Records the wall time from create to succeeded, the dev accuracy and macro F1 beside the majority class's
accuracy, the job's events (its auto choices and validation figures) and the machine's load average, into
benchmarks/results/finetune-auto-<time>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
TOKEN = "benchmark-token"
BASE = "SmolLM2-135M-Instruct"
sys.path.insert(0, str(REPO))

from scripts.metrics import classification_metrics  # noqa: E402
from tests.helpers import free_port  # noqa: E402


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [{"text": row["text"], "label": row["label"]} for row in csv.DictReader(handle)]


class LoadSampler:
    """The 1-minute load average every 10 s while a job runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(10)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(url: str, name: str, rows: int, dev_rows: int, seed: int) -> dict:
    rng = random.Random(seed)
    train = rng.sample(read_csv(DATA / name / "train.csv"), rows)
    dev = rng.sample(read_csv(DATA / name / "dev.csv"), dev_rows)
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    data = "".join(json.dumps(row) + "\n" for row in train).encode()
    training = oai.files.create(file=(f"{name}-{rows}.jsonl", data), purpose="fine-tune")
    started = time.monotonic()
    with LoadSampler() as load:
        job = oai.fine_tuning.jobs.create(model=BASE, training_file=training.id)
        while (job := oai.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
    seconds = time.monotonic() - started
    events = list(reversed(oai.fine_tuning.jobs.list_events(job.id, limit=10_000).data))
    result = {"data": name, "train_rows": rows, "train_labels": dict(Counter(r["label"] for r in train)),
              "job_seconds": round(seconds, 1), "status": job.status, "error": job.error and job.error.model_dump(),
              "hyperparameters": job.hyperparameters.model_dump(), "lora": getattr(job, "lora", None),
              "load_average_during_job": load.samples,
              "events": [e.message for e in events if not e.message.startswith("Step ") or "validation" in e.message]}
    if job.status != "succeeded":
        return result
    predicted = []
    ordered = sorted(dev, key=lambda r: len(r["text"]))  # less padding per batch
    for start in range(0, len(ordered), 32):
        response = httpx.post(f"{url}/predict?adapter={job.fine_tuned_model}",
                              json={"inputs": [r["text"] for r in ordered[start:start + 32]]}, timeout=300)
        response.raise_for_status()
        predicted += [o["label"] for o in response.json()["outputs"]]
    gold = [r["label"] for r in ordered]
    labels = sorted(set(gold) | set(r["label"] for r in train))
    metrics = classification_metrics(gold, predicted, labels)
    majority = Counter(gold).most_common(1)[0]
    result.update(
        dev_rows=dev_rows, dev_labels=dict(Counter(gold)), dev_accuracy=round(metrics["accuracy"], 4),
        dev_macro_f1=round(metrics["macro_f1"], 4), dev_confusion=metrics["confusion_matrix"],
        majority_label=majority[0], majority_accuracy=round(majority[1] / len(gold), 4),
        points_over_majority=round(100 * (metrics["accuracy"] - majority[1] / len(gold)), 2),
        validation_metrics=next((e.data["metrics"] for e in events if e.data and "metrics" in e.data), None),
    )
    print(f"{name}: {seconds:.0f} s, dev accuracy {metrics['accuracy']:.4f} (majority {majority[1] / len(gold):.4f})",
          file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["sms_spam", "sst2"])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-nice", type=int, default=10)
    args = parser.parse_args()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = REPO / "benchmarks" / "results" / f"finetune-auto-{stamp}.json"
    port = free_port()
    with tempfile.TemporaryDirectory() as store:
        command = [sys.executable, "-m", "server", "--adapters-dir", store, "--port", str(port), "--dtype",
                   "float32", "--admin-token", TOKEN, "--finetune-nice", str(args.finetune_nice)]
        log = open(Path(store).parent / f"finetune-auto-{stamp}.log", "wb")
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start; see {log.name}")
                time.sleep(1)
            runs = [run_one(url, name, args.rows, args.dev_rows, args.seed) for name in args.data]
        finally:
            server.terminate()
            server.wait(30)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    results = {"benchmark": "finetune_auto", "created": stamp, "cpu": cpu, "cores": os.cpu_count(),
               "server": " ".join(command[2:]).replace(store, "<tmp store>"), "trainer_threads": 1,
               "seed": args.seed, "runs": runs}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
