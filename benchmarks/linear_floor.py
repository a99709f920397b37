"""The matmuls of a decode step alone: the base's 211 projections (30 layers x q, k, v, o, gate, up, down, and the
49152 x 576 LM head) for 1 to 64 rows, by every kernel loraswap could use, one thread, alternating rounds, the
worker's CPU time per step (other processes' load inflates it less than wall time):
- float32 `F.linear` (MKL, the weights as stored), the eager path before `packed_weights`;
- float32 oneDNN on weights reordered once into its blocked layout (the path before the panel kernel);
- float32 panels of 32 outputs, our kernel (server/panels.py), what inference forwards use;
- float32 reductions `(weight * x).sum(-1)` compiled by inductor (server/row_step.py; single rows), also over
  bfloat16 weights widened to float32 as they stream (the row step with `dtype=bfloat16`);
- bfloat16 `F.linear`, and int8 weight-only with bf16 activations (`_weight_int8pack_mm`) for one row;
- the floor: reading every weight once (`weight.sum()`), what memory bandwidth allows.

    .venv/bin/python benchmarks/linear_floor.py [--rows 1 2 4 8 16 64] [--out benchmarks/results/linear_floor.txt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from server import panels

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30 + [(49152, 576)]


def reductions(weights: list[torch.Tensor]) -> Callable[[dict[int, torch.Tensor]], list[torch.Tensor]]:
    """One compiled graph over all weights: each product a reduction over the weight's rows (as RowStep's)."""

    def run(x: dict[int, torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(w.float() * x[w.shape[1]]).sum(-1) for w in weights]

    compiled = torch.compile(run, fullgraph=True)
    return lambda x: compiled(x, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) * 0.02 for out, inp in SHAPES]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights]
    packs = [panels.pack(w) for w in weights]
    bf16 = [w.bfloat16() for w in weights]
    int8 = []
    for w in weights:
        scale = w.abs().amax(1) / 127
        int8.append(((w / scale[:, None]).round().to(torch.int8), scale.bfloat16()))
    reduce_all, reduce_bf16 = reductions(weights), reductions(bf16)
    linear = torch.nn.functional.linear
    runs: dict[str, Callable[[], object]] = {"read every weight once": lambda: [w.sum() for w in weights]}
    for rows in args.rows:
        x = {n: torch.randn(rows, n) for n in (576, 1536)}
        xb = {n: t.bfloat16() for n, t in x.items()}
        runs[f"{rows:2} rows float32 F.linear"] = lambda x=x: [linear(x[w.shape[1]], w) for w in weights]
        runs[f"{rows:2} rows float32 oneDNN packed"] = lambda x=x: [
            torch.ops.mkldnn._linear_pointwise(x[w.shape[1]], p, None, "none", [], "") for w, p in zip(weights, onednn)]
        if packs[0] is not None:
            runs[f"{rows:2} rows float32 panels"] = lambda x=x: [
                panels.linear(x[w.shape[1]], p, w.shape[0], None) for w, p in zip(weights, packs)]
        if rows == 1:
            runs[f"{rows:2} rows float32 compiled reductions"] = lambda x=x: reduce_all({n: t[0] for n, t in x.items()})
            runs[f"{rows:2} rows bf16 weights, compiled reductions"] = lambda x=x: reduce_bf16(
                {n: t[0] for n, t in x.items()})
            runs[f"{rows:2} rows bfloat16 F.linear"] = lambda xb=xb: [linear(xb[w.shape[1]], w) for w in bf16]
            runs[f"{rows:2} rows int8 weights, bf16 activations"] = lambda xb=xb: [
                torch.ops.aten._weight_int8pack_mm(xb[q.shape[1]], q, s) for q, s in int8]
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up (and the compile)
        run()
    for round_ in range(args.rounds):
        for name in list(runs)[:: 1 if round_ % 2 == 0 else -1]:
            started = time.thread_time()
            runs[name]()
            cpu[name].append(time.thread_time() - started)
    lines = [f"{torch.backends.cpu.get_cpu_capability()}, 1 thread, load average {os.getloadavg()[0]:.1f}; "
             f"CPU ms per step (median of {args.rounds} alternating rounds)"]
    for name, values in cpu.items():
        lines.append(f"{name:46} {1000 * statistics.median(values):7.1f}")
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
