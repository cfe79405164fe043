"""The trainer under DeepSpeed on 2 CPU processes (torchrun, gloo): ZeRO-3 / ZeRO-2 / ZeRO-3 with offload
(also on Marian, whose token-embedding scale is probed at the first forward) give the particles of the plain
1-process trainer on the same global batches, ZeRO-3 with a bf16 backbone
those of the plain bf16 trainer up to bf16 rounding; the backbone is partitioned and unchanged; crash and
resume; the DeepSpeed config checks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bmt_fast.transfer import Run
from bmt_fast.transfer.config import ConfigError
from bmt_fast.transfer.evaluate import generate
from bmt_fast.transfer.metrics_log import read_metrics
from bmt_fast.transfer.runner import load_particles, read_prompt
from conftest import base_dict, make_config, merge
from synthetic_tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip install -r requirements/deepspeed.txt)"
)

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # partition every weight
ZERO2 = {"zero_optimization": {"stage": 2}}
ZERO3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}

# The runs: the trainer's config changes for each scenario (beside the tests' base config).
SCENARIOS = {
    "zero3": (
        "llama",
        ZERO3,
        {
            "source": {"steps": 4, "checkpoint_every": 2},
            "target": {"methods": ["bmtpt"], "steps": 4, "checkpoint_every": 2, "kde_weight": 0.5},
        },
    ),
    "zero2_cli": ("t5", ZERO2, {"source": {"steps": 3, "num_particles": 2}}),
    # One example per task: the first process has none and takes part in the forwards with weight 0.
    "zero3_offload": ("t5", ZERO3_OFFLOAD, {"source": {"steps": 3, "batch_size": 1, "sampling": "uniform"}}),
    # Marian scales its encoder's token embeddings only for input_ids: PromptedModel.input_scale's probe (a
    # few encoder forwards at the first forward) runs on partitioned weights, every process alike.
    "zero3_marian": ("marian", ZERO3, {"source": {"steps": 3}}),
    # T5 v1.1's layout, lm_head apart from the shared embedding: transformers ties them under ZeRO-3
    # (untie_saved_output_embedding gives the checkpoint's lm_head back).
    "zero3_t5_untied": ("t5_untied", ZERO3, {"source": {"steps": 2}}),
    # A bf16 backbone: DeepSpeed's bf16 section with model.dtype=bfloat16 (the particles stay fp32).
    "zero3_bf16": ("llama", {**ZERO3, "bf16": {"enabled": True}}, {"model": {"dtype": "bfloat16"}, "source": {"steps": 3}}),
}


def scenario_dict(name: str, work: Path, model_dirs, output_dir: Path | None = None) -> dict:
    kind, _, changes = SCENARIOS[name]
    return merge(base_dict(output_dir or work / name, model_dirs[kind]), changes)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # DeepSpeed's shm_comm, built once
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def worker_errors(stderr: str) -> str:
    """The first process's traceback (torchrun prefixes each process's lines with [rank<r>]:)."""
    lines = [line for line in stderr.splitlines() if line.startswith("[rank0]:")]
    return "\n".join(lines[-60:]) or stderr[-6000:]


@pytest.fixture(scope="module")
def ds_runs(model_dirs, tmp_path_factory):
    """Every scenario run once by 2 processes; what each process saw, and the work folder."""
    work = tmp_path_factory.mktemp("deepspeed")
    for name, (_, ds, _) in SCENARIOS.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump(scenario_dict(name, work, model_dirs)))
        (work / f"{name}.json").write_text(json.dumps(ds))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, str(HERE / "deepspeed_worker.py"), str(work)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, worker_errors(done.stderr)
    return [torch.load(work / f"rank{r}.pt") for r in range(2)], work


def plain_run(name: str, work: Path, model_dirs, backbones, command: str = "source") -> Run:
    """The scenario's run config in one process, without DeepSpeed (output in work/plain_<name>)."""
    kind, _, changes = SCENARIOS[name]
    return Run(make_config(work / f"plain_{name}", model_dirs[kind], **changes), command, pm=backbones[kind])


@pytest.fixture(scope="module")
def plain_zero3(ds_runs, model_dirs, backbones):
    """The zero3 scenario's transfer in one process: (run, source particles, target evaluation)."""
    _, work = ds_runs
    run = plain_run("zero3", work, model_dirs, backbones, command="transfer")
    return run, run.source("bmtpt"), run.target("bmtpt")


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 summation order (the processes sum their shares of the batch; a few ulps here)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6)


