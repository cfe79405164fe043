"""Stub libraries for the CUDA libraries that PyPI's aarch64 torch wheel links against.

PyPI's aarch64 torch wheels are CUDA builds (the CPU-only ones live on download.pytorch.org, which this
project's machines cannot reach), and the CUDA libraries they need come as separate wheels that are not
installable everywhere. To run the CPU part of such a torch under qemu-user, every CUDA library it needs
and cannot find is replaced by a stub with the same soname whose every symbol (with the version node the
wheel asks for) is one function returning 100, CUDA's "no device" error: torch then loads, reports no GPU
and never calls them again.

    python scripts/aarch64_cuda_stubs.py SITE_PACKAGES SYSROOT OUT_DIR [CROSS_GCC]

SITE_PACKAGES holds the aarch64 torch, SYSROOT the aarch64 C libraries (Debian's arm64 packages
extracted), OUT_DIR receives the stubs (put it on LD_LIBRARY_PATH). Used by scripts/aarch64_sysroot.sh.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

NO_DEVICE = 100  # cudaErrorNoDevice, CUDA_ERROR_NO_DEVICE


def dynamic_symbols(library: Path, undefined: bool) -> set[str]:
    """The dynamic symbols a library defines or needs; weak undefined ones (optional) are left out."""
    option = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-D", option, str(library)], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if undefined and parts[-2] in ("w", "v"):
            continue
        found.add(parts[-1])
    return found


def needed(library: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def shared_objects(folder: Path) -> list[Path]:
    """The ELF shared objects in a folder (not the links to them, nor linker scripts such as libc.so)."""
    found = []
    for path in sorted(folder.glob("*.so*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def main(site: Path, sysroot: Path, out: Path, gcc: str) -> None:
    torch_libs = shared_objects(site / "torch" / "lib")
    if not torch_libs:
        raise SystemExit(f"no torch libraries under {site / 'torch' / 'lib'}")
    system_dirs = [sysroot / "lib" / "aarch64-linux-gnu", sysroot / "usr" / "lib" / "aarch64-linux-gnu"]
    present = {p.name for folder in [site / "torch" / "lib", *system_dirs] for p in folder.glob("*.so*")}
    defined = set()
    for library in torch_libs + [p for folder in system_dirs for p in shared_objects(folder)]:
        defined |= {name.split("@")[0] for name in dynamic_symbols(library, undefined=False)}
    missing = sorted({so for library in torch_libs for so in needed(library) if so not in present})
    by_node: dict[str, set[str]] = collections.defaultdict(set)
    unversioned = set()
    for library in torch_libs:
        for symbol in dynamic_symbols(library, undefined=True):
            name, _, node = symbol.partition("@")
            if node:
                by_node[node].add(name)
            elif name not in defined:
                unversioned.add(name)
    out.mkdir(parents=True, exist_ok=True)
    for soname in missing:
        # the version node is the soname for the CUDA toolkit's libraries; NVSHMEM names its own
        node = "NVSHMEM" if soname.startswith("libnvshmem_host") else soname
        versioned = by_node.get(node, set())
        # unversioned needs (the driver API, cuFile, NCCL, cuSPARSELt) all go into the runtime's stub,
        # which every CUDA-linked torch library loads
        names = sorted(versioned | (unversioned if soname.startswith("libcudart.") else set()))
        stem = out / soname.split(".so")[0]
        lines = ["\t.text", "\t.p2align 2", "bmt_fast_no_device:", f"\tmov w0, #{NO_DEVICE}", "\tret"]
        for name in names:
            lines += [f'\t.globl "{name}"', f'\t.type "{name}",%function', f'\t.set "{name}", bmt_fast_no_device']
        stem.with_suffix(".S").write_text("\n".join(lines) + "\n")
        if versioned:
            script = node + " {\n global:\n" + "".join(f'  "{n}";\n' for n in sorted(versioned)) + "};\n"
        else:
            script = "{ global: *; };\n"
        stem.with_suffix(".map").write_text(script)
        subprocess.run([gcc, "-shared", "-nostdlib", f"-Wl,-soname,{soname}", f"-Wl,--version-script,{stem}.map",
                        "-o", str(out / soname), f"{stem}.S"], check=True)
        print(f"{soname}: {len(names)} symbols")


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
         sys.argv[4] if len(sys.argv) == 5 else "aarch64-linux-gnu-gcc-12")
