"""The one training loop every stage runs: steps, progress bar, JSONL metrics, checkpoints, resume.

A stage plugs in a `Trainable`: `train_step()` does one update and returns that step's metrics;
`diagnostics()` adds metrics measured at log time (particle spread); `after_step(step)` may return extra
records (evaluations); `state_dict()` / `load_state_dict()` hold everything a resumed run needs besides
the global RNG states, which the loop saves itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .metrics_log import MetricsLog

CheckpointHook = Callable[[int, Path], None]
logger = logging.getLogger(__name__)


class Trainable(Protocol):
    def train_step(self) -> dict[str, Any]: ...

    def diagnostics(self) -> dict[str, Any]: ...

    def after_step(self, step: int) -> dict[str, Any] | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LoopSettings:
    steps: int
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    progress: bool = True
    description: str = "train"


def run_loop(
    stage_dir: str | Path,
    trainable: Trainable,
    settings: LoopSettings,
    meta: dict[str, Any],
    *,
    resume: bool = False,
    on_checkpoint: Sequence[CheckpointHook] = (),
) -> int:
    """Train up to `settings.steps` steps (from the latest checkpoint if resume); returns the last step."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(stage_dir / "metrics.jsonl")
    start = _restore(stage_dir, trainable, log) if resume else 0
    window = _Window()
    bar = tqdm(total=settings.steps, initial=start, desc=settings.description, disable=not settings.progress)
    for step in range(start + 1, settings.steps + 1):
        window.add(trainable.train_step())
        if step % settings.log_every == 0 or step == settings.steps:
            record = {"step": step, **window.mean(), **trainable.diagnostics()}
            log.log(record)
            bar.set_postfix(_short(record))
        extra = trainable.after_step(step)
        if extra:
            log.log({"step": step, **extra})
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            state = {"trainable": trainable.state_dict(), "rng": rng_state()}
            path = save_checkpoint(stage_dir, step, state, meta, settings.keep_checkpoints)
            for hook in on_checkpoint:
                hook(step, path)
        bar.update(1)
    bar.close()
    return settings.steps


def _restore(stage_dir: Path, trainable: Trainable, log: MetricsLog) -> int:
    remove_partial_checkpoints(stage_dir)
    path = latest_checkpoint(stage_dir)
    if path is None:
        logger.info("%s: no checkpoint, starting at step 0", stage_dir)
        log.truncate_after(0)
        return 0
    checkpoint = load_checkpoint(path)
    trainable.load_state_dict(checkpoint.state["trainable"])
    set_rng_state(checkpoint.state["rng"])
    log.truncate_after(checkpoint.step)
    logger.info("%s: resuming from %s (step %d)", stage_dir, path.name, checkpoint.step)
    return checkpoint.step


class _Window:
    """Mean of each metric over the steps since the last log (lists are averaged elementwise)."""

    def __init__(self):
        self.values: dict[str, list[Any]] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(value)

    def mean(self) -> dict[str, Any]:
        out = {key: torch.tensor(v, dtype=torch.float64).mean(0).tolist() for key, v in self.values.items()}
        self.values = {}
        return out


def _short(record: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "step"}
