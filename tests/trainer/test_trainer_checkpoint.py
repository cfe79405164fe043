"""Checkpoints: the state tree round trip, atomic writes, and resume to the same result bit for bit."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bmt_fast.transfer import Run
from bmt_fast.transfer.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from bmt_fast.transfer.config import ConfigError, dump_config
from bmt_fast.transfer.metrics_log import read_metrics
from bmt_fast.transfer.runner import load_particles, read_prompt
from conftest import make_config

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def test_state_tree_round_trip(tmp_path):
    adam = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=0.1, betas=(0.8, 0.9))
    adam.param_groups[0]["params"][0].grad = torch.ones(3)
    adam.step()
    state = {
        "optimizer": adam.state_dict(),
        "orders": [torch.arange(4), torch.arange(2)],
        "positions": [1, 2],
        "x": None,
    }
    path = save_checkpoint(tmp_path, 7, state, {"note": "hi"}, keep=2)
    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.meta == {"note": "hi"} and loaded.state["x"] is None
    assert loaded.state["positions"] == [1, 2] and torch.equal(loaded.state["orders"][1], torch.arange(2))
    opt = loaded.state["optimizer"]
    assert set(opt["state"]) == {0}  # integer keys survive JSON
    assert torch.equal(opt["state"][0]["exp_avg"], adam.state[adam.param_groups[0]["params"][0]]["exp_avg"])
    assert opt["state"][0]["step"].dim() == 0
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=1.0)
    fresh.load_state_dict(opt)
    assert fresh.param_groups[0]["lr"] == 0.1 and tuple(fresh.param_groups[0]["betas"]) == (0.8, 0.9)


def test_checkpoints_are_pruned_and_partial_ones_ignored(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"t": torch.zeros(1)}, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000004", "checkpoint-00000006"]
    partial = tmp_path / ".checkpoint-00000008.tmp"
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000006"
    remove_partial_checkpoints(tmp_path)
    assert not partial.exists()
    save_checkpoint(tmp_path, 7, {"t": torch.zeros(1)}, {}, keep=1)  # the new one is written before the old go
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000007"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",  # the same thread count in every process: CPU results are then bit-exact
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    return env


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from bmt_fast.transfer import Run
from bmt_fast.transfer.config import load_config

cfg = load_config(sys.argv[1])
kill_at = int(sys.argv[2])

def kill(step, path):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine went away

Run(cfg, "source").source(cfg.source.method, on_checkpoint=[kill])
"""

CLI = "import sys, torch; torch.set_num_threads(1); from bmt_fast.cli import main; sys.exit(main(sys.argv[1:]))"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], env=_env(), capture_output=True, text=True, timeout=300)


