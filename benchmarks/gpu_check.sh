#!/usr/bin/env bash
# Every GPU check and benchmark, sized for a short GPU lease: BUDGET seconds in all (default
# 540), most important first, each part cut to what is left. PARTS (default all five) names
# them: tests (layouts, FlexAttention, varlen, attention kernels, one sync per step, compiled
# layers, --plan against the CUDA peak, lean layers, vLLM where installed), overhead (checkpointing's host time on a thin
# model: torch's checkpoint against recompute), profile (one eager step: kernel time vs wall
# time, top operators), bench (preftune vs TRL in bf16 on SmolLM2-135M's and Llama-3.2-1B's
# shapes, long and short prompts, 2 repeats, TRL's default once) and compile (the compiled
# step's profile).
# All of it is about 14 minutes on an H200, in two calls split by PARTS and CASES:
#
#   PARTS=tests,overhead,profile,bench CASES=llama1b-long,smollm2-long bash benchmarks/gpu_check.sh
#   PARTS=bench,compile CASES=smollm2-short,llama1b-short bash benchmarks/gpu_check.sh
#   DEVICE=cpu DTYPE=float32 CASES=tiny-long,tiny-short PROFILED=tiny-long STEPS=3 \
#     bash benchmarks/gpu_check.sh                        # its dry run on CPU
#
# The GPU machine has torch, transformers, accelerate and peft but no network: put the wheels of
# trl and of what it and preftune need that is missing there under wheels/, and SmolLM2's
# config/tokenizer files under smollm2-arch/ (see benchmarks/README.md); carry both. Results go
# to $OUT (default benchmarks/results/gpu-DATE/); every part writes as it goes, so a run cut
# short keeps what it did.
set -u
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
CASES=${CASES:-llama1b-long,smollm2-long,smollm2-short,llama1b-short}
TOOLS=${TOOLS:-trl,trl-precompute-nogc,preftune,preftune-gc}
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-2}
ONCE=${ONCE-trl}            # tools run in the first repeat only (TRL's default: its memory)
once_run=""                 # ... of those among TOOLS (a run without trl keeps every repeat)
for tool in ${ONCE//,/ }; do [[ ",$TOOLS," == *",$tool,"* ]] && once_run+="${once_run:+,}$tool"; done
PARTS=${PARTS:-tests,overhead,profile,bench,compile}
BUDGET=${BUDGET:-540}
TESTS=${TESTS:-}            # a pytest -k expression; empty: every CUDA test
TEST_S=${TEST_S:-110}       # at most this long for the tests,
PROFILE_S=${PROFILE_S:-50}  # the eager step's profile,
COMPILE_S=${COMPILE_S:-45}  # and what the benchmark leaves for the compiled step's profile
PROFILED=${PROFILED:-smollm2-long}  # the case whose step is profiled
PROFILE_TOOLS=${PROFILE_TOOLS:-auto}  # its eager variants (auto, padded, gc), each PROFILE_S
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
MODEL_ARGS=()
[ -d smollm2-arch ] && MODEL_ARGS=(--default-model smollm2-arch)
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
END=$((SECONDS + BUDGET))
left() { echo $((END - SECONDS - ${1:-0})); }  # seconds left, less a reserve
part() { [[ ",$PARTS," == *",$1,"* ]]; }
upto() { local t; t=$(left); echo $(( t < $1 ? (t > 10 ? t : 10) : $1 )); }  # min(cap, left)

if ls wheels/*.whl >/dev/null 2>&1; then  # into a folder of its own, ahead on the path
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/wheel-site wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=$PYTHONPATH:/tmp/wheel-site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  nproc
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
  $PY -c "import trl, datasets, pydantic; print('trl', trl.__version__, 'datasets', datasets.__version__, 'pydantic', pydantic.__version__)" 2>&1 | tail -1
  $PY -c "import preftune.train.loop; print('preftune imports')" 2>&1 | tail -1; } | tee "$OUT/machine.txt"

if part tests; then  # one line per test as it ends, so a run cut short still names each result
  echo "== CUDA tests ($(left) s left)" > "$OUT/tests.txt"
  # KILL at the limit: a SIGTERM would stop the running test's training like a preemption,
  # and that test would read FAILED
  timeout -s KILL "$(upto "$TEST_S")" $PY -m pytest -v --tb=line -p no:cacheprovider \
    -rfE ${TESTS:+-k "$TESTS"} tests/test_cuda.py tests/test_lean.py tests/test_vllm.py \
    tests/test_qlora.py tests/test_optimizers.py 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|SKIPPED|^/|Error|passed|failed" >> "$OUT/tests.txt"
  [ "${PIPESTATUS[0]}" = 137 ] && echo "== cut off at TEST_S: the tests after the last one" \
    "named did not run (none of them failed)" >> "$OUT/tests.txt"
  grep -vE "PASSED" "$OUT/tests.txt"; echo "$(grep -c PASSED "$OUT/tests.txt") passed"
fi

if part overhead; then  # checkpointing's host time on a thin model (seconds, eager)
  echo "== checkpointing overhead ($(left) s left)"
  timeout "$(upto 60)" $PY benchmarks/checkpointing_overhead.py --device "$DEVICE" --steps 20 \
    --results "$OUT/checkpointing_overhead.md" 2>&1 | tail -8
fi

if part profile; then
  for tool in ${PROFILE_TOOLS//,/ }; do
    echo "== one profiled step, eager, $tool ($(left) s left)"
    timeout "$(upto "$PROFILE_S")" $PY benchmarks/profile_step.py --device "$DEVICE" \
      --dtype "$DTYPE" --cases "$PROFILED" --tool "$tool" --top 15 "${MODEL_ARGS[@]}" \
      --results "$OUT/profile.md" 2>&1 | tail -6
  done
fi

if part bench; then
  echo "== preftune vs TRL ($(left) s left)"
  part compile && reserve=$COMPILE_S || reserve=0
  timeout "$(left "$reserve")" $PY benchmarks/dpo_vs_trl.py --device "$DEVICE" --dtype "$DTYPE" \
    --cases "$CASES" --tools "$TOOLS" --steps "$STEPS" --tiny-steps "$STEPS" --repeats "$REPEATS" \
    --once "$once_run" "${MODEL_ARGS[@]}" --results "$OUT/dpo_vs_trl.md" > "$OUT/bench.log" 2>&1
  tail -60 "$OUT/bench.log"
fi

if part compile && [ "$(left 5)" -gt 20 ]; then
  echo "== one profiled step, compiled ($(left) s left)"
  timeout "$(left 5)" $PY benchmarks/profile_step.py --device "$DEVICE" --dtype "$DTYPE" \
    --cases "$PROFILED" --tool compile --steps 6 "${MODEL_ARGS[@]}" --results "$OUT/profile.md" \
    2>&1 | tail -6
fi
echo "results in $OUT ($(left) s left)"
