"""Every command block of README.md and of docs/*.md, run as written against a fresh server on the embedded base, so
that the documentation cannot drift from the code.

Blocks run in document order (the README first, then docs/ in DOCS order) in one shell each, as a reader would run
them from the repository root after `source .venv/bin/activate`, in a fresh clone of this checkout (its tracked
files, nothing else: no `../shared` beside it, no adapter store in it), with the server run from that clone on its
default settings (its writable store in a temporary per-user data folder, the shipped adapters from the clone's
package). Three things differ from a reader's machine, all set here: the server listens on a free port
(`127.0.0.1:8000` in a block becomes that port); every `curl` fails on an HTTP error status (a `.curlrc` with
`fail-with-body`), so an example answered with 4xx or 5xx fails its block instead of printing an error body; and torch
uses one thread (OMP_NUM_THREADS=1): on a 2-core machine shared with other processes, torch's default of two threads
made one 8-token answer take 33-42 s instead of 3-5 s. A block that cannot run here has an HTML comment
`<!-- readme-test: skip: REASON -->` right above it and is reported skipped with that reason: only blocks that serve
in the foreground or train for long (or need Docker) may be skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import fresh_clone, free_port, stop_process, wait_for_health

REPO = Path(__file__).resolve().parent.parent
DOCS = ["api.md", "adapters.md", "operations.md", "settings.md", "bases.md", "ray.md", "benchmarks.md", "design.md"]
README_PORT = "127.0.0.1:8000"
ADMIN_TOKEN = "my-token"  # the token the examples send
SKIP_MARKER = re.compile(r"<!-- readme-test: skip: (?P<reason>.+) -->")
FENCE = re.compile(r"```(?P<language>\S*)\s*$")
RUNNABLE = {"bash", "python"}
CHECKED = {"json", "yaml"}  # not commands: json lines must parse, a yaml block must be a deployable config
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}-{self.language}"


def readme_blocks(text: str, file: str = "README.md") -> list[Block]:
    """The fenced blocks of a Markdown text, with the skip reason of a marker on the line right above a fence."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].startswith("```")), None)
        assert end is not None, f"{file} line {index + 1}: a code block is never closed"
        marker = SKIP_MARKER.fullmatch(lines[index - 1].strip()) if index else None
        blocks.append(Block(file, index + 1, opening["language"], "\n".join(lines[index + 1:end]) + "\n",
                            marker["reason"] if marker else None))
        index = end + 1
    return blocks


FILES = ["README.md", *(f"docs/{name}" for name in DOCS)]
BLOCKS = [block for file in FILES for block in readme_blocks((REPO / file).read_text(), file)]


def test_the_block_reader_sees_languages_and_markers():
    text = "intro\n```bash\necho 1\n```\n<!-- readme-test: skip: too slow -->\n```python\nprint(2)\n```\n"
    assert readme_blocks(text, "x.md") == [Block("x.md", 2, "bash", "echo 1\n", None),
                                           Block("x.md", 6, "python", "print(2)\n", "too slow")]


def test_every_block_is_run_checked_or_skipped_with_a_reason():
    assert sorted(p.name for p in (REPO / "docs").glob("*.md")) == sorted(DOCS), "a docs page this test does not run"
    unknown = [f"{b.file} line {b.line}: {b.language or '(no language)'}" for b in BLOCKS
               if b.language not in RUNNABLE | CHECKED]
    assert not unknown, f"blocks this test does not know how to run or check: {unknown}"
    assert sum(b.file == "README.md" and b.language in RUNNABLE and b.skip_reason is None for b in BLOCKS) >= 6
    outside = [b.id for b in BLOCKS if "../shared" in b.code]
    assert not outside, f"blocks that read data outside the repository: {outside}"


def test_the_readme_is_a_front_page():
    assert len((REPO / "README.md").read_bytes()) < 25_000


@dataclass
class Reader:
    """Where the blocks run: a working directory shaped like the repository, and a server on the embedded base."""

    workdir: Path
    url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Reader:
    root = tmp_path_factory.mktemp("readme")
    workdir = fresh_clone(root / "loraswap")
    (workdir / ".venv").symlink_to(Path(sys.prefix))  # the venv running this suite, as scripts/dev.sh made it
    curl_home = root / "curl-home"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text("fail-with-body\nshow-error\n")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
    env.update(HF_HUB_OFFLINE="1", CURL_HOME=str(curl_home), OMP_NUM_THREADS="1", XDG_DATA_HOME=str(root / "data"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")])))
    if cache := os.environ.get("LORASWAP_CACHE_DIR"):  # where the suite keeps the converted base
        env["LORASWAP_CACHE_DIR"] = cache
    server_env = {**env, "LORASWAP_PORT": str(port), "LORASWAP_ADMIN_TOKEN": ADMIN_TOKEN}
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([str(Path(sys.prefix) / "bin" / "loraswap")], cwd=workdir, env=server_env,
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(server, url, log_path, 300)  # a first start converts the embedded base
        yield Reader(workdir, url, env)
    finally:
        stop_process(server, 20)


def _run(block: Block, reader: Reader) -> subprocess.CompletedProcess:
    code = block.code.replace(README_PORT, reader.url.removeprefix("http://"))
    if block.language == "python":
        command = [str(Path(sys.prefix) / "bin" / "python"), "-c", code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", f"source .venv/bin/activate\n{code}"]
    return subprocess.run(command, cwd=reader.workdir, env=reader.env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


@pytest.mark.real_base
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language in RUNNABLE], ids=lambda b: b.id)
def test_readme_command_block_runs(block: Block, reader: Reader):
    if block.skip_reason:
        pytest.skip(f"{block.file} line {block.line}: {block.skip_reason}")
    result = _run(block, reader)
    assert result.returncode == 0, (
        f"{block.file} line {block.line} failed with exit code {result.returncode}\n--- block:\n{block.code}"
        f"--- stdout:\n{result.stdout[-4000:]}\n--- stderr:\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "json"], ids=lambda b: b.id)
def test_readme_json_examples_parse(block: Block):
    for line in block.code.splitlines():
        assert isinstance(json.loads(line), dict), line


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "yaml"], ids=lambda b: b.id)
def test_readme_yaml_examples_deploy_our_app(block: Block):
    """A Ray Serve config (KubeRay's serveConfigV2) names our application builder with valid settings."""
    import importlib

    import yaml

    from server.settings import Settings

    config = yaml.safe_load(block.code)
    serve_config = yaml.safe_load(config["spec"]["serveConfigV2"])
    [application] = serve_config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    Settings(**application["args"])  # raises on an unknown or invalid setting
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"ray[serve]=={config['spec']['rayClusterConfig']['rayVersion']}" in extras["ray"]  # the image's Ray
