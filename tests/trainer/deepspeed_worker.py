"""Worker of tests/trainer/test_trainer_deepspeed.py, run by torchrun (2 processes, gloo, CPU).

    torchrun --nproc_per_node 2 deepspeed_worker.py WORK_DIR

WORK_DIR holds the run configs the test wrote (<scenario>.yaml, <scenario>.json); every process saves what
it saw in WORK_DIR/rank<r>.pt (files the first process wrote are read by the test from the run folders).

    zero3           tiny Llama, ZeRO-3 with every weight partitioned: `transfer` through the Python API; the
                    source stage crashes after its step-2 checkpoint and resumes; an uninterrupted source
                    run beside it; generation with the target prompt; the backbone's weights are compared
                    with the file after all that; an output_dir of each process's own is refused
    zero2_cli       tiny T5, ZeRO-2 (the backbone replicated), `bmt-fast source --deepspeed`
    zero3_offload   tiny T5 (tied embeddings), ZeRO-3 with offload_param, `bmt-fast source --deepspeed`, one
                    example per task (the first process has none and runs a weight-0 example)
    zero3_marian    tiny Marian (scales its encoder's token embeddings for input_ids only), ZeRO-3,
                    `bmt-fast source --deepspeed`
    zero3_t5_untied tiny T5 saved as T5 v1.1 is (lm_head apart from the shared embedding), ZeRO-3,
                    `bmt-fast source --deepspeed`
    zero3_bf16      tiny Llama in bf16, ZeRO-3 with DeepSpeed's bf16 section, `bmt-fast source --deepspeed`
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from bmt_fast.cli import main as cli_main
from bmt_fast.transfer.config import ConfigError, load_config
from bmt_fast.transfer.deepspeed_support import DeepSpeedRun
from bmt_fast.transfer.evaluate import generate
from bmt_fast.transfer.runner import read_prompt
from synthetic_tasks import TASKS


class Crash(RuntimeError):
    pass


def crash_at(step_to_crash: int):
    def hook(step, path):
        if step == step_to_crash:
            raise Crash(step)

    return hook


def weights_against_file(model: torch.nn.Module, folder: Path) -> dict[str, float]:
    """Largest difference between the backbone's (gathered) weights and the saved model file."""
    import deepspeed

    saved = load_file(str(folder / "model.safetensors"))
    parameters = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(parameters.values()), modifier_rank=None):
        compared = [name for name in parameters if name in saved]
        diff = max(float((parameters[n].detach().cpu() - saved[n]).abs().max()) for n in compared)
    return {
        "max_diff": diff,
        "compared": len(compared),
        "parameters": len(parameters),
        "trainable": sum(p.requires_grad for p in parameters.values()),
    }


def zero3(work: Path) -> dict:
    cfg = load_config(work / "zero3.yaml")
    ds = work / "zero3.json"
    run = DeepSpeedRun(cfg, "transfer", ds)
    embedding = run.pm.embedding.weight
    partitioned = embedding.numel() == 0 and tuple(embedding.ds_shape) == (embedding.ds_numel // 32, 32)
    try:
        run.source("bmtpt", on_checkpoint=[crash_at(2)])
    except Crash:
        pass
    resumed = DeepSpeedRun(cfg, "transfer", ds, resume=True, backbone=run.backbone)
    particles = resumed.source("bmtpt")
    uninterrupted_cfg = load_config(work / "zero3.yaml", [f"output_dir={work / 'zero3_uninterrupted'}"])
    uninterrupted = DeepSpeedRun(uninterrupted_cfg, "source", ds, backbone=run.backbone).source("bmtpt")
    resumed.target("bmtpt")
    # Generation (greedy, every process in step) of the trained prompt on a text-to-text task.
    echo_cfg = load_config(work / "zero3.yaml", ["data.target_task=echo"])
    prompt = resumed.target_dir("bmtpt") / "prompt.safetensors"
    evaluation = DeepSpeedRun(echo_cfg, "eval", ds, backbone=run.backbone).evaluate(str(prompt))
    texts = generate(run.pm, read_prompt(prompt), TASKS["echo"].examples["validation"], 4, 6)
    # an output_dir that is not one folder for all processes (each its own, as node-local disks would be)
    own = load_config(work / "zero3.yaml", [f"output_dir={work / ('own' + os.environ['RANK'])}"])
    try:
        DeepSpeedRun(own, "source", ds, backbone=run.backbone)
        not_shared = ""
    except ConfigError as error:
        not_shared = str(error)
    return {
        "not_shared": not_shared,
        "partitioned": partitioned,
        "particles": particles.cpu(),
        "uninterrupted": uninterrupted.cpu(),
        "weights": weights_against_file(run.pm.model, Path(cfg.model.name_or_path)),
        "evaluation": evaluation,
        "texts": texts,
    }


def cli(work: Path, scenario: str, *, last: bool) -> dict:
    """The command's exit code, and whether it left the process group alive: the last one destroys it, as a
    command run on its own does (the others keep it for the next: DeepSpeed caches its groups)."""
    argv = ["source", "--config", str(work / f"{scenario}.yaml"), "--deepspeed", str(work / f"{scenario}.json")]
    code = cli_main(argv, close_group=last)
    return {"exit_code": code, "group_left": torch.distributed.is_initialized()}


def main(work: Path) -> None:
    torch.set_num_threads(1)
    results = {"zero3": zero3(work)}
    scenarios = ("zero2_cli", "zero3_offload", "zero3_marian", "zero3_t5_untied", "zero3_bf16")
    for name in scenarios:
        results[name] = cli(work, name, last=name == scenarios[-1])
    # (no group now: the last command destroyed it)
    torch.save(results, work / f"rank{int(os.environ['RANK'])}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
