#!/usr/bin/env bash
# An aarch64 user space in which tests/test_portability.py runs bmt_fast's CPU kernels under qemu-user:
# Debian's arm64 Python (the packages extracted, nothing installed), PyPI's aarch64 torch wheel (the
# version the CPU tests pin), numpy, pytest and hypothesis, stubs for the CUDA libraries that wheel
# links against (scripts/aarch64_cuda_stubs.py) and a /proc/cpuinfo in the aarch64 format (torch's cpuinfo
# crashes on the host's x86 one, which qemu-user 7.2 passes through).
#
#   bash scripts/aarch64_sysroot.sh            # into ${XDG_CACHE_HOME:-~/.cache}/bmt_fast/aarch64
#   BMT_FAST_AARCH64_ROOT=DIR bash scripts/aarch64_sysroot.sh
#
# PYTHON names the host Python whose pip downloads the aarch64 wheels (default python3; scripts/test.sh
# passes its venv's).
# Needs Debian (or Ubuntu) with the arm64 architecture added to apt, qemu-user-static and an aarch64 cross
# compiler: it says what to run where they are missing, or (root, BMT_FAST_AARCH64_INSTALL=1) runs it.
# Nothing is installed into the system's arm64 side: the packages are downloaded and extracted into the
# folder (about 1.3 GB). Runs once; later calls find it ready (READY names the Python and torch versions).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${BMT_FAST_AARCH64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/bmt_fast/aarch64}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${BMT_FAST_AARCH64_TORCH:-2.13.0}

as_root() {
  if [ "$(id -u)" = 0 ] && [ "${BMT_FAST_AARCH64_INSTALL:-0}" = 1 ]; then "$@"; else
    echo "aarch64_sysroot: first run (as root): $*" >&2
    exit 1
  fi
}

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  as_root dpkg --add-architecture arm64
  as_root apt-get update -q
fi
CROSS_GCC=$(command -v aarch64-linux-gnu-gcc || command -v aarch64-linux-gnu-gcc-14 || command -v aarch64-linux-gnu-gcc-13 ||
  command -v aarch64-linux-gnu-gcc-12 || true)
if ! command -v qemu-aarch64-static > /dev/null || [ -z "$CROSS_GCC" ]; then
  as_root apt-get install -y -q qemu-user-static g++-aarch64-linux-gnu
  CROSS_GCC=$(command -v aarch64-linux-gnu-gcc)
fi

# the distribution's Python 3 for arm64, with the libraries it and torch load, and its headers
PY_VERSION=$(apt-cache show python3-minimal:arm64 | sed -n 's/^Version: \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
[ -n "$PY_VERSION" ] || { echo "aarch64_sysroot: apt knows no python3-minimal:arm64 (apt-get update after adding arm64)" >&2; exit 1; }
if [ "$(cat "$DEST/READY" 2>/dev/null)" = "python=$PY_VERSION torch=$TORCH_VERSION" ]; then
  echo "aarch64 user space already in $DEST (python $PY_VERSION, torch $TORCH_VERSION)"
  exit 0
fi
rm -rf "$DEST/READY" "$DEST/debs" "$DEST/root" "$DEST/site" "$DEST/stubs"  # only what this script makes
mkdir -p "$DEST/debs" "$DEST/root"
PACKAGES=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
  --no-enhances "python$PY_VERSION-minimal:arm64" "libpython$PY_VERSION-stdlib:arm64" "libpython$PY_VERSION-dev:arm64" \
  libstdc++6:arm64 libgomp1:arm64 | grep -E '^[a-z0-9][^ <]*:arm64$' | sort -u)
(cd "$DEST/debs" && apt-get download $PACKAGES > /dev/null 2>&1 || apt-get download $PACKAGES)
for deb in "$DEST"/debs/*.deb; do dpkg-deb -x "$deb" "$DEST/root"; done

# torch's cpuinfo reads /proc/cpuinfo and the sysfs cpu list; qemu-user (-L) finds these first
mkdir -p "$DEST/root/proc" "$DEST/root/sys/devices/system/cpu"
: > "$DEST/root/proc/cpuinfo"
for cpu in 0 1; do
  printf 'processor\t: %s\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\nCPU revision\t: 1\n\n' \
    "$cpu" >> "$DEST/root/proc/cpuinfo"
  mkdir -p "$DEST/root/sys/devices/system/cpu/cpu$cpu/topology"
  echo 0 > "$DEST/root/sys/devices/system/cpu/cpu$cpu/topology/physical_package_id"
  echo "$cpu" > "$DEST/root/sys/devices/system/cpu/cpu$cpu/topology/core_id"
done
for list in possible present online; do echo 0-1 > "$DEST/root/sys/devices/system/cpu/$list"; done

# PyPI's aarch64 wheels for that Python (pure-Python ones from the same index)
"$PYTHON" -m pip install -q --no-deps --target "$DEST/site" --platform manylinux_2_28_aarch64 \
  --python-version "$PY_VERSION" --only-binary=:all: "torch==$TORCH_VERSION" numpy
"$PYTHON" -m pip install -q --target "$DEST/site" --platform manylinux_2_28_aarch64 \
  --python-version "$PY_VERSION" --only-binary=:all: typing_extensions sympy networkx jinja2 filelock fsspec \
  pytest hypothesis

"$PYTHON" "$ROOT/scripts/aarch64_cuda_stubs.py" "$DEST/site" "$DEST/root" "$DEST/stubs" "$CROSS_GCC" > /dev/null
echo "python=$PY_VERSION torch=$TORCH_VERSION" > "$DEST/READY"
echo "aarch64 user space ready in $DEST (python $PY_VERSION, torch $TORCH_VERSION)"
