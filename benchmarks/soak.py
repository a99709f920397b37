"""Soak: a real server under mixed traffic while adapters churn; every answer is checked against the answer that
adapter version gives alone.

    .venv/bin/python benchmarks/soak.py                # 10 minutes on the embedded base (float32)
    .venv/bin/python benchmarks/soak.py --minutes 1    # a short check

The server runs as its own process with max loaded adapters 2 (so adapters are evicted and loaded all the time) on
a scratch store holding four stable adapters (two classification, two generation) and two that churn: every few
seconds one of them is replaced by its other version, or deleted and uploaded again. Client threads send
classification, generation and streamed generation requests meanwhile. An answer is right if it equals (greedy ids;
labels and scores within 1e-4) the lone answer of a version that was current at some moment while the request was
in flight; a 404 or 409 is right only for a churning adapter that was deleted or replaced meanwhile.
Reports requests, wrong answers, 5xx, p50/p99 latency and the server's RSS after the warm-up and at the end;
writes benchmarks/results/soak-<time>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import torch
from safetensors.torch import save_file

from server.adapter_format import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from server.base_model import resolve_base_path
from server.settings import Settings

RESULTS = Path(__file__).parent / "results"
TOKEN = "soak-token"
TEXTS = ["the film was a quiet triumph", "free entry win a prize call now", "the second half drags on",
         "claim your reward before midnight", "a warm and funny story", "offer ends soon, reply stop"]
PROMPTS = ["Write one sentence about rain.", "Name a colour.", "What is 2 + 2?", "Say hello politely."]
MAX_NEW_TOKENS = 12
STABLE = {"cls-a": "classification", "cls-b": "classification", "gen-a": "generation", "gen-b": "generation"}
CHURNING = {"churn-cls": "classification", "churn-gen": "generation"}


def write_adapter(folder: Path, base: Path, task: str, seed: int) -> Path:
    """A random PEFT LoRA adapter (r=8 on q_proj and v_proj of every layer; classification: a 2-label head)."""
    config = json.loads((base / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    outputs = {"q_proj": heads * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, hidden, generator=gen) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 8, generator=gen) * 0.05
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                      "target_modules": list(outputs)}
    if task == "classification":
        tensors["base_model.model.score.weight"] = torch.randn(2, hidden, generator=gen) * 0.05
        adapter_config.update(task_type="SEQ_CLS", modules_to_save=["score"])
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config))
    if task == "classification":
        (folder / METADATA_FILE).write_text(json.dumps({"labels": ["no", "yes"]}))
    return folder


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in folder.iterdir():
            archive.write(path, f"{folder.name}/{path.name}")
    return buffer.getvalue()


@dataclass
class Churn:
    """What each churning name held over time: (start, end, variant) per change (variant None: deleted)."""

    history: dict[str, list[tuple[float, float, int | None]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, start: float, end: float, variant: int | None) -> None:
        with self.lock:
            self.history.setdefault(name, []).append((start, end, variant))

    def possible(self, name: str, sent: float, answered: float) -> set[int | None]:
        """Variants the name may have been served as between `sent` and `answered`: the one in place when the
        request was sent, and any a change in progress meanwhile put in place."""
        with self.lock:
            changes = list(self.history[name])
        before = [variant for start, end, variant in changes if end <= sent]
        during = {variant for start, end, variant in changes if start < answered and end > sent}
        return ({before[-1]} if before else set()) | during


class Soak:
    def __init__(self, url: str, references: dict, churn: Churn, deadline: float, seed: int):
        self.http = httpx.Client(base_url=url, timeout=120)
        self.references = references  # (name, variant, input) -> answer
        self.churn = churn
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.wrong: list[dict] = []

    def client(self, worker: int) -> None:
        rng = random.Random(worker)
        names = list(STABLE) + list(CHURNING)
        while time.monotonic() < self.deadline:
            name = rng.choice(names)
            task = STABLE.get(name) or CHURNING[name]
            item = rng.choice(TEXTS if task == "classification" else PROMPTS)
            stream = task == "generation" and rng.random() < 0.25
            body = {"inputs": item, "stream": stream}
            if task == "generation":
                body["parameters"] = {"max_new_tokens": MAX_NEW_TOKENS}
            sent = time.monotonic()
            response = self.http.post(f"/predict?adapter={name}", json=body)
            answered = time.monotonic()
            self.latencies.append(answered - sent)
            self.statuses[response.status_code] += 1
            self.judge(name, item, stream, response, sent, answered)

    def judge(self, name: str, item: str, stream: bool, response: httpx.Response, sent: float, answered: float):
        variants = self.churn.possible(name, sent, answered) if name in CHURNING else {0}
        if response.status_code == 200:
            output = answer_of(response, stream)
            if any(same(self.references[(name, v, item)], output) for v in variants if v is not None):
                self.outcomes["right"] += 1
                return
        elif response.status_code in (404, 409) and name in CHURNING and (None in variants or len(variants) > 1):
            self.outcomes[f"{response.status_code} while churning"] += 1
            return
        self.outcomes["wrong"] += 1
        self.wrong.append({"adapter": name, "input": item, "status": response.status_code, "variants": sorted(
            str(v) for v in variants), "body": response.text[:500]})


def answer_of(response: httpx.Response, stream: bool) -> dict:
    if stream:
        last = response.text.strip().split("\n\n")[-1]
        if not last.startswith("event: result"):
            return {"stream ended with": last[:200]}
        return json.loads(last.split("data: ", 1)[1])["outputs"][0]
    return response.json()["outputs"][0]


def same(reference: dict, output: dict) -> bool:
    if "token_ids" in reference:
        return output.get("token_ids") == reference["token_ids"]
    if output.get("label") != reference["label"] or set(output.get("scores", {})) != set(reference["scores"]):
        return False
    return all(abs(output["scores"][k] - v) <= 1e-4 for k, v in reference["scores"].items())


def upload(http: httpx.Client, name: str, folder: Path, replace: bool) -> httpx.Response:
    return http.post("/adapters", data={"name": name, "replace": str(replace).lower()},
                     files={"files": (f"{name}.zip", zipped(folder), "application/zip")})


def churner(http: httpx.Client, variants: dict, churn: Churn, deadline: float, every_s: float, seed: int,
            failures: list) -> None:
    rng = random.Random(seed)
    current = {name: 0 for name in CHURNING}
    while time.monotonic() < deadline:
        time.sleep(every_s)
        name = rng.choice(list(CHURNING))
        start = time.monotonic()
        if current[name] is not None and rng.random() < 0.3:
            response = http.delete(f"/adapters/{name}")
            new = None
        else:
            new = 0 if current[name] == 1 else 1
            response = upload(http, name, variants[(name, new)], replace=current[name] is not None)
        if response.status_code not in (200, 201, 204):
            failures.append(f"{name}: {response.status_code} {response.text[:300]}")
            continue
        churn.record(name, start, time.monotonic(), new)
        current[name] = new


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--churn-every-s", type=float, default=3.0)
    parser.add_argument("--base-model", type=Path, default=None, help="default: the embedded base")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads of the server (1: steady even when other processes share the cores)")
    args = parser.parse_args()

    base = resolve_base_path(args.base_model, Settings().cache_dir)
    work = Path(tempfile.mkdtemp(prefix="loraswap-soak-"))
    store, sources = work / "store", work / "sources"
    variants = {}
    for i, (name, task) in enumerate(STABLE.items()):
        write_adapter(store / name, base, task, seed=i)
    for i, (name, task) in enumerate(CHURNING.items()):
        for version in (0, 1):
            folder = sources / f"{version}" / name
            variants[(name, version)] = write_adapter(folder, base, task, seed=100 + 2 * i + version)

    log_path = work / "server.log"
    command = [sys.executable, "-m", "server", "--base-model", str(base), "--adapters-dir", str(store),
               "--port", str(args.port), "--dtype", "float32", "--max-loaded-adapters", "2",
               "--admin-token", TOKEN, "--log-format", "json", "--num-threads", str(args.server_threads)]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{args.port}"
    http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)

        # lone answers of every version, one request at a time
        references = {}
        churn = Churn()
        for name, task in {**STABLE, **CHURNING}.items():
            for version in ((0,) if name in STABLE else (1, 0)):  # the churning ones end on version 0
                if name in CHURNING:
                    assert upload(http, name, variants[(name, version)], replace=version == 0).status_code == 201
                for item in (TEXTS if task == "classification" else PROMPTS):
                    body = {"inputs": item}
                    if task == "generation":
                        body["parameters"] = {"max_new_tokens": MAX_NEW_TOKENS}
                    response = http.post(f"/predict?adapter={name}", json=body)
                    response.raise_for_status()
                    references[(name, version, item)] = response.json()["outputs"][0]
        now = time.monotonic()
        for name in CHURNING:
            churn.record(name, now, now, 0)
        rss_start = rss_mb(server.pid)
        print(f"references: {len(references)} lone answers; server RSS {rss_start:.0f} MiB; soaking for "
              f"{args.minutes:g} min", flush=True)

        deadline = time.monotonic() + args.minutes * 60
        soak = Soak(url, references, churn, deadline, seed=1)
        failures: list[str] = []
        threads = [threading.Thread(target=soak.client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=churner, args=(http, variants, churn, deadline, args.churn_every_s,
                                                              2, failures)))
        rss_samples = []
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            rss_samples.append(rss_mb(server.pid))
            time.sleep(10)
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)

    latencies = sorted(soak.latencies)
    requests = len(latencies)
    results = {
        "minutes": args.minutes, "clients": args.clients, "base": str(base.name),
        "requests": requests, "statuses": dict(soak.statuses), "outcomes": dict(soak.outcomes),
        "wrong": soak.outcomes["wrong"], "server_errors": sum(n for s, n in soak.statuses.items() if s >= 500),
        "churn_changes": sum(len(h) - 1 for h in churn.history.values()), "churn_failures": failures,
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(requests - 1, int(0.99 * requests))] * 1000, 1),
        "rss_start_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1),
        "rss_max_mib": round(max(rss_samples), 1), "rss_growth": round(rss_end / rss_start - 1, 4),
        "rss_every_10s_mib": [round(x) for x in rss_samples],
        "wrong_examples": soak.wrong[:10], "server_exit_code": server.returncode,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "wrong_examples"}, indent=2))
    print(f"written to {out}")
    ok = results["wrong"] == 0 and results["server_errors"] == 0 and results["rss_growth"] <= 0.05 and not failures
    print("bar (0 wrong, 0 5xx, RSS growth <= 5 %, every churn step answered):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
