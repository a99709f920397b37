"""Ray Serve scale-out (server/cluster.py): throughput with 1 vs 2 engine replicas, and adapter affinity under Zipf.

    .venv/bin/python benchmarks/cluster.py            # both parts (~5 min on 2 CPU cores)
    .venv/bin/python benchmarks/cluster.py --quick    # fewer requests, for a smoke check

Part 1, on the embedded base (SmolLM2-135M, dtype auto) with the shipped `sentiment` and `spam` adapters: the same
stream of classification requests (4 texts each, 8 clients at once, half per adapter) against one `loraswap`
process (1 and 2 torch threads), a Ray Serve app with 1 engine replica (1 and 2 threads) and one with 2 replicas
(1 thread each), side by side in one run. Part 2, on a tiny random base (hidden 64, 2 layers; what the tests use):
50 adapters, requests drawn from a Zipf law (s = 1.1), 2 replicas holding 8 adapters each; the measured hit rate
(requests that found their adapter already loaded on the replica that served them) beside what an LRU of the same
sizes would get with random routing (simulated on the same request sequence).

Prints a table and writes benchmarks/results/cluster-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
TEXTS = ["the film was a quiet triumph of craft and feeling", "free entry win a prize call now to claim your reward",
         "although the second half drags on it is worth it", "offer ends soon reply stop to opt out of messages"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready")
        time.sleep(0.5)


def run_stream(url: str, requests: list[tuple[str, list[str]]], clients: int) -> tuple[float, Counter]:
    """Send every (adapter, texts) request with `clients` at once; requests per second and replicas seen."""
    replicas: Counter = Counter()

    with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        def one(request: tuple[str, list[str]]) -> None:
            adapter, texts = request
            response = http.post("/predict", params={"adapter": adapter}, json={"inputs": texts})
            response.raise_for_status()
            replicas[response.headers.get("x-loraswap-replica", "-")] += 1

        for request in requests[: 2 * clients]:  # warm-up: adapters loaded, first batches run
            one(request)
        replicas.clear()
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, requests))
        return len(requests) / (time.perf_counter() - started), replicas


def single_process(settings: dict, requests, clients: int) -> float:
    port = free_port()
    threads = str(settings["num_threads"])  # as the replicas get it (server/cluster.py)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads,
           **{f"LORASWAP_{k.upper()}": str(v) for k, v in settings.items()}}
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        return run_stream(url, requests, clients)[0]
    finally:
        process.terminate()
        process.wait(30)


def ray_app(settings, name: str):
    """Serve `settings` on the running Ray as app `name`; returns its URL (Serve's one HTTP port)."""
    from ray import serve

    from server.cluster import build

    serve.run(build(settings, app_name=name), name=name, route_prefix=f"/{name}")
    return name


def throughput(quick: bool, port: int) -> dict:
    from ray import serve

    from server.base_model import ensure_embedded_converted
    from server.settings import Settings

    cache = Path.home() / ".cache" / "loraswap"
    ensure_embedded_converted(cache)
    n = 48 if quick else 160
    rng = random.Random(0)
    requests = [(("sentiment", "spam")[i % 2], rng.sample(TEXTS, 4)) for i in range(n)]
    clients = 8
    # an empty writable store beside the shipped adapters
    common = {"adapters_dir": Path(tempfile.mkdtemp(prefix="loraswap-store-")), "cache_dir": cache, "auto_merge": False}
    rows = {}
    for threads in (1, 2):
        rows[f"one process, {threads} thread(s)"] = single_process({**common, "num_threads": threads}, requests,
                                                                   clients)
    for replicas, threads in ((1, 1), (1, 2), (2, 1)):
        name = f"r{replicas}t{threads}"
        ray_app(Settings(**common, replicas=replicas, num_threads=threads), name)
        url = f"http://127.0.0.1:{port}/{name}"
        wait_ready(url)
        rate, seen = run_stream(url, requests, clients)
        rows[f"Ray Serve, {replicas} replica(s) x {threads} thread(s)"] = rate
        print(f"  {name}: requests per replica {dict(seen)}", flush=True)
        serve.delete(name)
    return {"requests": n, "clients": clients, "texts_per_request": 4, "requests_per_s": rows}


def zipf_trace(adapters: int, requests: int, s: float, seed: int) -> list[int]:
    weights = [1 / k**s for k in range(1, adapters + 1)]
    return random.Random(seed).choices(range(adapters), weights=weights, k=requests)


def lru_hit_rate(trace: list[int], capacity: int, route) -> float:
    caches: dict[int, OrderedDict] = defaultdict(OrderedDict)
    hits = 0
    for i, adapter in enumerate(trace):
        cache = caches[route(i, adapter)]
        if adapter in cache:
            hits += 1
            cache.move_to_end(adapter)
        else:
            cache[adapter] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / len(trace)


def affinity(quick: bool, port: int) -> dict:
    from ray import serve
    from transformers import AutoTokenizer

    from server.base_model import embedded_gguf_path
    from server.settings import Settings

    sys.path.insert(0, str(ROOT))  # the tests' tiny-model builders
    from tests.helpers import make_adapter, make_tiny_base

    n_adapters, capacity, s = 50, 8, 1.1
    n = 300 if quick else 1000
    work = Path(tempfile.mkdtemp(prefix="loraswap-affinity-"))
    gguf = embedded_gguf_path()
    base = make_tiny_base(work / "base", AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    store = work / "adapters"
    for i in range(n_adapters):
        make_adapter(base, store / f"a{i:02d}", r=4, seed=100 + i)
    trace = zipf_trace(n_adapters, n, s, seed=0)
    settings = Settings(base_model=base, adapters_dir=store, cache_dir=work / "cache", dtype="float32", replicas=2,
                        num_threads=1, max_loaded_adapters=capacity, auto_merge=False)
    name = "zipf"
    ray_app(settings, name)
    url = f"http://127.0.0.1:{port}/{name}"
    wait_ready(url)
    served: dict[str, Counter] = defaultdict(Counter)
    clients = 8

    with httpx.Client(base_url=url, timeout=300) as http:
        def one(adapter: int) -> None:
            response = http.post("/predict", params={"adapter": f"a{adapter:02d}"},
                                 json={"inputs": "hello there", "parameters": {"max_new_tokens": 2}})
            response.raise_for_status()
            served[f"a{adapter:02d}"][response.headers["x-loraswap-replica"]] += 1

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, trace))
        metrics = http.get("/metrics").text
    loads = sum(float(v) for v in re.findall(r'^loraswap_adapter_load_seconds_count\{.*\} (\S+)$', metrics, re.M))
    serve.delete(name)
    on_top_replica = sum(c.most_common(1)[0][1] for c in served.values()) / n
    rng = random.Random(1)
    return {
        "base": "tiny random Llama (hidden 64, 2 layers), float32",
        "adapters": n_adapters, "zipf_s": s, "requests": n, "clients": clients, "per_replica_capacity": capacity,
        "measured_hit_rate": 1 - loads / n,
        "loads": loads,
        "requests_on_each_adapters_main_replica": on_top_replica,
        "simulated_hit_rate": {
            "2 replicas x LRU 8, random routing": lru_hit_rate(trace, capacity, lambda i, a: rng.randrange(2)),
            "1 replica x LRU 8": lru_hit_rate(trace, capacity, lambda i, a: 0),
            "1 replica x LRU 16 (the pooled memory, perfect partition)": lru_hit_rate(trace, 2 * capacity,
                                                                                        lambda i, a: 0),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["all", "throughput", "affinity"], default="all")
    args = parser.parse_args()
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)
    from ray import serve

    result: dict = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        if args.part in ("all", "throughput"):
            result["throughput"] = throughput(args.quick, port)
        if args.part in ("all", "affinity"):
            result["affinity"] = affinity(args.quick, port)
    finally:
        serve.shutdown()
        ray.shutdown()
    result["load_average_after"] = os.getloadavg()  # other processes on the machine change every number here
    print(json.dumps(result, indent=2, default=str))
    if "throughput" in result:
        rows = result["throughput"]["requests_per_s"]
        first = next(iter(rows.values()))
        for label, rate in rows.items():
            print(f"{label:40s} {rate:7.2f} req/s  x{rate / first:.2f}")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