def test_resume_after_sigkill_gives_the_same_particles_bit_for_bit(model_dirs, tmp_path):
    source = {"steps": 6, "checkpoint_every": 2, "num_particles": 3}
    killed_cfg = make_config(tmp_path / "killed", model_dirs["t5"], source=source)
    full_cfg = make_config(tmp_path / "full", model_dirs["t5"], source=source)
    dump_config(killed_cfg, tmp_path / "killed.yaml")
    dump_config(full_cfg, tmp_path / "full.yaml")

    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(tmp_path / "killed.yaml"), "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stage = tmp_path / "killed" / "source-bmtpt"
    assert latest_checkpoint(stage).name == "checkpoint-00000002"
    assert not (stage / "particles.safetensors").exists()

    with pytest.raises(ConfigError, match="--resume"):
        Run(killed_cfg, "source")
    resumed = _cli("source", "--config", str(tmp_path / "killed.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint-00000002 (step 2)" in resumed.stderr
    uninterrupted = _cli("source", "--config", str(tmp_path / "full.yaml"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    full_stage = tmp_path / "full" / "source-bmtpt"
    assert torch.equal(load_particles(stage), load_particles(full_stage))
    a = load_checkpoint(latest_checkpoint(stage)).state["trainable"]
    b = load_checkpoint(latest_checkpoint(full_stage)).state["trainable"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(a["optimizer"]["state"][0][key], b["optimizer"]["state"][0][key])
    assert read_metrics(stage / "metrics.jsonl") == read_metrics(full_stage / "metrics.jsonl")


class _Crash(RuntimeError):
    pass


def _crash_at(step_to_crash: int):
    def hook(step, path):
        if step == step_to_crash:
            raise _Crash(step)

    return hook


def test_target_stage_resumes_to_the_same_prompt(backbones, model_dirs, tmp_path):
    target = {"methods": ["bmtpt"], "steps": 5, "checkpoint_every": 2, "prompt_type": "mpt", "kde_weight": 0.5}
    pm = backbones["llama"]
    crashed = make_config(tmp_path / "crashed", model_dirs["llama"], source={"steps": 2}, target=target)
    with pytest.raises(_Crash):
        Run(crashed, "transfer", pm=pm).target("bmtpt", on_checkpoint=[_crash_at(4)])
    Run(crashed, "transfer", pm=pm, resume=True).target("bmtpt")
    full = make_config(tmp_path / "full", model_dirs["llama"], source={"steps": 2}, target=target)
    Run(full, "transfer", pm=pm).target("bmtpt")
    assert torch.equal(
        read_prompt(tmp_path / "crashed" / "target-bmtpt" / "prompt.safetensors"),
        read_prompt(tmp_path / "full" / "target-bmtpt" / "prompt.safetensors"),
    )


def test_resume_refuses_a_changed_configuration(backbones, model_dirs, tmp_path):
    pm = backbones["llama"]
    cfg = make_config(tmp_path, model_dirs["llama"], source={"steps": 4, "checkpoint_every": 2})
    with pytest.raises(_Crash):
        Run(cfg, "source", pm=pm).source("bmtpt", on_checkpoint=[_crash_at(2)])
    changed = make_config(tmp_path, model_dirs["llama"], source={"steps": 8, "checkpoint_every": 2, "lr": 0.5})
    with pytest.raises(ConfigError, match=r"source.lr: 0.05 -> 0.5"):
        Run(changed, "source", pm=pm, resume=True).source("bmtpt")
    longer = make_config(tmp_path, model_dirs["llama"], source={"steps": 6, "checkpoint_every": 2})
    assert Run(longer, "source", pm=pm, resume=True).source("bmtpt").shape == (3, 4, 32)  # more steps is fine
    assert read_metrics(tmp_path / "source-bmtpt" / "metrics.jsonl")[-1]["step"] == 6


def test_a_finished_stage_is_reused_only_under_its_configuration(backbones, model_dirs, tmp_path):
    pm = backbones["llama"]
    source = {"steps": 4, "checkpoint_every": 2}
    Run(make_config(tmp_path, model_dirs["llama"], source=source), "source", pm=pm).source("bmtpt")
    finished = load_particles(tmp_path / "source-bmtpt")

    changed = make_config(tmp_path, model_dirs["llama"], source=source, prompt={"length": 6})
    change = r"source-bmtpt: the configuration changed \(prompt.length: 4 -> 6\)"
    with pytest.raises(ConfigError, match="cannot resume .*" + change):
        Run(changed, "source", pm=pm, resume=True)
    with pytest.raises(ConfigError, match="cannot use .*" + change):
        Run(changed, "target", pm=pm)  # target trains from these particles as they are
    target = {"methods": ["bmtpt_particle"], "particle_index": 4}
    more = make_config(tmp_path, model_dirs["llama"], source={**source, "num_particles": 5}, target=target)
    with pytest.raises(ConfigError, match=r"source.num_particles: 3 -> 5"):
        Run(more, "target", pm=pm)
    fewer = make_config(tmp_path, model_dirs["llama"], source={**source, "steps": 2})
    with pytest.raises(ConfigError, match="it has trained 4 steps, more than source.steps=2"):
        Run(fewer, "source", pm=pm, resume=True)
    with pytest.raises(ConfigError, match=r"source.steps: 4 -> 2"):
        Run(fewer, "target", pm=pm)
    # What does not change the trajectory may change; the same configuration reuses the stage as it is.
    same = make_config(tmp_path, model_dirs["llama"], source={**source, "log_every": 3}, data={"target_task": "echo"})
    assert torch.equal(Run(same, "source", pm=pm, resume=True).source("bmtpt"), finished)

    # More steps continue the finished stage: the particles of a 6-step run, not the 4-step ones.
    longer = make_config(tmp_path, model_dirs["llama"], source={**source, "steps": 6})
    extended = Run(longer, "source", pm=pm, resume=True).source("bmtpt")
    fresh = make_config(tmp_path / "fresh", model_dirs["llama"], source={**source, "steps": 6})
    assert torch.equal(extended, Run(fresh, "source", pm=pm).source("bmtpt"))
    assert torch.equal(load_particles(tmp_path / "source-bmtpt"), extended) and not torch.equal(extended, finished)


def test_a_continuation_killed_after_its_last_checkpoint_leaves_no_stale_final_files(backbones, model_dirs, tmp_path):
    """A finished stage continued with more steps and killed after its last checkpoint, before the final files
    are rewritten: they had stayed, the earlier state's, and the stage looked finished (checkpoint at steps,
    files there), so a resume, and every later command, took the 4-step particles (the 4-step prompt with its
    eval.json). They go when the continuation starts; a resume writes them from the last checkpoint."""
    pm = backbones["llama"]
    source, target = {"steps": 4, "checkpoint_every": 2}, {"methods": ["bmtpt"], "steps": 2, "checkpoint_every": 2}
    cfg = make_config(tmp_path / "run", model_dirs["llama"], source=source, target=target)
    Run(cfg, "transfer", pm=pm).target("bmtpt")
    longer = make_config(tmp_path / "run", model_dirs["llama"], source={**source, "steps": 6}, target=target)
    with pytest.raises(_Crash):  # (the hooks run once the checkpoint is saved)
        Run(longer, "source", pm=pm, resume=True).source("bmtpt", on_checkpoint=[_crash_at(6)])
    assert not (tmp_path / "run" / "source-bmtpt" / "particles.safetensors").exists()
    fresh = make_config(tmp_path / "fresh", model_dirs["llama"], source={**source, "steps": 6}, target=target)
    expected = Run(fresh, "source", pm=pm).source("bmtpt")
    assert torch.equal(Run(longer, "source", pm=pm, resume=True).source("bmtpt"), expected)
    # the target: trained again from the 6-step particles to 2 steps, continued to 4 and killed the same way
    Run(longer, "target", pm=pm, overwrite=True).target("bmtpt")
    more = make_config(tmp_path / "run", model_dirs["llama"], source={**source, "steps": 6}, target={**target, "steps": 4})
    with pytest.raises(_Crash):
        Run(more, "target", pm=pm, resume=True).target("bmtpt", on_checkpoint=[_crash_at(4)])
    stage = tmp_path / "run" / "target-bmtpt"
    assert not (stage / "prompt.safetensors").exists() and not (stage / "eval.json").exists()
    assert not (stage / "peft").exists()  # (the 2-step prompt's adapter: exported by default)
    resumed = Run(more, "target", pm=pm, resume=True).target("bmtpt")
    Run(make_config(tmp_path / "fresh", model_dirs["llama"], source={**source, "steps": 6}, target={**target, "steps": 4}),
        "target", pm=pm).target("bmtpt")  # fmt: skip
    fresh_stage = tmp_path / "fresh" / "target-bmtpt"
    assert torch.equal(read_prompt(stage / "prompt.safetensors"), read_prompt(fresh_stage / "prompt.safetensors"))
    assert resumed["loss"] == json.loads((fresh_stage / "eval.json").read_text())["loss"]
    assert torch.equal(read_prompt(stage / "peft"), read_prompt(stage / "prompt.safetensors"))


def test_a_damaged_particles_file_is_named_and_a_resume_writes_it_again(backbones, model_dirs, tmp_path):
    """particles.safetensors cut short (a full disk): a safetensors traceback naming no file had stopped every
    command that reads it; now one error naming it and what to do, which works."""
    pm = backbones["llama"]
    cfg = make_config(tmp_path, model_dirs["llama"], source={"steps": 2, "checkpoint_every": 2})
    expected = Run(cfg, "source", pm=pm).source("bmtpt")
    path = tmp_path / "source-bmtpt" / "particles.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ConfigError, match=f"{path} is not a safetensors file .*: remove it, and `bmt-fast source --resume`"):
        Run(cfg, "source", pm=pm, resume=True).source("bmtpt")
    path.unlink()
    assert torch.equal(Run(cfg, "source", pm=pm, resume=True).source("bmtpt"), expected)


def test_the_cli_refuses_a_finished_run_with_another_configuration_before_rewriting_config_yaml(model_dirs, tmp_path):
    from bmt_fast.cli import main
    from bmt_fast.transfer.config import load_config

    cfg = make_config(tmp_path / "run", model_dirs["llama"], source={"steps": 2}, target={"steps": 2})
    dump_config(cfg, tmp_path / "run.yaml")
    config = ["--config", str(tmp_path / "run.yaml")]
    assert main(["transfer", *config]) == 0
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert main(["transfer", *config, "--resume", "prompt.length=10", "target.steps=8"]) == 2
    assert main(["source", *config, "--resume", "source.steps=1"]) == 2
    assert main(["target", *config, "prompt.length=6", "--overwrite"]) == 2
    assert (tmp_path / "run" / "config.yaml").read_text() == written  # still the configuration that trained
    assert main(["transfer", *config, "--resume", "target.steps=3"]) == 0  # more steps: trained on
    assert load_config(tmp_path / "run" / "config.yaml").target.steps == 3
    assert latest_checkpoint(tmp_path / "run" / "target-bmtpt").name == "checkpoint-00000003"


def test_damaged_checkpoints_are_named_and_the_older_one_is_used(tmp_path, caplog):
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"t": torch.full((3,), float(step))}, {}, keep=2)
    (tmp_path / "checkpoint-best").mkdir()  # not a checkpoint-<step> folder: ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000004"]
    newest = tmp_path / "checkpoint-00000004" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])  # a disk that filled up
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint file {newest}"):
        load_checkpoint(newest.parent)
    with caplog.at_level("WARNING"):
        checkpoint = load_latest_checkpoint(tmp_path)
    assert checkpoint.step == 2 and torch.equal(checkpoint.state["t"], torch.full((3,), 2.0))
    assert "using the older checkpoint-00000002" in caplog.text
    (tmp_path / "checkpoint-00000002" / "state.json").write_text('{"step": 2, "sta')
    with pytest.raises(CheckpointError, match=r"checkpoint-00000004/state.safetensors.*--overwrite"):
        load_latest_checkpoint(tmp_path)


def test_a_torn_last_metrics_line_is_dropped_on_resume(backbones, model_dirs, tmp_path):
    pm = backbones["llama"]
    cfg = make_config(tmp_path, model_dirs["llama"], source={"steps": 4, "checkpoint_every": 2})
    with pytest.raises(_Crash):
        Run(cfg, "source", pm=pm).source("bmtpt", on_checkpoint=[_crash_at(2)])
    log = tmp_path / "source-bmtpt" / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"step": 3, "loss/topic": 1.')  # killed in the middle of a write
    assert [r["step"] for r in read_metrics(log)] == [1, 2]
    Run(cfg, "source", pm=pm, resume=True).source("bmtpt")
    assert [r["step"] for r in read_metrics(log)] == [1, 2, 3, 4]
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not a JSON record"):
        read_metrics(log)  # only a last line can be cut short by a crash


class _LeastSquares:
    """A Trainable: Adam on w for the mean of (w - y)^2 over one value of `ys` per step, which stops before
    an update from a non-finite gradient (as the source and target trainers do)."""

    def __init__(self, ys):
        self.ys = ys
        self.w = torch.zeros(2, requires_grad=True)
        self.adam = torch.optim.Adam([self.w], lr=0.1)
        self.step = 0

    def train_step(self):
        from bmt_fast.transfer.loop import ensure_finite

        self.adam.zero_grad()
        loss = ((self.w - self.ys[self.step]) ** 2).mean()
        loss.backward()
        ensure_finite("w's gradients", [self.w.grad])
        self.adam.step()
        self.step += 1
        return {"loss": loss.item()}

    def diagnostics(self):
        return {}

    def after_step(self, step):
        return None

    def state_dict(self):
        return {"w": self.w.detach().clone(), "adam": self.adam.state_dict(), "step": self.step}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.adam.load_state_dict(state["adam"])
        self.step = state["step"]


def test_a_diverged_step_is_not_applied_and_names_the_latest_checkpoint(tmp_path):
    """Step 5's target is infinite: the loop stops there, naming the stage, the step and the latest
    checkpoint (step 4); w and Adam's state stay those after step 4, and a resume from that checkpoint with
    the data mended (targets are data here, not configuration) finishes the stage."""
    from bmt_fast.transfer.loop import Diverged, LoopSettings, run_loop

    ys = torch.tensor([[1.0, -1.0]] * 8)
    ys[4, 1] = math.inf
    trainable = _LeastSquares(ys)
    settings = LoopSettings(steps=8, log_every=1, checkpoint_every=2, progress=False, description="toy")
    with pytest.raises(Diverged, match=r"toy: step 5: w's gradients hold 1 NaN/Inf value\(s\): .*"
                       r"this step was not applied \(the latest checkpoint is step 4, in "):  # fmt: skip
        run_loop(tmp_path, trainable, settings, {})
    assert trainable.step == 4 and bool(torch.isfinite(trainable.w).all())
    assert torch.equal(trainable.w.detach(), load_latest_checkpoint(tmp_path).state["trainable"]["w"])
    ys[4, 1] = -1.0
    resumed = _LeastSquares(ys)
    assert run_loop(tmp_path, resumed, settings, {}, resume=True) == 8 and resumed.step == 8
    with pytest.raises(Diverged, match="no checkpoint was written"):
        run_loop(tmp_path / "fresh", _LeastSquares(torch.full((8, 2), math.nan)), settings, {})


def test_a_resumed_stage_logs_the_lines_of_one_that_never_stopped(tmp_path):
    """log_every=3, checkpoint_every=2: the line of step 6 averages steps 4-6; resumed from checkpoint 4 it
    had averaged steps 5-6 only (the window was not in the checkpoint)."""
    from bmt_fast.transfer.loop import LoopSettings, run_loop
    from bmt_fast.transfer.metrics_log import read_metrics

    ys = torch.randn(8, 2)
    settings = LoopSettings(steps=8, log_every=3, checkpoint_every=2, progress=False, description="toy")
    run_loop(tmp_path / "full", _LeastSquares(ys), settings, {})
    with pytest.raises(_Crash):
        run_loop(tmp_path / "crashed", _LeastSquares(ys), settings, {}, on_checkpoint=[_crash_at(4)])
    run_loop(tmp_path / "crashed", _LeastSquares(ys), settings, {}, resume=True)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == [3, 6, 8]
    assert read_metrics(tmp_path / "crashed" / "metrics.jsonl") == full


def test_a_finished_stage_continued_logs_the_lines_of_one_that_never_stopped(tmp_path):
    """log_every=3: a stage of 5 steps logs steps 3 and 5 (5 averages steps 4-5); continued to 8 steps (--resume
    with more steps) it logs what a stage of 8 steps does: 3, 6 (steps 4-6) and 8. It had kept the line of step
    5 and averaged steps 6 only at step 6. An evaluation's line at step 5 stays."""
    from bmt_fast.transfer.loop import LoopSettings, run_loop
    from bmt_fast.transfer.metrics_log import MetricsLog, read_metrics

    ys = torch.randn(8, 2)
    eight = LoopSettings(steps=8, log_every=3, checkpoint_every=2, progress=False, description="toy")
    run_loop(tmp_path / "full", _LeastSquares(ys), eight, {})
    five = LoopSettings(steps=5, log_every=3, checkpoint_every=2, progress=False, description="toy")
    run_loop(tmp_path / "grown", _LeastSquares(ys), five, {})
    assert [r["step"] for r in read_metrics(tmp_path / "grown" / "metrics.jsonl")] == [3, 5]
    MetricsLog(tmp_path / "grown" / "metrics.jsonl").log({"step": 5, "eval_accuracy": 0.5})
    run_loop(tmp_path / "grown", _LeastSquares(ys), five, {}, resume=True)  # the same steps: nothing changes
    assert [r["step"] for r in read_metrics(tmp_path / "grown" / "metrics.jsonl")] == [3, 5, 5]
    run_loop(tmp_path / "grown", _LeastSquares(ys), eight, {}, resume=True)
    grown = read_metrics(tmp_path / "grown" / "metrics.jsonl")
    assert grown == [*read_metrics(tmp_path / "full" / "metrics.jsonl")[:1], {"step": 5, "eval_accuracy": 0.5},
                     *read_metrics(tmp_path / "full" / "metrics.jsonl")[1:]]  # fmt: skip


def test_a_continuation_killed_before_its_next_checkpoint_keeps_the_finished_stages_lines(tmp_path, monkeypatch):
    """A 5-step stage (lines 3 and 5) continued to 8 steps and killed before checkpoint 6: the line of step 5,
    which the continuation replaces by one averaging steps 4-6, had been dropped at its start, so the stage,
    taken back to its 5 steps (finished at its checkpoint 5), had no line for step 5. It goes once the next checkpoint is saved, and a kill between that save and the drop is
    mended by a resume from that checkpoint."""
    from bmt_fast.transfer.loop import LoopSettings, run_loop
    from bmt_fast.transfer.metrics_log import MetricsLog, read_metrics

    ys = torch.randn(8, 2)
    five = LoopSettings(steps=5, log_every=3, checkpoint_every=3, progress=False, description="toy")
    eight = LoopSettings(steps=8, log_every=3, checkpoint_every=3, progress=False, description="toy")
    run_loop(tmp_path / "five", _LeastSquares(ys), five, {})
    run_loop(tmp_path / "eight", _LeastSquares(ys), eight, {})
    stage = tmp_path / "grown"
    run_loop(stage, _LeastSquares(ys), five, {})
    with pytest.raises(_Crash):  # (the hook runs after checkpoint 6 is saved: kill earlier, at step 6's start)
        run_loop(stage, _Dies(ys, at_step=6), eight, {}, resume=True)
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [3, 5]
    run_loop(stage, _LeastSquares(ys), five, {}, resume=True)
    assert read_metrics(stage / "metrics.jsonl") == read_metrics(tmp_path / "five" / "metrics.jsonl")
    # killed between checkpoint 6's save and the drop of line 5: the resume from checkpoint 6 drops it
    drop = MetricsLog.drop_last
    monkeypatch.setattr(MetricsLog, "drop_last", lambda self, *a: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        run_loop(stage, _LeastSquares(ys), eight, {}, resume=True)
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [3, 5, 6]
    monkeypatch.setattr(MetricsLog, "drop_last", drop)
    run_loop(stage, _LeastSquares(ys), eight, {}, resume=True)
    assert read_metrics(stage / "metrics.jsonl") == read_metrics(tmp_path / "eight" / "metrics.jsonl")


class _Dies(_LeastSquares):
    """_LeastSquares that crashes as it starts step `at_step`."""

    def __init__(self, ys, at_step: int):
        super().__init__(ys)
        self.at_step = at_step

    def train_step(self):
        if self.step + 1 == self.at_step:
            raise _Crash()
        return super().train_step()


def test_before_training_runs_once_the_restore_succeeded_and_steps_remain(tmp_path):
    """Run.source / Run.target remove a stage's stale final files through before_training: a resume refused
    while restoring (its data changed size: the sampler's DataError) had found them removed already, and the
    finished stage's only results were gone; a stage already at its steps keeps them."""
    from bmt_fast.transfer.data import DataError
    from bmt_fast.transfer.loop import LoopSettings, run_loop

    class Refused(_LeastSquares):
        def load_state_dict(self, state):
            raise DataError("the training data changed since this checkpoint")

    ys = torch.randn(8, 2)
    calls = []
    four = LoopSettings(steps=4, log_every=2, checkpoint_every=2, progress=False, description="toy")
    six = LoopSettings(steps=6, log_every=2, checkpoint_every=2, progress=False, description="toy")
    run_loop(tmp_path, _LeastSquares(ys), four, {}, before_training=lambda: calls.append("fresh"))
    with pytest.raises(DataError):
        run_loop(tmp_path, Refused(ys), six, {}, resume=True, before_training=lambda: calls.append("refused"))
    run_loop(tmp_path, _LeastSquares(ys), four, {}, resume=True, before_training=lambda: calls.append("finished"))
    run_loop(tmp_path, _LeastSquares(ys), six, {}, resume=True, before_training=lambda: calls.append("continued"))
    assert calls == ["fresh", "continued"]
