#!/usr/bin/env bash
# The oldest versions pyproject.toml accepts, in .venv-oldest, with the tests of the core paths
# (layouts, checkpointing, compile, the loop, reward models, generation, LoRA variants, other
# architectures, online rounds, DDP and FSDP2 on CPU). Run it when a floor in pyproject.toml
# moves; tests/test_versions.py keeps the pins below equal to those floors. Extra pytest
# arguments are passed on (e.g. -x, -k ...). About 20 minutes on 2 cores, plus the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv-oldest/bin/python ] || "$PYTHON" -m venv .venv-oldest
.venv-oldest/bin/python -m pip install --quiet \
  "torch==2.9.0" "transformers==5.13.1" "accelerate==1.14.0" "peft==0.19.1" \
  "safetensors==0.8.0" "gguf==0.10.0" "pydantic==2.6.4" "pyyaml==6.0.1" "pyarrow==14.0.2" \
  "matplotlib==3.7.5" "numpy<2" "bitsandbytes==0.46.1" "pytest>=8" "hypothesis>=6"
.venv-oldest/bin/python -m pip install --quiet --no-deps -e .
.venv-oldest/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_forward.py tests/test_layouts.py tests/test_train_loop.py tests/test_tokenize.py \
  tests/test_checkpointing.py tests/test_cli.py tests/test_config.py tests/test_reward_model.py \
  tests/test_generation.py tests/test_lora_variants.py tests/test_architectures.py \
  tests/test_objectives.py tests/test_online_loop.py tests/test_compile.py \
  tests/test_host_reads.py tests/test_distributed.py tests/test_fsdp.py "$@"
