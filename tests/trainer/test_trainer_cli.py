"""`bmt-fast` end to end on a tiny Llama: transfer, eval, plot."""

from __future__ import annotations

import json

import yaml

from bmt_fast.cli import main
from conftest import base_dict


def test_transfer_eval_plot(model_dirs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_dict(run_dir, model_dirs["llama"])))
    methods = "target.methods=[bmtpt, spot_mean, prompt_tuning]"
    assert main(["transfer", "--config", str(config), methods, "target.eval_every=2"]) == 0
    table = capsys.readouterr().out
    for method in ("bmtpt", "spot_mean", "prompt_tuning"):
        assert f"| {method} |" in table
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {"bmtpt", "spot_mean", "prompt_tuning"}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["target"]["eval_every"] == 2

    assert main(["transfer", "--config", str(config), methods]) == 2  # finished stages are not clobbered
    assert "--resume" in capsys.readouterr().err
    assert main(["transfer", "--config", str(config), methods, "--resume"]) == 0  # finished: nothing to redo
    capsys.readouterr()

    assert main(["eval", "--config", str(config), methods, "--prompt", str(run_dir / "target-bmtpt" / "peft")]) == 0
    assert "| peft |" in capsys.readouterr().out
    assert main(["eval", "--config", str(config), methods, "--split", "train", "data.max_eval_examples=4"]) == 0
    assert json.loads((run_dir / "results.json").read_text())["bmtpt"]["split"] == "train"
    capsys.readouterr()

    assert main(["plot", str(run_dir)]) == 0
    written = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["particle_spread.png", "source_loss.png", "target_loss.png", "target_metrics.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
