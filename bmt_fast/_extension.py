"""Fail-soft loading of the compiled extensions.

Importing bmt_fast always works: if a compiled extension is missing or was built against another torch,
the reference backend still runs, a warning names the mismatch once, and `python -m bmt_fast.info` says why.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import torch


@dataclass
class ExtensionStatus:
    name: str
    module: ModuleType | None = None
    reason: str = ""
    build_info: dict = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return self.module is not None


def _recorded_build_info() -> dict:
    """What setup.py recorded at build time (readable even when the .so cannot be loaded)."""
    try:
        from . import _build_info  # written by setup.py, not tracked by git
    except ImportError:
        return {}
    return dict(getattr(_build_info, "BUILD_INFO", {}))


def _load(module_name: str, key: str) -> ExtensionStatus:
    status = ExtensionStatus(module_name)
    recorded = _recorded_build_info()
    built = recorded.get(key, {})
    status.build_info = dict(built)
    if not recorded:
        status.reason = "not built (no build record: install with `pip install --no-build-isolation -e .`)"
        return status
    if not built.get("built", False):
        status.reason = f"not built: {built.get('reason', 'unknown reason')}"
        return status
    try:
        status.module = importlib.import_module(f"bmt_fast.{module_name}")
    except (ImportError, OSError) as exc:
        built_for = recorded.get("torch_version", "?")
        status.reason = f"failed to load ({exc}); built for torch {built_for}, running torch {torch.__version__}"
        if built_for != torch.__version__:
            status.reason += ": rebuild with `pip install --no-build-isolation -e .`"
        warnings.warn(f"bmt_fast.{module_name} {status.reason}; falling back to other backends", stacklevel=3)
    return status


CPU = _load("_C", "cpu")
CUDA = _load("_C_cuda", "cuda") if CPU.loaded else ExtensionStatus("_C_cuda", reason="needs bmt_fast._C")
