"""The one training loop every stage runs: steps, progress bar, JSONL metrics, checkpoints, resume.

A stage plugs in a `Trainable`: `train_step()` does one update and returns that step's metrics;
`diagnostics()` adds metrics measured at log time (particle spread); `after_step(step)` may return extra
records (evaluations); `state_dict()` / `load_state_dict()` hold everything a resumed run needs besides
the global RNG states, which the loop saves itself.

With several processes (DeepSpeed), every process runs the loop and the trainable keeps them in step; a
`World` says which process writes files (metrics, checkpoints, the progress bar) and carries the RNG
states of all of them into the checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .._validation import non_finite_count
from .checkpoint import (
    checkpoint_path,
    load_latest_checkpoint,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .metrics_log import MetricsLog

CheckpointHook = Callable[[int, Path], None]
logger = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """A training step's update direction (the particles' scores, the prompt's gradient) holds NaN/Inf: the
    step is not applied. run_loop adds the stage, the step and the last checkpoint to the message."""


def ensure_finite(what: str, tensors: Sequence[torch.Tensor | None]) -> None:
    """Raise Diverged before an update from `tensors` (None entries skipped) if any value is NaN/Inf: about
    one pass and one host sync per tensor and step (the op layer's check), beside the step's forwards."""
    bad = sum(non_finite_count(t) for t in tensors if t is not None)
    if bad:
        raise Diverged(
            f"{what} hold {bad} NaN/Inf value(s): the loss overflowed (a 16-bit model.dtype) or the learning "
            "rate is too high; this step was not applied"
        )


class World(Protocol):
    """The processes that run one stage together."""

    is_main: bool  # the one process that writes files

    def barrier(self) -> None: ...

    def rng_state(self) -> dict[str, Any]: ...  # a collective: every process calls it

    def set_rng_state(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...  # after a command's last stage, on success only

    def check_shared_folder(self, folder: Path) -> None: ...  # every process sees what the first writes there


class SingleProcess:
    is_main = True

    def barrier(self) -> None:
        return None

    def check_shared_folder(self, folder: Path) -> None:
        return None

    def close(self) -> None:
        return None

    def rng_state(self) -> dict[str, Any]:
        return rng_state()

    def set_rng_state(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


SINGLE_PROCESS = SingleProcess()


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
    world: World = SINGLE_PROCESS,
    before_training: Callable[[], None] | None = None,
) -> int:
    """Train up to `settings.steps` steps (from the latest checkpoint if resume); returns the last step.
    before_training: called (by every process) once the checkpoint is restored, where steps remain to train:
    a resume that fails (a checkpoint or data that does not load) has changed nothing by then."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(stage_dir / "metrics.jsonl") if world.is_main else None
    window = _Window()
    start = _restore(stage_dir, trainable, log, world, window, settings.steps) if resume else 0
    if before_training is not None and start < settings.steps:
        before_training()
    # the last line of a finished stage continued with more steps, which the next checkpoint replaces (_restore)
    replaced = window.replaced
    show = settings.progress and world.is_main
    bar = tqdm(total=settings.steps, initial=start, desc=settings.description, disable=not show)
    saved = start  # the latest checkpoint's step (0: none)

    def checkpoint(step: int) -> None:
        nonlocal saved, replaced
        # with the metrics of the steps since the last log line: where log_every does not divide
        # checkpoint_every, a resumed run's next line had averaged only the steps after the checkpoint
        state = {"trainable": trainable.state_dict(), "rng": world.rng_state(), "metrics_window": window.values}
        if window.open:  # (the last step's line closed a window short of log_every: see _restore)
            state["metrics_open_window"] = window.open
        if replaced:  # (a resume from this checkpoint drops that line too, if a kill came before it was dropped)
            state["metrics_replaced_line"] = replaced
        path = checkpoint_path(stage_dir, step)
        if world.is_main:
            save_checkpoint(stage_dir, step, state, meta, settings.keep_checkpoints)
            if replaced and log:
                log.drop_last(replaced["step"], set(replaced["keys"]))
        replaced = None
        world.barrier()  # every process goes on only once the checkpoint is complete
        saved = step
        for hook in on_checkpoint:
            hook(step, path)

    if settings.steps == 0 and start == 0:
        # a stage of no steps keeps its starting point as checkpoint 0, with the configuration: a later
        # `--resume` with more steps continues from it, and one with other settings is refused (without it
        # the stage was taken as it was, untrained, whatever the new settings)
        checkpoint(0)
    for step in range(start + 1, settings.steps + 1):
        try:
            window.add(trainable.train_step())
        except Diverged as error:
            bar.close()
            where = f"the latest checkpoint is step {saved}" if saved else "no checkpoint was written"
            raise Diverged(f"{settings.description}: step {step}: {error} ({where}, in {stage_dir})") from None
        if step % settings.log_every == 0 or step == settings.steps:
            # the last step's line, short of log_every: its steps kept apart for a later run with more steps
            window.open = {key: list(v) for key, v in window.values.items()} if step % settings.log_every else {}
            record = {"step": step, **window.mean(), **trainable.diagnostics()}
            if log:
                log.log(record)
            bar.set_postfix(_short(record))
        extra = trainable.after_step(step)
        if extra and log:
            log.log({"step": step, **extra})
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            checkpoint(step)
        bar.update(1)
    bar.close()
    return settings.steps


def _restore(
    stage_dir: Path, trainable: Trainable, log: MetricsLog | None, world: World, window: "_Window", steps: int
) -> int:
    if world.is_main:
        remove_partial_checkpoints(stage_dir)
    checkpoint = load_latest_checkpoint(stage_dir)
    if checkpoint is None:
        logger.info("%s: no checkpoint, starting at step 0", stage_dir)
        if log:
            log.truncate_after(0)
        return 0
    trainable.load_state_dict(checkpoint.state["trainable"])
    world.set_rng_state(checkpoint.state["rng"])
    window.values = {key: list(values) for key, values in checkpoint.state.get("metrics_window", {}).items()}
    if log:
        log.truncate_after(checkpoint.step)
        replaced = checkpoint.state.get("metrics_replaced_line")
        if replaced:  # (see below: this checkpoint was saved, the line it replaces not yet dropped)
            log.drop_last(replaced["step"], set(replaced["keys"]))
    opened = checkpoint.state.get("metrics_open_window") or {}
    if opened and steps > checkpoint.step:
        # A finished stage continued with more steps: its last line averaged the steps since the line before,
        # short of log_every. A stage that never stopped has no line there, and its next line averages those
        # steps too: that line goes, and its steps go back into the window (they had stayed as an extra line,
        # and the next line had averaged the new steps alone). It goes once the next checkpoint is saved: dropped
        # here, a continuation killed before that checkpoint had lost it for good (the stage, resumed with its
        # old steps, is finished at this checkpoint and writes no line again).
        window.values = {key: list(values) for key, values in opened.items()}
        window.replaced = {"step": checkpoint.step, "keys": sorted(opened)}
    logger.info("%s: resuming from %s (step %d)", stage_dir, checkpoint.path.name, checkpoint.step)
    return checkpoint.step


class _Window:
    """Mean of each metric over the steps since the last log (lists are averaged elementwise)."""

    def __init__(self):
        self.values: dict[str, list[Any]] = {}
        self.open: dict[str, list[Any]] = {}  # the steps of a last line short of log_every
        self.replaced: dict[str, Any] | None = None  # such a line, of the checkpoint resumed from (see _restore)

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(value)

    def mean(self) -> dict[str, Any]:
        out = {key: torch.tensor(v, dtype=torch.float64).mean(0).tolist() for key, v in self.values.items()}
        self.values = {}
        return out


def _short(record: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "step"}
