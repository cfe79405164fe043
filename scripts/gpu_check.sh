#!/usr/bin/env bash
# The GPU check: build the extensions on a CUDA machine, run the GPU tests, then the GPU benchmarks, each
# stage under a time limit, within a total budget. Logs, JUnit XML and benchmark CSVs go to $OUT
# (default build/gpu_check). Uses the machine's python3 and torch as they are (no virtual environment:
# a GPU machine's image usually holds torch, triton and pytest), with this checkout on PYTHONPATH.
#
#   bash scripts/gpu_check.sh [STAGE ...]   stages: env build tests bench profile suite (default: all); one test or
#                                            benchmark stage alone by its name (tests_cuda, bench_prompt, ...)
#   GPU_CHECK_BUDGET=420                     total seconds; a stage gets what is left, or is skipped
#   GPU_CHECK_TRITON_TESTS / GPU_CHECK_CUDA_TESTS   pytest arguments replacing the default test selection
#   GPU_CHECK_TRITON_LIMIT                  seconds for the Triton tests (default 200; they run while the build does)
#   BMT_FAST_COMMIT                          the commit the benchmark rows name (a copied tree's .git may lag)
#   GPU_CHECK_BENCH_ARGS                     extra arguments of every benchmark (e.g. --no-check)
#
# The benchmark rows land in $OUT/<op>.csv; copy them into benchmarks/results/<device>.csv to commit them.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/build/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/build/triton_cache}
JOBS=$(nproc)
STAGES=${*:-env build tests bench profile suite}
T0=$SECONDS

left() { echo $((BUDGET - (SECONDS - T0))); }
wants() {  # wants STAGE [GROUP]: the stage is asked for by its name or by its group's
  [[ " $STAGES " == *" $1 "* ]] || { [ -n "${2:-}" ] && [[ " $STAGES " == *" $2 "* ]]; }
}
# run NAME LIMIT CMD...: CMD under min(LIMIT, time left), output to $OUT/NAME.log; skipped under 20 s left.
run() {
  local name=$1 limit=$2
  shift 2
  local t
  t=$(left)
  ((t < limit)) && limit=$t
  if ((limit < 20)); then
    echo "== [$((SECONDS - T0)) s] SKIP $name: $(left) s of the budget left" | tee -a "$OUT/summary.log"
    return 0
  fi
  echo "== [$((SECONDS - T0)) s] $name (limit $limit s)"
  local start=$SECONDS rc
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== [$((SECONDS - T0)) s] $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
  tail -n 4 "$OUT/$name.log"
  return 0
}

if wants env; then
  {
    nvidia-smi
    nvcc --version
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  } >"$OUT/env.log" 2>&1
  tail -n 4 "$OUT/env.log"
fi

BUILD_PID=
if wants build; then
  echo "== [$((SECONDS - T0)) s] build (in the background)"
  (
    start=$SECONDS
    BMT_FAST_BUILD_CUDA=1 BMT_FAST_CUDA_ARCH_LIST=${BMT_FAST_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$JOBS \
      timeout -k 10 "$(left)" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
    echo "== build: rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
  ) &
  BUILD_PID=$!
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n "$((JOBS < 8 ? JOBS : 8))"); fi

if wants tests_triton tests; then
  # The Triton kernels need no compiled extension: they compile while the extension builds.
  # shellcheck disable=SC2086
  run tests_triton "${GPU_CHECK_TRITON_LIMIT:-200}" "${PYTEST[@]}" --junitxml="$OUT/tests_triton.xml" ${GPU_CHECK_TRITON_TESTS:-tests/test_triton_svgd_step.py \
    tests/test_triton_rbf_kernel.py tests/test_triton_median.py}
fi
if [ -n "$BUILD_PID" ]; then  # the rest needs the compiled extension
  wait "$BUILD_PID"
  tail -n 20 "$OUT/build.log"
  "$PY" -m bmt_fast.info >"$OUT/info.log" 2>&1
  cat "$OUT/info.log"
fi
if wants tests_cuda tests; then
  # shellcheck disable=SC2086
  run tests_cuda 150 "${PYTEST[@]}" --junitxml="$OUT/tests_cuda.xml" ${GPU_CHECK_CUDA_TESTS:--k "not emulator" \
    tests/test_cuda_kernels.py tests/test_cuda_build.py tests/test_validation.py}
fi

