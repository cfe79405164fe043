#!/usr/bin/env bash
# All tests on a fresh machine: creates .venv-test with the pinned CUDA 13.0 build of torch (it runs on
# the CPU, and lets the machine's nvcc compile and link the CUDA extension), builds everything, then runs
# the C++ tests (CMake + ctest) and the Python tests. Extra arguments go to pytest.
source "$(dirname "$0")/_common.sh"
VENV=${BMT_FAST_TEST_VENV:-$ROOT/.venv-test}
export BMT_FAST_CUDA_ARCH_LIST=${BMT_FAST_CUDA_ARCH_LIST:-9.0}  # one architecture keeps the CI build short
export TORCH_CUDA_ARCH_LIST=$BMT_FAST_CUDA_ARCH_LIST
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}
make_venv "$VENV" 2.14.1 "$ROOT/requirements/test.txt" 8  # ~6.3 GB venv (CUDA torch)
install_deepspeed "$VENV"  # the multi-process trainer tests (they skip without it)
install_demo_backbone "$VENV"  # tests/test_demo.py runs `bmt-fast demo --quick` on it
build_package "$VENV"
"$VENV/bin/python" -m bmt_fast.info

echo "== C++ tests (CMake + ctest)"
BUILD_DIR="$ROOT/build/cmake"
mkdir -p "$ROOT/build"
# shellcheck disable=SC2046
cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release $("$VENV/bin/python" "$ROOT/scripts/cmake_args.py") >"$ROOT/build/cmake.log" 2>&1 \
  || { tail -40 "$ROOT/build/cmake.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD_DIR" --output-on-failure

echo "== aarch64 user space for tests/test_portability.py (qemu-user; that test skips where it cannot be made)"
PYTHON="$VENV/bin/python" bash "$ROOT/scripts/aarch64_sysroot.sh" || echo "(no aarch64 user space: see above)"

echo "== Python tests"
cd "$ROOT"
"$VENV/bin/python" -m pytest tests "$@"

# Calls with little work run on one thread (csrc/cpu/paths.h, SerialIfSmall), which most of the tests'
# small shapes are: the kernel tests again with every call threaded, so the threads' shares stay covered
# (the fused kernels' loops in one team each, csrc/cpu/team.h), then a third time also with the fused kernels
# off (BMT_FAST_CPU_FUSED=0: the many-particle step on GEMM tiles, GEMM-tile medians, one-GEMM kernels and the
# feature chunks from 64 features), so those paths stay covered at the tests' shapes too.
echo "== CPU kernel tests with every call threaded (BMT_FAST_CPU_SERIAL_MAX_WORK=0)"
BMT_FAST_CPU_SERIAL_MAX_WORK=0 "$VENV/bin/python" -m pytest tests/test_svgd_step.py \
  tests/test_rbf_kernel.py tests/test_median_bandwidth.py tests/test_randomised.py "$@"
echo "== CPU kernel tests with every call threaded and the fused kernels off (BMT_FAST_CPU_SERIAL_MAX_WORK=0, BMT_FAST_CPU_FUSED=0)"
BMT_FAST_CPU_SERIAL_MAX_WORK=0 BMT_FAST_CPU_FUSED=0 "$VENV/bin/python" -m pytest tests/test_svgd_step.py \
  tests/test_rbf_kernel.py tests/test_median_bandwidth.py "$@"
