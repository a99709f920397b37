"""What a fine-tuning job costs serving: latency of a shipped adapter while a job trains, against idle.

    .venv/bin/python benchmarks/finetune_cost.py      # about 2-3 minutes

Starts a server on the embedded base with a copy of the shipped `spam` adapter and a fine-tuning job (its trainer
niced, one thread by default), then times single /predict requests to `spam` in alternating chunks: with the trainer
stopped (SIGSTOP: idle, its memory still held) and running (SIGCONT), in the order AB BA AB ..., so the machine's
drift falls on both sides alike. Prints the medians side by side and their ratio. The job trains on generated rows
and is cancelled after the measurement: nothing is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TOKEN = "benchmark-token"
TEXTS = ["Congratulations! You have won a free cruise, call now to claim", "Are we still on for lunch tomorrow?",
         "URGENT: your account needs verification, reply with your PIN", "I'll be home late, keep dinner warm"]
WORDS = "free win call now prize claim text lunch home later meet tonight love ok thanks sorry".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_rows(n: int) -> bytes:
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(WORDS, k=24)), "label": "spam" if i % 2 else "ham"} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def latencies(client: httpx.Client, n: int) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        response = client.post("/predict?adapter=spam", json={"inputs": TEXTS[i % len(TEXTS)]})
        response.raise_for_status()
        times.append(1000 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=8, help="chunks per side")
    parser.add_argument("--chunk-requests", type=int, default=5, help="requests per chunk")
    parser.add_argument("--finetune-threads", type=int, default=1)
    parser.add_argument("--finetune-nice", type=int, default=10)
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="finetune-cost-"))  # the writable store; spam is a shipped adapter
    port = free_port()
    log = (store / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "--adapters-dir", str(store), "--port", str(port), "--dtype", "float32",
         "--admin-token", TOKEN, "--finetune-threads", str(args.finetune_threads),
         "--finetune-nice", str(args.finetune_nice), "--auto-merge", "false"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    trainer: int | None = None
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server not ready:\n{(store / 'server.log').read_text()}")
            time.sleep(0.5)
        base = client.get("/health").json()["base"]["name"]
        latencies(client, 5)  # warm-up: the adapter loads, caches fill
        file_id = client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                              files={"file": ("rows.jsonl", training_rows(400))}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", headers=headers, json={
            "model": base, "training_file": file_id, "hyperparameters": {"n_epochs": 5, "batch_size": 8},
            "metadata": {"lora_top_layers": "8", "max_length": "64"}}).json()
        while not any(e["type"] == "metrics" for e in
                      client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=5").json()["data"]):
            if time.monotonic() > deadline + 120:
                raise SystemExit("the job did not start training")
            time.sleep(0.5)
        trainer = json.loads((store / ".jobs" / job["id"] / "job.json").read_text())["trainer_pid"]
        idle: list[float] = []
        training: list[float] = []
        for chunk in range(args.chunks):
            for stopped in ((True, False) if chunk % 2 == 0 else (False, True)):
                os.kill(trainer, signal.SIGSTOP if stopped else signal.SIGCONT)
                (idle if stopped else training).extend(latencies(client, args.chunk_requests))
        os.kill(trainer, signal.SIGCONT)
        status = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
        steps = [e for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=10000").json()["data"]
                 if e["type"] == "metrics"]
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=headers)
    finally:
        if trainer is not None:
            with contextlib.suppress(ProcessLookupError):  # a stopped trainer would not see the server's SIGTERM
                os.kill(trainer, signal.SIGCONT)
        server.terminate()
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(store, ignore_errors=True)

    print(f"fine-tuning cost on serving: {len(idle)} + {len(training)} single /predict requests to `spam` in "
          f"alternating chunks of {args.chunk_requests}, trainer threads {args.finetune_threads}, "
          f"nice {args.finetune_nice}")
    print(f"{'trainer':<28}{'median ms':>10}{'p90 ms':>10}")
    for name, times in [("stopped (idle)", idle), ("training", training)]:
        print(f"{name:<28}{statistics.median(times):>10.1f}{statistics.quantiles(times, n=10)[-1]:>10.1f}")
    print(f"job still {status} at the end; {len(steps)} training steps reported by then")
    print(f"median latency while training / idle: {statistics.median(training) / statistics.median(idle):.2f}")


if __name__ == "__main__":
    main()
