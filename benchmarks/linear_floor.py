"""The floor of a single-stream decode step: the base's 211 projections for one token (30 layers x q, k, v, o, gate,
up, down, and the 49152 x 576 LM head) as bare matmuls, float32 against bfloat16 and int8 weights (weight-only, bf16
activations: torch's `_weight_int8pack_mm`), one thread, the worker-thread CPU time per token (other processes' load
inflates it less than wall time), alternating rounds. What no decode path in eager torch can go below.

    .venv/bin/python benchmarks/linear_floor.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) * 0.02 for out, inp in SHAPES]
    inputs = {dtype: {n: torch.randn(1, n, dtype=dtype) for n in (576, 1536)}
              for dtype in (torch.float32, torch.bfloat16)}
    int8 = []
    for w in weights:
        scale = w.abs().amax(1) / 127
        int8.append(((w / scale[:, None]).round().to(torch.int8), scale.bfloat16()))
    bf16 = [w.bfloat16() for w in weights]
    runs = {
        "float32": lambda: [torch.nn.functional.linear(inputs[torch.float32][w.shape[1]], w) for w in weights],
        "bfloat16": lambda: [torch.nn.functional.linear(inputs[torch.bfloat16][w.shape[1]], w) for w in bf16],
        "int8 (bf16 activations)": lambda: [torch.ops.aten._weight_int8pack_mm(inputs[torch.bfloat16][q.shape[1]], q, s)
                                            for q, s in int8],
    }
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for round_ in range(8):
        for name in list(runs)[:: 1 if round_ % 2 == 0 else -1]:
            started = time.thread_time()
            for _ in range(3):
                runs[name]()
            cpu[name].append((time.thread_time() - started) / 3)
    print(f"{torch.backends.cpu.get_cpu_capability()}, 1 thread, load average {os.getloadavg()[0]:.1f}")
    for name, values in cpu.items():
        print(f"{name:24} {1000 * statistics.median(values):6.1f} ms CPU per token (median of 8 rounds)")


if __name__ == "__main__":
    main()
