"""Classification on two bases side by side: the shipped SmolLM2-135M adapters against the all-MiniLM-L6-v2 ones.

    .venv/bin/python benchmarks/bases.py            # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/bases.py --quick    # fewer rows, for a smoke check

float32 on both. Each round measures, per adapter: latency (one text per request, sequential: median and p90) and
throughput (dev texts in requests of 16). The two bases alternate within each round, so both see the same machine.
Needs the dev sets in ../shared/data. Prints a table and writes benchmarks/results/bases-<time>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from server.engine import Engine
from server.settings import SHIPPED_ADAPTERS, Settings
from server.types import AdapterLocation, GenerationParams

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results"
MARKER = Path("/tmp/BENCHMARK_RUNNING")
# base -> {adapter: dev file}
BASES = {
    "SmolLM2-135M-Instruct": {"sentiment": "sst2/dev.csv", "spam": "sms_spam/dev.csv"},
    "all-MiniLM-L6-v2": {"sentiment-minilm": "sst2/dev.csv", "spam-minilm": "sms_spam/dev.csv"},
}


def dev_texts(file: str, n: int) -> list[str]:
    with (DATA / file).open(newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle)][:n]


def engine_for(base: str) -> Engine:
    settings = Settings(base_model=None if base == "SmolLM2-135M-Instruct" else Path(base), dtype="float32",
                        max_loaded_adapters=2, auto_merge=False)
    return Engine.from_settings(settings)


def classify(engine: Engine, adapter: str, texts: list[str]) -> None:
    engine.predict(AdapterLocation(adapter, 1, SHIPPED_ADAPTERS / adapter), texts, GenerationParams())


def measure(engine: Engine, adapter: str, texts: list[str], singles: int) -> tuple[list[float], float]:
    latencies = []
    for text in texts[:singles]:
        started = time.perf_counter()
        classify(engine, adapter, [text])
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(0, len(texts), 16):
        classify(engine, adapter, texts[i:i + 16])
    return latencies, len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, singles = (64, 16) if args.quick else (256, 48)
    engines = {base: engine_for(base) for base in BASES}
    texts = {adapter: dev_texts(file, rows) for adapters in BASES.values() for adapter, file in adapters.items()}
    for base, engine in engines.items():  # untimed warm-up: load the adapters, first forwards
        for adapter in BASES[base]:
            classify(engine, adapter, texts[adapter][:16])
    latencies: dict[str, list[float]] = {adapter: [] for adapter in texts}
    throughput: dict[str, list[float]] = {adapter: [] for adapter in texts}
    MARKER.touch()
    try:
        for round_ in range(args.rounds):
            order = list(BASES) if round_ % 2 == 0 else list(reversed(BASES))
            for base in order:
                for adapter in BASES[base]:
                    lat, rate = measure(engines[base], adapter, texts[adapter], singles)
                    latencies[adapter] += lat
                    throughput[adapter].append(rate)
    finally:
        MARKER.unlink(missing_ok=True)
        for engine in engines.values():
            engine.close()

    table = {}
    print("| base | adapter | latency 1 text, median / p90 (ms) | throughput, requests of 16 (texts/s) |")
    print("|---|---|---|---|")
    for base, adapters in BASES.items():
        for adapter in adapters:
            lat = sorted(latencies[adapter])
            median, p90 = statistics.median(lat) * 1000, lat[int(0.9 * (len(lat) - 1))] * 1000
            rate = statistics.median(throughput[adapter])
            table[adapter] = {"base": base, "latency_ms_median": median, "latency_ms_p90": p90, "texts_per_s": rate}
            print(f"| {base} | {adapter} | {median:.1f} / {p90:.1f} | {rate:.1f} |")
    for small, large in (("sentiment-minilm", "sentiment"), ("spam-minilm", "spam")):
        faster = table[large]["latency_ms_median"] / table[small]["latency_ms_median"]
        more = table[small]["texts_per_s"] / table[large]["texts_per_s"]
        print(f"{small} vs {large}: latency {faster:.1f}x lower, throughput {more:.1f}x higher")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bases-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rows": rows, "singles": singles, "rounds": args.rounds, "threads": args.threads,
                               "dtype": "float32", "table": table}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
