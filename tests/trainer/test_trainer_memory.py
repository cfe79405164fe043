"""The computed memory table (bmt_fast.transfer.memory): its arithmetic and its parameter counts."""

from __future__ import annotations

import json

import pytest

from bmt_fast.transfer import memory


def test_footprint_per_zero_stage():
    # P = 1001 bf16 weights on 4 GPUs; N = 5 particles x 10 tokens x hidden 8 = 400 float32 elements.
    kwargs = {"gpus": 4, "particles": 5, "prompt_length": 10}
    replicated = memory.footprint(1001, 8, stage="0-2", **kwargs)
    assert (replicated.backbone, replicated.particles, replicated.optimizer, replicated.gradients) == (
        2002, 1600, 3200, 4800
    )
    assert replicated.total == 2002 + 1600 + 3200 + 4800
    sharded = memory.footprint(1001, 8, stage="3", **kwargs)
    assert (sharded.backbone, sharded.host_backbone) == (501, 0)  # 2002 / 4, rounded up
    offloaded = memory.footprint(1001, 8, stage="3+offload", **kwargs)
    assert (offloaded.backbone, offloaded.host_backbone, offloaded.total) == (0, 501, 1600 + 3200 + 4800)
    assert replicated.host_backbone == 0
    adagrad_fp32 = memory.footprint(1001, 8, stage="0-2", dtype="float32", optimizer="adagrad", **kwargs)
    assert (adagrad_fp32.backbone, adagrad_fp32.optimizer) == (4004, 1600)
    with pytest.raises(ValueError, match="stage must be one of"):
        memory.footprint(1001, 8, stage="4", **kwargs)


def test_parameter_counts_match_the_models(model_dirs, backbones):
    for kind in ("t5", "llama"):
        config = json.loads((model_dirs[kind] / "config.json").read_text())
        model = backbones[kind].model
        assert memory.count_parameters(config) == (sum(p.numel() for p in model.parameters()), 32)


def test_reference_counts_match_the_published_ones():
    """Llama-2-7b and Llama-3.1-70B as their model cards count them (6.74B, 70.55B)."""
    assert memory.count_parameters(memory.REFERENCE_MODELS["7B decoder-only (Llama-2-7b)"])[0] == 6_738_415_616
    assert memory.count_parameters(memory.REFERENCE_MODELS["70B decoder-only (Llama-3.1-70B)"])[0] == 70_553_706_496


def test_command_line_table_of_a_config_file(model_dirs, capsys):
    assert memory.main(["--config", str(model_dirs["llama"] / "config.json"), "--gpus", "2", "--particles", "3"]) == 0
    out = capsys.readouterr().out
    assert "Computed from parameter counts, not measured" in out
    rows = [line for line in out.splitlines() if line.startswith("| llama")]
    assert [row.split(" | ")[1] for row in rows] == ["0-2", "3", "3+offload"]


def test_zero3_counts_the_largest_layer_gathered_whole():
    """DeepSpeed gathers each layer's parameters whole before it runs (stage3_max_live_parameters caps only
    the prefetch): under ZeRO-3 the largest layer's weights are on the GPU besides the shard. The table had
    left them out ("at most stage3_max_live_parameters"), 2 GiB for the 70B's embedding or head in bf16."""
    kwargs = {"gpus": 4, "particles": 5, "prompt_length": 10, "largest_layer": 300}
    assert memory.footprint(1001, 8, stage="0-2", **kwargs).gathered == 0  # (the whole backbone is there)
    for stage in ("3", "3+offload"):
        f = memory.footprint(1001, 8, stage=stage, **kwargs)
        assert f.gathered == 600 and f.total == f.backbone + 1600 + 3200 + 4800 + 600
    with pytest.raises(ValueError, match="largest_layer"):
        memory.footprint(1001, 8, stage="3", gpus=4, particles=5, prompt_length=10, largest_layer=2000)
    count, hidden, largest = memory.model_sizes(memory.REFERENCE_MODELS["70B decoder-only (Llama-3.1-70B)"])
    assert (hidden, largest) == (8192, 128256 * 8192)  # the embedding (and the head)


def test_an_untied_t5_config_counts_its_lm_head(model_dirs):
    """transformers 5 builds T5 with lm_head tied to the shared embedding whatever the config says, while a
    T5 v1.1 checkpoint (tie_word_embeddings false) holds a separate lm_head, which from_pretrained keeps:
    T5-XXL had counted 11.00B for its 11.14B."""
    config = json.loads((model_dirs["t5"] / "config.json").read_text())
    tied = memory.count_parameters(dict(config, tie_word_embeddings=True))[0]
    untied = memory.count_parameters(dict(config, tie_word_embeddings=False))[0]
    assert untied - tied == config["vocab_size"] * config["d_model"]
    assert memory.count_parameters(memory.REFERENCE_MODELS["T5-XXL (t5-v1_1-xxl)"])[0] == 11_135_332_352


def test_command_line_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "nomodel.json").write_text('{"hidden_size": 8}')
    for argv, message in (
        (["--gpus", "0"], "must be at least 1, got 0"),
        (["--particles", "-2"], "must be at least 1, got -2"),
        (["--config", str(tmp_path / "nomodel.json")], "naming its model_type"),
        (["--config", str(tmp_path)], "not a readable config.json"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            memory.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
