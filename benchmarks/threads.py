"""A decode step with one torch thread against two, under libgomp's default waiting and under the waiting the
`loraswap` command sets (server/openmp.py): the embedded base, float32, 16 adapters (random r=8/16 pairs on q/v),
1 row and 16 rows of different adapters, 40 new tokens; one and two threads alternate 5 times within each process;
each setting in a process of its own (libgomp reads it once, when torch loads it). Prints the medians of the C step
alone and of the whole step (the worker's wall time).

    .venv/bin/python benchmarks/threads.py [--out benchmarks/results/threads.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from server import openmp

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"libgomp's default": {}, "server/openmp.py": openmp.WAITING}


def measure() -> dict:
    import random
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import text, write_adapter

    from server.engine import Engine
    from server.settings import Settings
    from server.types import AdapterLocation, GenerationParams

    torch.set_num_threads(2)
    store = Path(tempfile.mkdtemp(prefix="loraswap-threads-"))
    engine = Engine.from_settings(Settings(dtype="float32", num_threads=2, adapters_dir=store, max_loaded_adapters=32,
                                           max_batch_size=16, auto_merge=False))
    slots = [engine.acquire(AdapterLocation(f"gen{i}", 1, write_adapter(store / f"gen{i}", engine, (8, 16)[i % 2],
                                                                        "generation", 1000 + i))) for i in range(16)]
    runner, fused = engine.runner, engine.runner.lean.fused
    c_step, whole = fused.step, runner._step
    c_times: list[float] = []
    whole_times: list[float] = []

    def timed(record: list[float], call):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return call(*args)
            finally:
                record.append(time.perf_counter() - started)
        return run

    fused.step, runner._step = timed(c_times, c_step), timed(whole_times, whole)
    rng = random.Random(1)
    results: dict = {}
    for rows in (1, 16):
        prompts = [text(rng, 16) for _ in range(rows)]
        for threads in (1, 2) * 5:
            runner.call(lambda: torch.set_num_threads(threads))
            c_times.clear()
            whole_times.clear()
            with ThreadPoolExecutor(rows) as pool:
                for request in [pool.submit(engine.generate, [p], slots[i], GenerationParams(40, ignore_eos=True))
                                for i, p in enumerate(prompts)]:
                    request.result()
            entry = results.setdefault(f"{rows} rows, {threads} threads", {"c_step_ms": [], "step_ms": []})
            entry["c_step_ms"].append(1000 * statistics.median(c_times))
            entry["step_ms"].append(1000 * statistics.median(whole_times))
    engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    lines = [f"load average {os.getloadavg()[0]:.2f}; medians over 5 alternations (ms: C step / whole step)"]
    for name, values in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if k not in openmp.WAITING}
        done = subprocess.run([sys.executable, __file__, "--child"], env={**env, **values, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, check=True)
        results = json.loads(done.stdout.strip().splitlines()[-1])
        lines.append(f"{name} ({', '.join(f'{k}={v}' for k, v in values.items()) or 'unset'}):")
        for case, entry in results.items():
            c_step, step = statistics.median(entry["c_step_ms"]), statistics.median(entry["step_ms"])
            lines.append(f"  {case}: {c_step:.1f} / {step:.1f}  (C step per alternation: "
                         f"{', '.join(f'{v:.1f}' for v in entry['c_step_ms'])})")
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