@needs_deepspeed
def test_an_output_dir_the_processes_do_not_share_is_refused_on_every_process(ds_runs):
    """Node-local output_dirs had ended in a collective mismatch: the second process, not seeing the
    first's particles, trained the source stage again while the first went on to the target stage."""
    ranks, work = ds_runs
    for seen in ranks:
        assert "1 of 2 processes do not see the files the first process writes there" in seen["zero3"]["not_shared"]
    assert not list((work / "own0").glob(".bmt-fast-shared-*"))  # the probe is removed


@needs_deepspeed
def test_zero3_source_stage_equals_the_plain_trainer_on_the_same_global_batches(ds_runs, plain_zero3):
    ranks, work = ds_runs
    run, plain, _ = plain_zero3
    particles = load_particles(work / "zero3" / "source-bmtpt")
    assert not torch.equal(plain, run.initial_prompts(3))
    assert_close_fp32(particles, plain)
    for rank in ranks:  # every process ends with the particles the first one wrote
        assert torch.equal(rank["zero3"]["particles"], particles)
    ds_log = read_metrics(work / "zero3" / "source-bmtpt" / "metrics.jsonl")
    plain_log = read_metrics(work / "plain_zero3" / "source-bmtpt" / "metrics.jsonl")
    assert [r["step"] for r in ds_log] == [r["step"] for r in plain_log] == [1, 2, 3, 4]
    for ds_record, plain_record in zip(ds_log, plain_log):  # losses of the global batch, not of a share
        for key in ("loss/movie_sentiment", "loss/topic"):
            assert ds_record[key] == pytest.approx(plain_record[key], rel=1e-5)


@needs_deepspeed
def test_zero3_partitions_the_backbone_and_leaves_it_unchanged(ds_runs):
    ranks, _ = ds_runs
    for rank in ranks:
        result = rank["zero3"]
        assert result["partitioned"]  # this process held only a shard of the embedding matrix
        weights = result["weights"]
        assert weights["compared"] == weights["parameters"] > 0 and weights["trainable"] == 0
        assert weights["max_diff"] == 0.0


@needs_deepspeed
def test_zero3_resume_after_a_crash_continues_the_same_trajectory(ds_runs):
    ranks, work = ds_runs
    for rank in ranks:
        assert torch.equal(rank["zero3"]["particles"], rank["zero3"]["uninterrupted"])
    stage = work / "zero3" / "source-bmtpt"
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2, 3, 4]
    checkpoint = json.loads((stage / "checkpoint-00000004" / "state.json").read_text())
    assert checkpoint["step"] == 4


@needs_deepspeed
def test_zero3_target_stage_equals_the_plain_trainer(ds_runs, plain_zero3):
    _, work = ds_runs
    _, _, plain_eval = plain_zero3
    prompt = read_prompt(work / "zero3" / "target-bmtpt" / "prompt.safetensors")
    assert_close_fp32(prompt, read_prompt(work / "plain_zero3" / "target-bmtpt" / "prompt.safetensors"))
    ds_eval = json.loads((work / "zero3" / "target-bmtpt" / "eval.json").read_text())
    assert ds_eval["loss"] == pytest.approx(plain_eval["loss"], rel=1e-4)
    assert (work / "zero3" / "target-bmtpt" / "peft" / "adapter_model.safetensors").is_file()
    ds_log = read_metrics(work / "zero3" / "target-bmtpt" / "metrics.jsonl")
    plain_log = read_metrics(work / "plain_zero3" / "target-bmtpt" / "metrics.jsonl")
    assert [r["loss"] for r in ds_log] == pytest.approx([r["loss"] for r in plain_log], rel=1e-5)
    assert [r["kde"] for r in ds_log] == pytest.approx([r["kde"] for r in plain_log], rel=1e-5)


@needs_deepspeed
def test_zero3_generation_equals_the_plain_trainer(ds_runs, plain_zero3, model_dirs, backbones):
    ranks, work = ds_runs
    prompt = work / "zero3" / "target-bmtpt" / "prompt.safetensors"
    cfg = make_config(work / "plain_echo", model_dirs["llama"], data={"target_task": "echo"})
    (expected,) = Run(cfg, "eval", pm=backbones["llama"]).evaluate(str(prompt)).values()
    texts = generate(backbones["llama"], read_prompt(prompt), TASKS["echo"].examples["validation"], 4, 6)
    assert any(texts)
    for rank in ranks:
        assert rank["zero3"]["texts"] == texts
        (got,) = rank["zero3"]["evaluation"].values()
        assert set(got) == set(expected) and got["examples"] == expected["examples"] == 8
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5) and got["accuracy"] == expected["accuracy"]


