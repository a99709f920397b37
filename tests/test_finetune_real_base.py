"""A fine-tuning job on the real embedded base with only `training_file` (every hyperparameter auto): 200 random rows
of ../shared/data/sms_spam (its natural balance, 9 % spam in this draw), through the official client against a server
process; the adapter it installs must beat the majority class by 8 points on 200 random dev rows.

Before `auto` (1 epoch of q/v LoRA at 2e-4), such a job learned to answer "ham" to everything;
benchmarks/finetune_auto.py measures the same job on sms_spam and sst2 and records its time and the machine's load."""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import server_process
from tests.test_finetune import client_for, wait_for

pytestmark = pytest.mark.real_base

SPAM = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sms_spam"
ROWS = 200
MARGIN = 0.08  # over the majority class's accuracy
STATED_SECONDS = 900  # README, "Fine-tuning jobs": about 5 minutes on a loaded 2-core machine, 15 at most


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [{"text": row["text"], "label": row["label"]} for row in csv.DictReader(handle)]


@pytest.mark.skipif(not SPAM.is_dir(), reason="needs ../shared/data/sms_spam")
def test_spam_job_beats_the_majority_class_within_the_stated_time(tmp_path):
    rng = random.Random(0)  # the draw of benchmarks/finetune_auto.py
    train = rng.sample(read_csv(SPAM / "train.csv"), ROWS)
    dev = sorted(rng.sample(read_csv(SPAM / "dev.csv"), ROWS), key=lambda row: len(row["text"]))  # less padding
    store = tmp_path / "adapters"
    store.mkdir()
    # nice 10, not the default 19: on a machine shared with other jobs a nice-19 trainer can starve for minutes
    with server_process(None, store, tmp_path / "server.log", "--finetune-nice", "10") as (url, _):
        oai = client_for(url)
        data = "".join(json.dumps(row) + "\n" for row in train).encode()
        training = oai.files.create(file=("spam-200.jsonl", data), purpose="fine-tune")
        started = time.monotonic()
        job = oai.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=training.id)
        done = wait_for(oai, job.id, {"succeeded", "failed", "cancelled"}, timeout=STATED_SECONDS)
        seconds = time.monotonic() - started
        assert done.status == "succeeded", done.error
        predicted = []
        for start in range(0, len(dev), 64):
            response = httpx.post(f"{url}/predict?adapter={done.fine_tuned_model}",
                                  json={"inputs": [r["text"] for r in dev[start:start + 64]]}, timeout=120)
            assert response.status_code == 200, response.text
            predicted += [o["label"] for o in response.json()["outputs"]]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, dev)) / len(dev)
    majority = max(sum(r["label"] == label for r in dev) for label in ("ham", "spam")) / len(dev)
    print(f"spam job: {seconds:.0f} s, dev accuracy {accuracy:.4f} (majority class {majority:.4f})")
    assert seconds < STATED_SECONDS and accuracy >= majority + MARGIN
