"""How torch's OpenMP runtime (libgomp) waits between parallel regions; set before torch is imported.

The engine's worker thread runs its forwards with an OpenMP team of its own beside the main thread's, so the process
holds more OpenMP threads than there are cores, and libgomp then lets idle helpers spin only ~1000 times before they
sleep: every one of a decode step's ~240 parallel regions (a projection's matmul, a layer's attention) paid a
wake-up, and a second thread made the step slower, not faster (embedded base, float32, 2-core AMD EPYC: one row's C
step 27.6 ms with 2 threads against 20.5 with one). With waiting active but bounded by GOMP_SPINCOUNT=300000 (the
spinning libgomp itself gives where it has no more threads than cores; then they sleep, so an idle server does not
keep its cores busy): 16.5 against 21.0 ms (benchmarks/threads.py, benchmarks/results/threads-20261207.txt; for 16 rows
the two settings were within noise). A value the user set is kept.
"""

from __future__ import annotations

import os

WAITING = {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "300000"}


def configure() -> None:
    """Set libgomp's waiting where the environment does not already: effective only before torch is imported."""
    for name, value in WAITING.items():
        os.environ.setdefault(name, value)