@needs_deepspeed
@pytest.mark.parametrize("name", ["zero2_cli", "zero3_offload", "zero3_marian"])
def test_cli_source_stage_under_zero2_zero3_offload_and_on_marian_equals_the_plain_trainer(ds_runs, model_dirs, backbones, name):
    ranks, work = ds_runs
    if name == "zero3_marian":  # (the plain trainer's tokens go in at 4x: a factor 1 under ZeRO-3 would differ)
        assert backbones["marian"].input_scale() == 4.0
    assert all(rank[name]["exit_code"] == 0 for rank in ranks)
    assert all(rank[name]["group_left"] for rank in ranks)  # close_group=False: kept for the next command
    particles = load_particles(work / name / "source-bmtpt")
    assert_close_fp32(particles, plain_run(name, work, model_dirs, backbones).source("bmtpt"))
    summary = json.loads((work / name / "source-bmtpt" / "source.json").read_text())
    assert summary["processes"] == 2


@needs_deepspeed
def test_zero3_keeps_the_checkpoints_own_lm_head(ds_runs, model_dirs):
    """A T5 v1.1-style checkpoint (lm_head apart from the shared embedding): transformers 5 builds T5 tied
    and unties it in a plain from_pretrained, but under ZeRO-3 it stayed tied to the shared embedding, the
    checkpoint's lm_head dropped, so the source stage trained on other logits than the plain trainer's."""
    ranks, work = ds_runs
    assert all(rank["zero3_t5_untied"]["exit_code"] == 0 for rank in ranks)
    kind, _, changes = SCENARIOS["zero3_t5_untied"]
    plain = Run(make_config(work / "plain_zero3_t5_untied", model_dirs[kind], **changes), "source")
    head, shared = plain.pm.model.get_output_embeddings().weight, plain.pm.model.get_input_embeddings().weight
    assert head is not shared and not torch.equal(head, shared)  # (the plain load: untied, as saved)
    assert_close_fp32(load_particles(work / "zero3_t5_untied" / "source-bmtpt"), plain.source("bmtpt"))


@needs_deepspeed
def test_cli_source_stage_under_zero3_bf16_follows_the_plain_bf16_trainer(ds_runs, model_dirs):
    """The first step's losses (a forward on the same initial particles) equal those of the plain bf16
    trainer (4e-8 relative measured) and are ~8e-4 away from the plain fp32 trainer's: the backbone really
    ran in bf16. After that the gradients of the two halves of the batch are rounded to bf16 apart, and Adam
    turns a flipped sign of a near-zero gradient into a whole step (0.1 at most on one CPU, 0.003 on
    another), so the particles are compared in norm: no farther from the plain bf16 trainer's than bf16 itself
    is from fp32 in the same run."""
    ranks, work = ds_runs
    assert all(rank["zero3_bf16"]["exit_code"] == 0 for rank in ranks)
    # the command that ends the processes' runs destroyed the process group, as `bmt-fast` on its own does
    assert not any(rank["zero3_bf16"]["group_left"] for rank in ranks)
    stage = work / "zero3_bf16" / "source-bmtpt"
    particles = load_particles(stage)
    assert particles.dtype == torch.float32 and bool(torch.isfinite(particles).all())
    kind, _, changes = SCENARIOS["zero3_bf16"]
    plain_bf16 = Run(make_config(work / "plain_zero3_bf16", model_dirs[kind], **changes), "source")
    assert next(plain_bf16.pm.model.parameters()).dtype == torch.bfloat16
    expected = plain_bf16.source("bmtpt")
    fp32_changes = merge(changes, {"model": {"dtype": "float32"}})
    plain_fp32 = Run(make_config(work / "plain_zero3_fp32", model_dirs[kind], **fp32_changes), "source")
    from_fp32 = plain_fp32.source("bmtpt")

    logs = [read_metrics(d / "source-bmtpt" / "metrics.jsonl") for d in (work / "zero3_bf16",
            work / "plain_zero3_bf16", work / "plain_zero3_fp32")]  # fmt: skip
    ds_log, bf16_log, fp32_log = logs
    assert [r["step"] for r in ds_log] == [r["step"] for r in bf16_log] == [1, 2, 3]
    for key in ("loss/movie_sentiment", "loss/topic"):
        assert ds_log[0][key] == pytest.approx(bf16_log[0][key], rel=1e-6)
        assert abs(ds_log[0][key] - fp32_log[0][key]) > 1e-4 * abs(fp32_log[0][key])
        for ds_record, bf16_record in zip(ds_log[1:], bf16_log[1:]):
            assert ds_record[key] == pytest.approx(bf16_record[key], rel=1e-2)

    moved = float((particles - plain_bf16.initial_prompts(3)).norm())
    bf16_noise = float((expected - from_fp32).norm())
    assert moved > 1.0 and 0 < bf16_noise < 0.2 * moved
    assert float((particles - expected).norm()) <= 1.5 * bf16_noise
    summary = json.loads((stage / "source.json").read_text())
    assert summary["processes"] == 2


