"""`python -m bmt_fast.info`: versions, which backends were built and why any was not."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform

import torch

from . import __version__, _extension, backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything `main` prints, as a dict (also used by the benchmarks to label their rows)."""
    cpu = _extension.CPU
    info = {
        "bmt_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "available_backends": backends.available_backends(),
        "unavailable_backends": backends.unavailable_backends(),
        "cpu_extension": dict(cpu.build_info),
        "cuda_extension": dict(_extension.CUDA.build_info),
    }
    if cpu.loaded:
        try:
            info["cpu_extension"].update(cpu.module.build_info())
        except RuntimeError as error:  # a bad BMT_FAST_CPU_* value: every CPU op call raises the same
            info["cpu_settings_error"] = str(error).splitlines()[0]
            return info
        # fp32 particles with many particles on AMX follow torch's fp32 matmul precision (README, "Numerics")
        amx_fp32 = info["cpu_extension"].get("cpu_bf16_amx") and cpu.module.float32_matmul_in_bf16()
        info["cpu_fp32_matmul"] = "bf16 on AMX (torch's fp32 matmul precision)" if amx_fp32 else "ieee"
    return info


DESCRIPTION = "versions, built backends, and why any was not built"  # (also `bmt-fast info`'s help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m bmt_fast.info` and `bmt-fast info`."""
    parser.add_argument("--json", action="store_true", help="print the same facts as one JSON object")


def main(argv: list[str] | None = None) -> int:
    """Prints the report (exit status 1 where the CPU settings are invalid); `--json`: collect()'s dict."""
    parser = argparse.ArgumentParser(prog="python -m bmt_fast.info", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 1 if "cpu_settings_error" in info else 0
    print(f"bmt_fast {info['bmt_fast']}  (python {info['python']}, torch {info['torch']}, CUDA {info['torch_cuda']},"
          f" triton {info['triton']})")
    devices = ", ".join(info["cuda_devices"]) or "none"
    print(f"CPU: {info['cpu']}, {info['threads']} threads; CUDA devices: {devices}")
    print(f"available backends: {', '.join(info['available_backends'])}")
    for name, reason in info["unavailable_backends"].items():
        print(f"  {name}: unavailable: {reason}")
    if "cpu_fp32_matmul" in info:
        print(f"CPU fp32 products (many particles): {info['cpu_fp32_matmul']}")
    for key in ("cpu_extension", "cuda_extension"):
        details = ", ".join(f"{k}={v}" for k, v in info[key].items() if k != "built")
        print(f"{key}: {details or 'no build record'}")
    if "cpu_settings_error" in info:
        print(f"CPU settings: {info['cpu_settings_error']}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
