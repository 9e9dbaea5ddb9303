#!/usr/bin/env bash
# One call on a borrowed GPU machine (bare image: its own torch/triton/cupy, no network, nothing installed):
#   bash bench/gpu_session.sh [OUT_DIR] [TEST_SECONDS] [CHECK_SECONDS] [PROFILE_SECONDS]
# 1. the GPU-relevant test files, compiled (Triton kernels on CUDA tensors, the CUDA backend through CuPy, the user
#    paths of tests/test_gpu_paths.py), junit XML + log;
# 2. bench/gpu_check.py (correctness table in bf16/fp16, then Llama-3-8B prefill shapes), CSV + log;
# 3. bench/gpu_profile_estimate.py (where the default pattern's estimate spends its time), log.
# Each step has its own time limit so one hang cannot eat the other's time; the exit status is the worst of both.
set -u
out=${1:-${OUT:-bench/results}}
test_s=${2:-170}
check_s=${3:-200}
profile_s=${4:-60}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
py=${PYTHON:-python3}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  "$py" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "cuda", torch.version.cuda)
try:
    import cupy; print("cupy", cupy.__version__)
except Exception as e: print("cupy absent:", e)
try:
    import transformers; print("transformers", transformers.__version__)
except Exception as e: print("transformers absent:", e)'
} 2>&1 | tee "$out/gpu-env.txt"

# test_hf_compile runs on the CPU: there it checks the custom op under the machine's (older) torch.compile.
# GPU_TESTS / GPU_CHECK_ARGS (environment) replace the test files / add gpu_check arguments for a shorter call.
if [ -n "${GPU_TESTS:-}" ]; then
  read -r -a tests <<< "$GPU_TESTS"
else
  tests=(tests/test_gpu_paths.py tests/test_triton_backend.py tests/test_triton_scores.py tests/test_cuda_gpu.py
         tests/test_softcap.py tests/integrations/test_engines_triton.py tests/integrations/test_hf_compile.py)
fi
read -r -a check_args <<< "${GPU_CHECK_ARGS:-}"
workers=$("$py" -c 'import importlib.util as u; print(6 if u.find_spec("xdist") else 0)')
xdist=(); [ "$workers" -gt 0 ] && xdist=(-n "$workers")
timeout "$test_s" "$py" -m pytest -q -rfEs -p no:cacheprovider "${xdist[@]}" --junitxml="$out/gpu-tests.xml" \
  "${tests[@]}" > "$out/gpu-tests.log" 2>&1
test_rc=$?
tail -n 60 "$out/gpu-tests.log"
echo "# tests rc=$test_rc"

timeout $((check_s + 40)) "$py" bench/gpu_check.py --budget "$check_s" --out "$out" "${check_args[@]}" > "$out/gpu-check.log" 2>&1
check_rc=$?
tail -n 80 "$out/gpu-check.log"
echo "# gpu_check rc=$check_rc"

timeout "$profile_s" "$py" bench/gpu_profile_estimate.py --lengths 32768 131072 > "$out/gpu-profile.log" 2>&1
echo "# profile rc=$? (log: gpu-profile.log)"
grep -E "^## " "$out/gpu-profile.log"
exit $((test_rc > check_rc ? test_rc : check_rc))