# ---------------------------------------------------------------------------------------------------
# The DeepSpeed config checks (one process, no launcher)


@needs_deepspeed
@pytest.mark.parametrize(
    "ds, model_dtype, message",
    [
        ({"optimizer": {"type": "Adam"}}, "float32", "remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "float32", "remove the 'scheduler' section"),
        ({"zero_optimization": {"stage": 4}}, "float32", "stage must be 0, 1, 2 or 3"),
        ({"zero_optimization": 3}, "float32", "'zero_optimization' must be a JSON object, got 3"),
        ({"bf16": True}, "float32", "'bf16' must be a JSON object, got true"),
        ({"bf16": {"enabled": True}}, "float32", "set model.dtype=bfloat16"),
        ({"fp16": {"enabled": True}}, "bfloat16", "set model.dtype=float16"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bfloat16", "cannot both be enabled"),
        # DeepSpeed's older name of the bf16 section: it had loaded a bf16 backbone under model.dtype=float32
        ({"bfloat16": {"enabled": True}}, "float32", "set model.dtype=bfloat16"),
        ({"bfloat16": {"enabled": True}, "bf16": {"enabled": True}}, "bfloat16", "not both"),
        # stages 0-2 keep the whole backbone on every device: an offload_param there was silently ignored
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "float32", "offload_param needs stage 3"),
        # true had been stage 1; a disabled bf16 section had been switched on for a bf16 model.dtype; "true"
        # (which DeepSpeed reads as true) had not counted as enabled, and passed a float32 model.dtype
        ({"zero_optimization": {"stage": True}}, "float32", "stage must be 0, 1, 2 or 3, got True"),
        ({"zero_optimization": {"stage": 2.5}}, "float32", "stage must be 0, 1, 2 or 3, got 2.5"),
        # an offload section that is no object (DeepSpeed's own error had come at initialize, after the load)
        ({"zero_optimization": {"stage": 3, "offload_param": "cpu"}}, "float32", 'offload_param must be a JSON object such as {"device": "cpu"}, got "cpu"'),
        ({"bf16": {"enabled": False}}, "bfloat16", "bf16.enabled is false but model.dtype=bfloat16"),
        ({"fp16": {"enabled": "false"}}, "float16", "fp16.enabled is false but model.dtype=float16"),
        ({"fp16": {"enabled": "true"}}, "float32", "fp16.enabled but model.dtype=float32; set model.dtype=float16"),
        ({"bf16": {"enabled": "maybe"}}, "bfloat16", r'bf16.enabled must be true, false or "auto", got "maybe"'),
    ],
)
def test_ds_config_errors(tmp_path, model_dirs, ds, model_dtype, message):
    from bmt_fast.transfer.deepspeed_support import read_ds_config

    cfg = make_config(tmp_path, model_dirs["llama"], model={"dtype": model_dtype})
    with pytest.raises(ConfigError, match=message):
        read_ds_config(ds, cfg, world_size=2)


@needs_deepspeed
def test_ds_config_gets_precision_and_batch_keys(tmp_path, model_dirs):
    from bmt_fast.transfer.deepspeed_support import read_ds_config

    cfg = make_config(tmp_path, model_dirs["llama"], model={"dtype": "bfloat16"})
    ds = read_ds_config({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}, cfg, world_size=4)
    assert type(read_ds_config({"zero_optimization": {"stage": 3.0}}, cfg, world_size=4)["zero_optimization"]["stage"]) is int
    assert ds["bf16"] == {"enabled": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 1, 4)
    # batch keys written for 8 GPUs (DeepSpeed's check: 32 != 4 * 1 * 2 had stopped ZeRO-3 in from_pretrained)
    eight = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 32}
    ds = read_ds_config({"zero_optimization": {"stage": 3}, **eight}, cfg, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 1, 2)
    assert read_ds_config({"bfloat16": {"enabled": True}}, cfg, world_size=1)["bf16"] == {"enabled": True}
    ds = read_ds_config({"bf16": {"enabled": "True"}, "fp16": {"enabled": "false"}}, cfg, world_size=1)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}  # (as DeepSpeed reads them)
    # "auto" (as Hugging Face's Trainer fills it in): model.dtype's precision, resolved for DeepSpeed (which reads
    # "auto" as false: the bf16 section had gone to it disabled under a bf16 model.dtype)
    ds = read_ds_config({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, cfg, world_size=1)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    float32 = make_config(tmp_path, model_dirs["llama"], model={"dtype": "float32"})
    ds = read_ds_config({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, float32, world_size=1)
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert read_ds_config({"zero_optimization": {"stage": 2, "offload_param": {"device": "none"}}}, cfg, 1)
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(path, cfg, world_size=1)
    with pytest.raises(ConfigError, match="config file not found"):
        read_ds_config(tmp_path / "missing.json", cfg, world_size=1)


@needs_deepspeed
@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.stem)
def test_committed_ds_configs_are_valid(tmp_path, model_dirs, path):
    from deepspeed.runtime.config import DeepSpeedConfig

    from bmt_fast.transfer.deepspeed_support import read_ds_config

    cfg = make_config(tmp_path, model_dirs["llama"], model={"dtype": "bfloat16"})
    parsed = DeepSpeedConfig(read_ds_config(path, cfg, world_size=1))  # no process group: DeepSpeed counts 1
    assert parsed.bfloat16_config.enabled and parsed.train_batch_size == 1
    assert parsed.zero_optimization_stage == int(path.stem.split("_zero")[1][0])
    assert (parsed.zero_config.offload_param is not None) == path.stem.endswith("offload")


def test_deepspeed_launcher_arguments_parse():
    """`deepspeed` passes --local_rank=<r> before the command."""
    from bmt_fast.cli import build_parser

    args = build_parser().parse_args(["--local_rank=1", "source", "--config", "r.yaml", "--deepspeed", "ds.json"])
    assert (args.command, args.config, args.deepspeed) == ("source", "r.yaml", "ds.json")
    assert build_parser().parse_args(["eval", "--config", "r.yaml"]).deepspeed is None


def test_share_of_a_global_batch():
    """Shares cover the batch once, in order; a process without a share runs one example with weight 0."""
    from bmt_fast.transfer.deepspeed_support import share_of

    def shares(n, size):
        return [share_of(list(range(10, 10 + n)), rank, size) for rank in range(size)]

    assert shares(5, 2) == [([10, 11], 0.4), ([12, 13, 14], 0.6)]
    assert shares(1, 2) == [([10], 0.0), ([10], 1.0)]
    for n, size in ((7, 3), (2, 4), (8, 8)):
        got = shares(n, size)
        assert sum(w for _, w in got) == pytest.approx(1.0)
        assert [i for part, w in got if w > 0 for i in part] == list(range(10, 10 + n))


def test_a_checkpoints_saved_tensor_is_read_from_every_layout(tmp_path):
    """untie_saved_output_embedding reads one tensor of the checkpoint: from one safetensors file, a sharded
    index, a .bin in torch's zip format or its legacy one (which torch cannot map into memory: that had
    raised under ZeRO-3, also for checkpoints that needed no untying); None where there is no such tensor."""
    from safetensors.torch import save_file

    from bmt_fast.transfer.deepspeed_support import _saved_tensor

    head, other = torch.randn(5, 3), torch.randn(2)
    layouts = {"single": tmp_path / "single", "sharded": tmp_path / "sharded", "zip": tmp_path / "zip",
               "legacy": tmp_path / "legacy"}  # fmt: skip
    for folder in layouts.values():
        folder.mkdir()
    save_file({"lm_head.weight": head, "b": other}, layouts["single"] / "model.safetensors")
    save_file({"b": other}, layouts["sharded"] / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": head}, layouts["sharded"] / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"b": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (layouts["sharded"] / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({"lm_head.weight": head, "b": other}, layouts["zip"] / "pytorch_model.bin")
    torch.save({"lm_head.weight": head, "b": other}, layouts["legacy"] / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)  # fmt: skip
    for name, folder in layouts.items():
        assert torch.equal(_saved_tensor(str(folder), "lm_head.weight"), head), name
        assert _saved_tensor(str(folder), "missing.weight") is None, name
    assert _saved_tensor(str(tmp_path), "lm_head.weight") is None  # (a folder without weights)
