"""Mixtures and DoRA in the shared batch: throughput of a generation stream where 20 % of the requests are per-request
mixtures and 20 % DoRA adapters, relative to the same stream on plain LoRA adapters only (goal >= 0.85).

    .venv/bin/python benchmarks/mixtures.py                 # the embedded base, float32 (~5 min on 2 CPU cores)
    .venv/bin/python benchmarks/mixtures.py --quick         # fewer requests, for a smoke check

Synthetic PEFT-format adapters on q_proj/v_proj of every layer (r=8): 16 plain LoRA ones, 4 DoRA ones (magnitude
vectors = the norm of W + scale B A moved by up to +-20 %, as a trained one), and 4 mixtures of two plain adapters
each (linear, cat, ties, dare_ties). Both streams send the same prompts in the same order, 16 clients in a closed
loop, every request 32 new tokens (EOS ignored, so both generate the same number); they run in alternating chunks
(AB, BA, ...) on one engine, every adapter and mixture loaded before the clock starts (the build of each mixture is
timed on its own). Three ratios: tokens per wall second over the whole run; the median of the ratios of adjacent
chunks (drift between minutes falls on both); and tokens per CPU second of the engine thread, which alone runs the
model (one torch thread by default: --threads), the measure that other jobs on a shared machine disturb least.
Writes benchmarks/results/mixtures-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from run import popularity, run_stream, text  # benchmarks/run.py: the same stream helpers as the main benchmark
from safetensors.torch import save_file

from server.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from server.engine import Engine
from server.settings import Settings
from server.types import AdapterLocation, GenerationParams, MixtureKey, MixturePart

RESULTS = Path(__file__).parent / "results"
RANK = 8
MIXTURES = (("linear", None, None), ("cat", None, None), ("ties", 0.5, None), ("dare_ties", 0.5, 0))


def write_adapter(folder: Path, engine: Engine, seed: int, dora: bool) -> Path:
    """A random PEFT-format adapter on q_proj/v_proj of every layer; DoRA with a magnitude per output feature."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, layer in engine.layers.items():
        if path.endswith(("q_proj", "v_proj")):
            prefix = f"base_model.model.{path}"
            A = torch.randn(RANK, layer.in_features, generator=gen) * 0.02
            B = torch.randn(layer.out_features, RANK, generator=gen) * 0.02
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
            if dora:
                norm = torch.linalg.norm(layer.weight.float() + 2 * B @ A, dim=1)  # scale = alpha / r = 2
                tensors[f"{prefix}.lora_magnitude_vector"] = norm * (1 + 0.4 * (torch.rand(norm.shape, generator=gen)
                                                                                - 0.5))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
              "target_modules": ["q_proj", "v_proj"], "use_dora": dora}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke check)")
    parser.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--base-model", type=Path, default=None,
                        help="a local model folder instead of the embedded base")
    parser.add_argument("--requests", type=int, default=None, help="requests per stream (default 160, quick 32)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating chunks (default 10, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    requests = args.requests or (32 if args.quick else 160)
    rounds = args.rounds or (2 if args.quick else 10)
    torch.set_num_threads(args.threads)
    rng = random.Random(2026)
    store = Path(tempfile.mkdtemp(prefix="loraswap-mixtures-"))
    settings = Settings(adapters_dir=store, dtype=args.dtype, max_loaded_adapters=32, auto_merge=False,
                        **({"base_model": args.base_model} if args.base_model else {}))
    engine = Engine.from_settings(settings)
    plain = [AdapterLocation(f"plain-{i}", 1, write_adapter(store / f"plain-{i}", engine, i, False)) for i in range(16)]
    dora = [AdapterLocation(f"dora-{i}", 1, write_adapter(store / f"dora-{i}", engine, 100 + i, True))
            for i in range(4)]
    mixtures = [MixtureKey((MixturePart(plain[2 * i], 0.7), MixturePart(plain[2 * i + 1], 0.3)), combination, density,
                           seed) for i, (combination, density, seed) in enumerate(MIXTURES)]
    build_ms = {}
    for key in mixtures:  # each mixture is built once, on its first request: timed here, outside the streams
        started = time.perf_counter()
        engine.release(engine.acquire(key))
        build_ms[key.combination] = (time.perf_counter() - started) * 1000
    for location in plain + dora:
        engine.release(engine.acquire(location))

    params = GenerationParams(max_new_tokens=32, ignore_eos=True)
    prompts = [text(rng, rng.randint(6, 24)) for _ in range(requests)]
    plain_picks = [plain[i] for i in popularity(len(plain), "zipf", requests, rng)]
    kinds = ["mixture"] * (requests // 5) + ["dora"] * (requests // 5)
    kinds += ["plain"] * (requests - len(kinds))
    rng.shuffle(kinds)
    mixed_picks = [rng.choice(mixtures) if kind == "mixture" else rng.choice(dora) if kind == "dora" else pick
                   for kind, pick in zip(kinds, plain_picks)]
    jobs = list(range(requests))
    outputs: dict[str, list] = {"plain": [], "mixed": []}

    def call(stream: str, picks: list):
        def run(i: int) -> None:
            _, results = engine.predict(picks[i], [prompts[i]], params)
            outputs[stream].extend(results)
        return run

    engine.predict(plain[0], prompts[:1], params)  # warm-up, untimed
    calls = {"plain": call("plain", plain_picks), "mixed": call("mixed", mixed_picks)}
    size = -(-requests // rounds)
    chunks: list[dict[str, tuple[int, float, float]]] = []  # per chunk and stream: tokens, wall s, engine CPU s
    for index, start in enumerate(range(0, requests, size)):
        chunk = {}
        for name in (list(calls) if index % 2 == 0 else list(calls)[::-1]):
            before_tokens, cpu = len(outputs[name]), engine_cpu_s(engine)
            wall = run_stream(jobs[start : start + size], calls[name], concurrency=16)
            tokens = sum(r.tokens for r in outputs[name][before_tokens:])
            chunk[name] = (tokens, wall, engine_cpu_s(engine) - cpu)
        chunks.append(chunk)
    total = {name: [sum(c[name][i] for c in chunks) for i in range(3)] for name in calls}
    tps = {name: tokens / wall for name, (tokens, wall, _) in total.items()}
    cpu_tps = {name: tokens / cpu for name, (tokens, _, cpu) in total.items()}
    ratio = tps["mixed"] / tps["plain"]
    chunk_ratios = [(c["mixed"][0] / c["mixed"][1]) / (c["plain"][0] / c["plain"][1]) for c in chunks]
    results = {
        "base": engine.info.name, "dtype": str(engine.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "requests_per_stream": requests, "rounds": rounds, "max_new_tokens": params.max_new_tokens,
        "mixed_stream": {kind: kinds.count(kind) for kind in ("plain", "dora", "mixture")},
        "tokens_per_s": tps, "ratio_mixed_over_plain": ratio, "goal": ">= 0.85",
        "median_chunk_ratio": statistics.median(chunk_ratios), "chunk_ratios": chunk_ratios,
        "tokens_per_engine_cpu_s": cpu_tps, "cpu_ratio_mixed_over_plain": cpu_tps["mixed"] / cpu_tps["plain"],
        "chunks": chunks, "load_average": os.getloadavg(),
        "mixture_build_ms": build_ms, "mean_batch_rows": statistics.fmean(
            [rows for rows, n in engine.batch_sizes.items() for _ in range(n)]),
        "cpu": _cpu(),
    }
    engine.close()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"mixtures-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"plain LoRA stream : {tps['plain']:.1f} tokens/s, {cpu_tps['plain']:.1f} per engine CPU second")
    print(f"20 % mixtures, 20 % DoRA: {tps['mixed']:.1f} tokens/s, {cpu_tps['mixed']:.1f} per engine CPU second")
    print(f"ratio {ratio:.3f} (goal >= 0.85), median of chunk ratios {results['median_chunk_ratio']:.3f}, "
          f"per engine CPU second {results['cpu_ratio_mixed_over_plain']:.3f}")
    print(f"mixture builds: {', '.join(f'{k} {v:.0f} ms' for k, v in build_ms.items())}")
    print(f"written to {out}")


def engine_cpu_s(engine: Engine) -> float:
    """CPU seconds (user + system) the engine's worker thread has used: it alone runs the model."""
    fields = Path(f"/proc/self/task/{engine.runner._thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
