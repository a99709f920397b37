"""Schemathesis over every operation of /openapi.json, with the admin token, against a real server on the tiny base:
no 5xx, responses as the schema says. The same command as the README's, with a bounded number of examples."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ADMIN_TOKEN, server_process

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"


@pytest.fixture
def fuzzed_server(tiny_base, adapter_store, tmp_path):
    store = tmp_path / "store"
    for name in ("gen-a", "sentiment"):
        shutil.copytree(adapter_store / name, store / name)
    log_path = tmp_path / "server.log"
    # small bounds keep each generated request cheap: fuzzed bodies ask for many tokens and many inputs
    flags = ("--num-threads", "1", "--max-new-tokens-limit", "8", "--max-inputs", "4",
             "--cache-dir", str(tmp_path / "cache"))
    with server_process(tiny_base, store, log_path, *flags) as (url, _):
        yield url, log_path


def test_schemathesis_finds_no_server_error_and_no_schema_violation(fuzzed_server, tmp_path):
    url, log_path = fuzzed_server
    # path parameters that exist, so that the adapter routes are reached too (DELETE included: a scratch store)
    (tmp_path / "schemathesis.toml").write_text('[parameters]\n"path.name" = "gen-a"\n')
    command = [str(SCHEMATHESIS), "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
               "--checks", CHECKS, "--max-examples", "20", "--seed", "1", "--generation-database", "none",
               "--workers", "1", "--request-timeout", "30"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env={**os.environ, "NO_COLOR": "1"})
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:] + log_path.read_text()[-3000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert summary and summary[1] == summary[2] and int(summary[1]) > 500, run.stdout[-3000:]
    selected, total, tested = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", run.stdout).groups()
    assert selected == total == tested, run.stdout[-3000:]  # every operation of the schema
