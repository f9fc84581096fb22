#!/usr/bin/env bash
# The GPU measurements still missing from BENCHMARKS.md (issues 7 and 19), in one run that
# fits a short lease on one GPU (about 8 minutes on an H100/H200; each step has its own
# time limit, so one that hangs cannot eat the others):
#
#     OUT=/some/dir bash tools/gpu_checks.sh          # results: $OUT/*.log, $OUT/summary.txt
#
# It needs the repository and a Python with CUDA torch and transformers (an NGC PyTorch
# image has both); nothing is installed or downloaded. The steps:
#   env       GPU, driver, torch, transformers, flash-attn / transformer-engine / apex present?
#   tests     the tests that skip without CUDA (attention backends against math, bf16; varlen)
#   eager     1b preset, bf16, one GPU: tokens/s, TFLOP/s, MFU; ours vs LlamaForCausalLM, and
#             the matmul share of both steps from the CUDA kernels (--profile-ops)
#   compile   the same with --compile (both sides compiled, and against transformers eager)
#   blocks    per-block forward + backward times of the 1b preset (--measure-block-costs),
#             for --pipeline-balance-costs and tools/plan.py
# Overrides for a smoke run without a GPU: CHECK_PRESET=tiny CHECK_FLAGS="--device cpu"
# CHECK_SEQ=128 CHECK_MICRO=1 CHECK_ITERS="1 2" CHECK_TESTS=0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PRESET=${CHECK_PRESET:-1b}
FLAGS=${CHECK_FLAGS:---bf16}
SEQ=${CHECK_SEQ:-1024}
MICRO=${CHECK_MICRO:-4}
read -r WARMUP TIMED <<<"${CHECK_ITERS:-3 10}"
COMMON=(--preset "$PRESET" $FLAGS --micro-batch-size "$MICRO" --global-batch-size "$MICRO"
        --seq-length "$SEQ" --images-per-sample 2 --warmup-iters "$WARMUP" --timed-iters "$TIMED")
failed=()

step() {  # step NAME SECONDS COMMAND...: output to $OUT/NAME.log, a failure noted, not fatal
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >"$OUT/$name.log"
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
  tail -n 25 "$OUT/$name.log"
}

step env 60 bash -c "nvidia-smi || true; $PY - <<'EOF'
import importlib.util, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
for name in ('transformers', 'flash_attn', 'transformer_engine', 'apex', 'megatron.core'):
    print(name, 'present' if importlib.util.find_spec(name.split('.')[0]) else 'missing')
EOF"
if [ "${CHECK_TESTS:-1}" = 1 ]; then
  step tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_attention.py tests/test_packing.py
fi
step eager 240 "$PY" tools/benchmark_throughput.py "${COMMON[@]}" --compare hf --profile-ops --no-memory
step compile 300 "$PY" tools/benchmark_throughput.py "${COMMON[@]}" --compare hf --profile-ops --no-memory --compile
step blocks 120 "$PY" tools/benchmark_throughput.py "${COMMON[@]}" --measure-block-costs "$OUT/block_costs.json"

{
  date -u +"%Y-%m-%d %H:%M UTC"
  grep -h "^BENCHMARK_JSON\|^BLOCK_COSTS_JSON\|passed\|failed" "$OUT"/*.log
  [ ${#failed[@]} -eq 0 ] && echo "all steps ran" || printf 'FAILED: %s\n' "${failed[@]}"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
