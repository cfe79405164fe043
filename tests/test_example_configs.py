"""The example configurations under configs/ load and pass the trainer's checks (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bmt_fast.transfer.config import check_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    names = {path.name for path in CONFIGS}
    assert {"paper_t5_base.yaml", "llama_7b_bf16.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_passes_check_config(path, monkeypatch):
    # Online mode: a hub id is then only checked for its form (offline, it would have to be in the local
    # HF cache). Nothing is downloaded: check_config never loads a model or data.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cfg = load_config(path)
    for command in ("source", "transfer"):
        check_config(cfg, command)


def test_paper_config_is_the_paper_setting():
    cfg = load_config(Path(CONFIGS[0]).with_name("paper_t5_base.yaml"))
    assert cfg.model.name_or_path.endswith("t5-base") and cfg.prompt.length == 100
    assert cfg.data.source_tasks == ["mnli", "qnli", "qqp", "sst2", "squad", "record"]
    assert cfg.source.method == "bmtpt" and cfg.source.num_particles > 1
    assert "bmtpt" in cfg.target.methods


def test_large_decoder_config_holds_the_backbone_in_bfloat16():
    cfg = load_config(Path(CONFIGS[0]).with_name("llama_7b_bf16.yaml"))
    assert cfg.model.dtype == "bfloat16" and cfg.source.method == "bmtpt"