bench() {  # bench NAME LIMIT OP ARGS...
  local name=$1 limit=$2 op=$3
  shift 3
  wants "bench_$name" bench || return 0
  # shellcheck disable=SC2086
  run "bench_$name" "$limit" "$PY" -m "benchmarks.$op" --out "$OUT/$op.csv" --max-call-seconds 20 \
    --case-budget-seconds 4 --compile-seconds 90 ${GPU_CHECK_BENCH_ARGS:-} "$@"
}
# The issue's targets first (many particles in bf16 against the GEMM limit, SDPA and naive torch, the Triton
# flash and tiled kernels side by side (bmt_fast-triton-tf32 would repeat bmt_fast-triton: one bf16 product); the prompt regime against copy bandwidth) and where their time goes,
# then cuda vs triton across the regimes (what backend="auto" on CUDA rests on), then the other ops and the
# compiling providers: a short lease spends its time on what the issue asks first.
bench target_bf16 150 svgd_step --dtype bfloat16 --sizes 65536x128 \
  --providers bmt_fast-cuda,bmt_fast-triton,bmt_fast-triton-tiled,torch-naive,torch-blocked,attention-sdpa
# The prompt regime's register kernels against the streamed ones (BMT_FAST_CUDA_GRAM=streamed), and at a row stride
# that is not a multiple of 64 KiB (409,664): whether the 16 rows at one column offset collide in the memory system.
bench prompt 120 svgd_step --dtype float32 --sizes 16x409600,16x409664,64x409600,16x76800 \
  --providers bmt_fast-cuda,bmt_fast-cuda-streamed,bmt_fast-cuda-checked,bmt_fast-triton,bmt_fast-triton-checked,torch-naive,attention-sdpa
if wants profile; then  # where the time of the two target rows goes, launch by launch (benchmarks/profile.py)
  run profile 120 bash -c "'$PY' -m benchmarks.profile --device cuda --sizes 16x409600 --out '$OUT/profile.txt' \
    --providers bmt_fast-cuda,bmt_fast-cuda-streamed,bmt_fast-triton && '$PY' -m benchmarks.profile --device cuda --dtype bfloat16 \
    --sizes 65536x128 --calls 3 --providers bmt_fast-cuda,bmt_fast-triton --out '$OUT/profile.txt'"
fi
# The bf16 kernels' split form (particles spread beyond 8 sqrt(H): --data clusters) against their folded form (the
# default data) at the same sizes, one run after the other: what the split costs (README "GPU precision"; not yet
# timed on a GPU).
bench split_bf16 120 svgd_step --dtype bfloat16 --data clusters --sizes 65536x128,8192x128,4096x768 \
  --providers bmt_fast-cuda,bmt_fast-triton
bench fold_bf16 120 svgd_step --dtype bfloat16 --sizes 65536x128,8192x128,4096x768 \
  --providers bmt_fast-cuda,bmt_fast-triton
bench auto_fp32 150 svgd_step --dtype float32 --sizes 1024x16,8192x128,65536x64,4096x768,65536x3,256x768 \
  --providers bmt_fast-cuda,bmt_fast-triton,torch-naive,attention-sdpa
bench auto_bf16 120 svgd_step --dtype bfloat16 --sizes 1024x16,8192x128,65536x64,4096x768,4x409600 \
  --providers bmt_fast-cuda,bmt_fast-triton,torch-naive
bench prompt_bf16 90 svgd_step --dtype bfloat16 --sizes 16x409600 \
  --providers bmt_fast-cuda,bmt_fast-cuda-streamed,bmt_fast-triton,torch-naive
bench rbf 120 rbf_kernel --dtype float32 --sizes 1024x64,8192x128,16x409600 \
  --providers bmt_fast-cuda,bmt_fast-triton,torch-naive
# a self kernel's gradient by autograd of K.sum(): Triton's one symmetrised pass, CUDA's composite rule
bench rbf_grad 90 rbf_kernel_grad --dtype float32 --sizes 4096x128,1024x768,16x409600 \
  --providers bmt_fast-cuda,bmt_fast-triton,torch-naive
bench median 120 median_bandwidth --dtype float32 --sizes 1024x64,8192x128,65536x64,16x409600 \
  --providers bmt_fast-cuda,bmt_fast-triton,torch-naive
# particle sets per call: torch.func.vmap of the step (CUDA: the batched op: up to 16 particles one launch of
# each register kernel for all sets, else svgd_step_into per set in C++; Triton: one call per set) against a
# loop and torch's own batching of the naive code (vmap), where launch overheads, not the kernels, may decide
# for small sets; 256 small sets too
bench vmap 90 svgd_step_vmap --dtype float32 --batch 16 --sizes 16x64,32x8,256x64,2048x64,16x76800 \
  --providers bmt_fast-cuda-vmap,bmt_fast-cuda-loop,bmt_fast-triton-vmap,torch-naive-vmap
bench vmap256 60 svgd_step_vmap --dtype float32 --batch 256 --sizes 8x2,16x64,32x2,100x10 \
  --providers bmt_fast-cuda-vmap,bmt_fast-cuda-loop,torch-naive-vmap
bench compiled 180 svgd_step --dtype bfloat16 --sizes 65536x128 --providers bmt_fast-cuda,torch-compile,attention-flex

if wants suite; then
  run suite 300 "${PYTEST[@]}" --junitxml="$OUT/suite.xml" tests
fi
echo "== [$((SECONDS - T0)) s] done"
cat "$OUT/summary.log"
