"""The `loraswap` command sets libgomp's waiting before torch loads it (server/openmp.py), keeping a user's own."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import os, server.__main__, torch; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"


def probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip()


def test_the_command_sets_bounded_active_waiting():
    assert probe() == "active 300000"


def test_a_users_own_setting_is_kept():
    assert probe(OMP_WAIT_POLICY="passive", GOMP_SPINCOUNT="1000") == "passive 1000"
