"""Checkpoints as safetensors + JSON, written atomically, and the RNG states that make resume exact.

A checkpoint is a folder `checkpoint-<step>` holding
    state.safetensors   every tensor of the training state (parameters, optimizer moments, RNG states,
                        the data sampler's permutations), keyed by its path in the state tree
    state.json          the step, the tree itself with tensors replaced by their keys, and metadata
                        (the run configuration, versions)
It is written into a hidden temporary folder, flushed to disk, and renamed into place, so a run killed
at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)")
logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


class CheckpointError(ValueError):
    """A checkpoint folder whose files cannot be read back (the message names the file)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    meta: dict[str, Any]


def checkpoint_path(stage_dir: str | Path, step: int) -> Path:
    return Path(stage_dir) / f"{PREFIX}{step:08d}"


def save_checkpoint(stage_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write `state` (a tree of dicts/lists/tuples with tensor and JSON leaves) as checkpoint `step`."""
    stage_dir = Path(stage_dir)
    final = checkpoint_path(stage_dir, step)
    tmp = stage_dir / f".{PREFIX}{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "state", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    _readable(tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "state": tree, "meta": meta}, indent=1))
    _fsync_folder(tmp)
    if final.exists():  # only after a resume from an older checkpoint of the same run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(stage_dir, keep)
    return final


def load_checkpoint(path: str | Path, *, tensors: bool = True) -> Checkpoint:
    """The checkpoint in folder `path`; CheckpointError naming the file when one is missing or damaged.
    tensors=False: its step and meta only (state None), from state.json: what the resume checks read."""
    path = Path(path)
    json_file, tensor_file = path / "state.json", path / "state.safetensors"
    try:
        record = json.loads(json_file.read_text())
        step, tree, meta = int(record["step"]), record["state"], record["meta"]
    except (OSError, ValueError, KeyError, TypeError) as error:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"cannot read checkpoint file {json_file}: {error}") from error
    if not tensors:
        return Checkpoint(path, step, None, meta)
    try:
        tensors = load_file(str(tensor_file))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"cannot read checkpoint file {tensor_file}: {error}") from error
    try:
        state = _unflatten(tree, tensors)
    except KeyError as error:
        raise CheckpointError(f"checkpoint file {tensor_file} lacks tensor {error} that {json_file} names") from None
    return Checkpoint(path, step, state, meta)


def list_checkpoints(stage_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of a stage, oldest first (other folders are not checkpoints)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    found = list_checkpoints(stage_dir)
    return found[-1] if found else None


def load_latest_checkpoint(stage_dir: str | Path, *, tensors: bool = True) -> Checkpoint | None:
    """The newest checkpoint of a stage that reads back (None: the stage has none); tensors as for
    load_checkpoint.

    A damaged newest checkpoint (a disk that filled up, a file edited by hand) is skipped with a warning
    for the one before it, which the pruning keeps (keep_checkpoints >= 2); when none reads back, the
    CheckpointError of the newest is raised.
    """
    errors = []
    for path in reversed(list_checkpoints(stage_dir)):
        try:
            checkpoint = load_checkpoint(path, tensors=tensors)
        except CheckpointError as error:
            errors.append(error)
            continue
        for error in errors:
            if str(error) not in _WARNED:  # once per process: a run looks at a stage more than once
                _WARNED.add(str(error))
                logger.warning("%s; using the older %s", error, path.name)
        return checkpoint
    if errors:
        raise CheckpointError(f"{errors[0]} (and no older checkpoint reads back: pass --overwrite to start over)")
    return None


def remove_partial_checkpoints(stage_dir: str | Path) -> None:
    """Temporary folders a killed run left behind."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir():
        for tmp in stage_dir.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(tmp)


def _prune(stage_dir: Path, keep: int) -> None:
    for old in list_checkpoints(stage_dir)[:-keep]:
        shutil.rmtree(old)


def _readable(path: Path) -> None:
    """safetensors creates files as 0600; give them the permissions of any other file the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync_folder(folder: Path) -> None:
    for item in folder.iterdir():
        with open(item, "rb") as f:
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# Atomic single files (final results)


def atomic_save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _readable(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# State tree <-> (JSON tree, flat tensor dict). Dicts are stored as key/value pairs so that integer keys
# (torch optimizer state) survive JSON.


def _flatten(node: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[key] = node.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(node, dict):
        return {"__dict__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot checkpoint {key}: unsupported type {type(node).__name__}")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict) and "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if isinstance(node, dict) and "__dict__" in node:
        return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    return node
