#!/usr/bin/env bash
# The oldest versions pyproject.toml accepts, in .venv-oldest, with the tests of the core paths
# (layouts, checkpointing, compile, the loop, reward models, generation, LoRA variants, other
# architectures, online rounds, DDP and FSDP2 on CPU) and of the extras at their floors:
# DeepSpeed (ZeRO-2/3 on CPU), diffusers (every denoiser test but the diffusion demo: 2 to 4
# minutes alone), datasets, the three trackers, Pillow (vision-language models) and jsonschema.
# vLLM is not installed: it needs CUDA. Run it when a floor in pyproject.toml moves;
# tests/test_versions.py keeps the pins below equal to those floors. Extra pytest arguments are
# passed on (e.g. -x, -k ...). 7 to 12 minutes on 2 cores, plus the install (two runs on
# 2026-12-06: 763 tests, then 767 with tests/test_gguf.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv-oldest/bin/python ] || "$PYTHON" -m venv .venv-oldest
.venv-oldest/bin/python -m pip install --quiet \
  "torch==2.9.0" "transformers==5.18.0" "accelerate==1.14.0" "peft==0.20.0" \
  "safetensors==0.8.0" "gguf==0.11.0" "pydantic==2.11.0" "pyyaml==6.0.1" "pyarrow==14.0.2" \
  "matplotlib==3.7.5" "numpy<2" "bitsandbytes==0.46.1" "pytest>=8" "hypothesis>=6" \
  "deepspeed==0.16.5" "diffusers==0.36.0" "datasets==2.18.0" "tensorboard==2.10.0" \
  "mlflow-skinny==2.10.0" "jsonschema==4.0.1" "wandb==0.16.0" "pillow==10.0.0"
.venv-oldest/bin/python -m pip install --quiet --no-deps -e .
.venv-oldest/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_forward.py tests/test_layouts.py tests/test_train_loop.py tests/test_tokenize.py \
  tests/test_checkpointing.py tests/test_cli.py tests/test_config.py tests/test_reward_model.py \
  tests/test_generation.py tests/test_lora_variants.py tests/test_architectures.py \
  tests/test_objectives.py tests/test_online_loop.py tests/test_compile.py \
  tests/test_host_reads.py tests/test_distributed.py tests/test_fsdp.py \
  tests/test_deepspeed.py tests/test_diffusion_*.py tests/test_data_sources.py \
  tests/test_data_formats.py tests/test_tracking.py tests/test_config_schema.py \
  tests/test_vision.py tests/test_vision_qwen.py tests/test_vision_runs.py \
  tests/test_image_transforms.py tests/test_demo_vision.py tests/test_objectives_vision.py \
  tests/test_online_vision.py tests/test_reward_vision.py tests/test_synthetic_vision.py \
  tests/test_report.py tests/test_gguf.py \
  --deselect tests/test_diffusion_train.py::test_quick_demo_numbers_are_the_checkers "$@"
