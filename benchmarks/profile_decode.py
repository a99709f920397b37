"""Where a decode step's time goes: the embedded base, float32, one torch thread, one request (or `--rows` rows) with
the pubmedqa adapter (auto-merge off, so the LoRA path runs), greedy, 64 new tokens.

Prints tokens/s of whole requests with the step in C (server/fused.py), the compiled step (server/row_step.py; one
row or two, else the eager step), the eager lean decode step (server/decode.py) and transformers' full forward, in
alternating rounds, then a cProfile of 32 decode steps of each on the worker thread, by own time: torch's operators
and the C calls show as built-ins (linear, scaled_dot_product_attention, cat), the rest is Python overhead.

    .venv/bin/python benchmarks/profile_decode.py [--merge] [--rows 1] [--mixed] [--out benchmarks/results/profile.txt]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from server.engine import Engine
from server.row_step import RowStep, compiled_or_none
from server.settings import Settings
from server.types import AdapterLocation, GenerationParams, GenerationResult

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Does aspirin reduce fever in adults? Answer with the evidence."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1, help="rows decoding together (the same prompt)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base (auto-merge on)")
    parser.add_argument("--base", action="store_true", help="no adapter: the base generates")
    parser.add_argument("--mixed", action="store_true", help="every other row on the base, each row a request of its "
                                                             "own: a batch of mixed slots")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = Engine.from_settings(Settings(dtype="float32", num_threads=1, auto_merge=args.merge, merge_window=1))
    pubmedqa = AdapterLocation("pubmedqa", 1, ROOT / "server" / "shipped_adapters" / "pubmedqa")
    slot = None if args.base else engine.acquire(pubmedqa)
    params = GenerationParams(max_new_tokens=64, temperature=0, ignore_eos=True)
    prompts = [PROMPT] * args.rows
    report = io.StringIO()

    def say(line: str = "") -> None:
        print(line)
        report.write(line + "\n")

    def generate(params: GenerationParams) -> list[GenerationResult]:
        if not args.mixed:
            return engine.generate(prompts, slot, params)
        with ThreadPoolExecutor(len(prompts)) as pool:
            requests = [pool.submit(engine.generate, [prompt], None if i % 2 else slot, params)
                        for i, prompt in enumerate(prompts)]
            return [result for request in requests for result in request.result()]

    runner = engine.runner
    lean = runner.lean
    fused = lean.fused  # the step in C (server/fused.py), None where it does not apply
    # the compiled step of one or two rows (server/row_step.py), which serves where the C step does not
    compiled = runner.call(lambda: compiled_or_none(lambda: RowStep.for_model(engine.model, runner.context),
                                                    lambda row_step: row_step.warm_up()))
    paths = {"fused": (lean, fused, None), "compiled": (lean, None, compiled), "lean": (lean, None, None),
             "full": (None, None, None)}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    step_cpu: dict[str, list[float]] = {name: [] for name in paths}  # the worker thread's CPU time per step
    original = runner._step

    def timed(batch, into: list[float]):  # type: ignore[no-untyped-def]
        started = time.thread_time()
        try:
            return original(batch)
        finally:
            into.append(time.thread_time() - started)

    def use(name: str) -> None:
        runner.lean, lean.fused, lean.row_step = paths[name]

    for name in paths:  # warm-up: allocations, thread pool, a merge if asked
        use(name)
        generate(params)
    for round_ in range(6):  # AB BA AB ...: the machine's drift falls on both alike
        for name in list(paths)[:: 1 if round_ % 2 == 0 else -1]:
            use(name)
            runner._step = lambda batch, into=step_cpu[name]: timed(batch, into)  # type: ignore[method-assign]
            started = time.perf_counter()
            results = generate(params)
            rates[name].append(sum(r.tokens for r in results) / (time.perf_counter() - started))
            runner._step = original  # type: ignore[method-assign]
    mixed = ", every other on the base" if args.mixed else ""
    rows = f"{args.rows} row(s), {'base' if args.base else 'pubmedqa'}{mixed}"
    say(f"{rows}, merged={engine.merged_adapter}, float32, "
        f"{torch.get_num_threads()} thread, load average {os.getloadavg()[0]:.2f}")
    say("tokens/s of whole requests (64 new tokens, prefill included), 6 alternating rounds; the CPU time of a decode "
        "step (the worker thread's, which other processes' load inflates less than wall time):")
    for name, values in rates.items():
        cpu = statistics.median(step_cpu[name])
        say(f"  {name:5} {', '.join(f'{r:.1f}' for r in values)}  (median {statistics.median(values):.1f} tokens/s); "
            f"step CPU median {1000 * cpu:.1f} ms over {len(step_cpu[name])} steps")
    for name in ("fused", "compiled", "lean"):
        say(f"  {name} / full step CPU time: "
            f"{statistics.median(step_cpu[name]) / statistics.median(step_cpu['full']):.2f}")
    original = runner._step
    for name in paths:
        use(name)
        profiler = cProfile.Profile()
        steps: list[float] = []
        runner._step = lambda batch: _profiled(profiler, original, batch, steps)  # type: ignore[method-assign]
        generate(GenerationParams(max_new_tokens=33, temperature=0, ignore_eos=True))
        runner._step = original  # type: ignore[method-assign]
        steps.sort()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(18)
        say(f"\n== {name}: cProfile of 32 decode steps (worker thread; profiled step median "
            f"{1000 * steps[len(steps) // 2]:.1f} ms), by own time ==")
        say(stream.getvalue().split("Ordered by: internal time")[-1].rstrip())
    engine.close()
    if args.out is not None:
        args.out.write_text(report.getvalue())


def _profiled(profiler: cProfile.Profile, step, batch, steps: list[float]):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    profiler.enable()
    try:
        return step(batch)
    finally:
        profiler.disable()
        steps.append(time.perf_counter() - started)


if __name__ == "__main__":
    main()
