#!/usr/bin/env bash
# Every GPU check and benchmark in one run, sized for a short GPU lease (about 8 minutes on an
# H100/H200): the CUDA tests (layouts, FlexAttention, one sync per step, compiled layers, vLLM
# where installed), a profile of one step (kernel time vs wall time) and preftune vs TRL in bf16
# on SmolLM2-135M's and Llama-3.2-1B's shapes, long and short prompts, 2 repeats.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine, from the repo root
#   DEVICE=cpu CASES=tiny-long,tiny-short STEPS=3 REPEATS=1 bash benchmarks/gpu_check.sh  # dry run
#
# The GPU machine has torch, transformers, accelerate and peft but no network: put the trl
# wheel (and its pure-Python dependencies missing there) under wheels/ and SmolLM2's
# config/tokenizer files under smollm2-arch/ (see benchmarks/README.md); both travel with the
# working tree. Results go to $OUT (default benchmarks/results/gpu-DATE/).
set -u
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
CASES=${CASES:-smollm2-long,smollm2-short,llama1b-long,llama1b-short}
STEPS=${STEPS:-12}
REPEATS=${REPEATS:-2}
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
MODEL_ARGS=()
[ -d smollm2-arch ] && MODEL_ARGS=(--default-model smollm2-arch)
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}

if ls wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --find-links wheels wheels/*.whl 2>&1 | tail -2
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  $PY -c "import trl; print('trl', trl.__version__)" 2>&1 | tail -1; } | tee "$OUT/machine.txt"

echo "== CUDA tests" | tee "$OUT/tests.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_vllm.py 2>&1 \
  | tail -15 | tee -a "$OUT/tests.txt"

echo "== one profiled step" | tee "$OUT/profile.md"
for tool in auto compile; do
  timeout 150 $PY benchmarks/profile_step.py --device "$DEVICE" --dtype "$DTYPE" \
    --cases "${CASES%%,*}" --tool "$tool" "${MODEL_ARGS[@]}" --results "$OUT/profile.md" \
    2>&1 | tail -4
done

echo "== preftune vs TRL"
VARLEN_TOOL=$([ "$DEVICE" = cuda ] && echo ",preftune-varlen" || true)  # CUDA only
timeout 420 $PY benchmarks/dpo_vs_trl.py --device "$DEVICE" --dtype "$DTYPE" --cases "$CASES" \
  --tools "trl,trl-precompute-nogc,preftune,preftune-compile${VARLEN_TOOL}" --steps "$STEPS" \
  --tiny-steps "$STEPS" --repeats "$REPEATS" "${MODEL_ARGS[@]}" \
  --results "$OUT/dpo_vs_trl.md" 2>&1 | tail -40
echo "results in $OUT"
