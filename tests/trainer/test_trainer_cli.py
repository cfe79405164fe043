"""`bmt-fast` end to end on a tiny Llama: transfer, eval, plot."""

from __future__ import annotations

import json

import pytest
import torch
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
    row = json.loads((run_dir / "results.json").read_text())["bmtpt"]
    assert row["split"] == "train" and row["method"] == "bmtpt"  # the keys of target's rows
    assert row["eval_settings"] == {"split": "train", "max_eval_examples": 4, "max_new_tokens": 16}
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


def test_plot_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    """--out names the folder of the PNGs: a file there (or above it) had been a FileExistsError traceback."""
    (tmp_path / "run").mkdir()
    (tmp_path / "plot.png").write_bytes(b"a file")
    for out in (tmp_path / "plot.png", tmp_path / "plot.png" / "sub"):
        assert main(["plot", str(tmp_path / "run"), "--out", str(out)]) == 2
        assert f"error: {out} is not a folder: the plots are several PNGs" in capsys.readouterr().err
    assert (tmp_path / "plot.png").read_bytes() == b"a file"


def test_plot_of_damaged_or_empty_run_folders(tmp_path, capsys):
    """A damaged record file is a one-line error (exit 2), not a traceback; a folder with nothing to plot
    says so, and a plot of an earlier state of the folder that has no data any more is removed."""
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    (run / "plots" / "source_loss.png").write_bytes(b"an earlier plot")
    assert main(["plot", str(run)]) == 0
    assert "holds no metrics or evaluations yet" in capsys.readouterr().err
    assert not (run / "plots" / "source_loss.png").exists()
    (run / "source-bmtpt").mkdir()
    (run / "source-bmtpt" / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    assert main(["plot", str(run)]) == 2
    assert "metrics.jsonl, line 2: not a JSON record" in capsys.readouterr().err
    (run / "source-bmtpt" / "metrics.jsonl").unlink()
    (run / "target-bmtpt").mkdir()
    (run / "target-bmtpt" / "eval.json").write_text('{"accuracy": 0.5')
    assert main(["plot", str(run)]) == 2
    assert "eval.json: not valid JSON" in capsys.readouterr().err


def test_plot_of_foreign_record_files_and_unreadable_paths_is_a_one_line_error(tmp_path, capsys):
    """Lines that are JSON but no metrics record (a list, an object without an integer step), a file that is
    not text, a folder where a record file should be: one-line errors, exit 2 (AttributeError, KeyError,
    UnicodeDecodeError and IsADirectoryError tracebacks before); a folder that is no run gets no empty
    plots/ folder, and a file given as the run folder is named as such."""
    run = tmp_path / "run"
    (run / "source-bmtpt").mkdir(parents=True)
    metrics = run / "source-bmtpt" / "metrics.jsonl"
    for text, message in (
        ('{"step": 1}\n[1, 2]\n', "line 2: not a metrics record (a JSON object with an integer 'step')"),
        ('{"loss/a": 1.0}\n', "line 1: not a metrics record"),
        ('{"step": true}\n', "line 1: not a metrics record"),
    ):
        metrics.write_text(text)
        assert main(["plot", str(run)]) == 2
        assert message in capsys.readouterr().err
    metrics.write_bytes(b'{"step": 1, "loss/a": "\xff"}\n')
    assert main(["plot", str(run)]) == 2
    assert "metrics.jsonl: not a text file of JSON records" in capsys.readouterr().err
    metrics.unlink()
    metrics.mkdir()
    assert main(["plot", str(run)]) == 2
    assert "error: [Errno 21] Is a directory" in (err := capsys.readouterr().err) and "Traceback" not in err
    metrics.rmdir()
    (run / "target-x").mkdir()
    (run / "target-x" / "eval.json").write_bytes(b'{"accuracy": "\xff"}')
    assert main(["plot", str(run)]) == 2
    assert "eval.json: not valid JSON" in (err := capsys.readouterr().err) and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 0 and not (empty / "plots").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["plot", str(tmp_path / "afile")]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err


def _config(tmp_path, model_dirs, **changes):
    from conftest import merge

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(merge(base_dict(tmp_path / "run", model_dirs["llama"]), changes)))
    return ["--config", str(path)]


def test_results_cover_every_method_finished_in_the_run_folder(model_dirs, tmp_path, capsys):
    config = _config(tmp_path, model_dirs, source={"steps": 2}, target={"steps": 2})
    run_dir = tmp_path / "run"
    assert main(["transfer", *config]) == 0
    assert main(["target", *config, "target.methods=[prompt_tuning]"]) == 0
    table = capsys.readouterr().out
    assert "| prompt_tuning |" in table and "| bmtpt |" in table
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning", "bmtpt"]
    assert "| bmtpt |" in (run_dir / "results.md").read_text()
    # A method trained under other settings is no row of this configuration's table.
    # --overwrite removes the table with the stages (what a run that fails after the removal leaves: no rows
    # of removed methods), and the finished command writes it again
    from bmt_fast.transfer import Run
    from bmt_fast.transfer.config import load_config

    cfg = load_config(config[1], ["target.methods=[prompt_tuning]", "target.lr=0.2"])
    Run(cfg, "target", overwrite=True)
    assert not (run_dir / "results.json").exists() and not (run_dir / "results.md").exists()
    assert not (run_dir / "target-prompt_tuning").exists() and (run_dir / "target-bmtpt").is_dir()
    assert main(["target", *config, "target.methods=[prompt_tuning]", "target.lr=0.2", "--overwrite"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning"]
    # `source --overwrite` keeps the rows its source stage did not change (test_source_keeps_the_rows_...):
    # prompt_tuning's, trained under target.lr=0.2, which the source stage never reads
    assert main(["source", *config, "--overwrite"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning"]
    assert "| prompt_tuning |" in (run_dir / "results.md").read_text()
    # `eval` replaces the table by what it evaluated (maybe on another split), as documented.
    assert main(["eval", *config, "--split", "train"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["bmtpt"]


def test_settings_a_method_does_not_read_do_not_block_its_stages(model_dirs, tmp_path, capsys):
    """A change of a setting a stage's method never reads had refused to reuse or resume it: SPoT's source
    for another source.num_particles (one prompt per task), prompt_tuning for another target.kde_weight (no
    source, no prior) or target.selection_examples (spot_best's), a bmtpt row of the table for another
    target.particle_index (bmtpt_particle's); SPoT's for source.backend (no SVGD) or a likelihood_scale of the
    same coefficients. Settings the method reads still count."""
    config = _config(tmp_path, model_dirs, source={"steps": 2, "method": "spot"},
                     target={"steps": 2, "methods": ["prompt_tuning", "bmtpt"]})  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["source", *config]) == 0
    assert main(["source", *config, "source.num_particles=5", "--resume"]) == 0
    # nor SVGD's backend in a gradient source, nor a likelihood scale with the same coefficients (c = 1)
    assert main(["source", *config, "source.backend=torch", "source.likelihood_scale=batch", "--resume"]) == 0
    assert main(["source", *config, "source.likelihood_scale=1.0", "--resume"]) == 0
    assert main(["source", *config, "source.likelihood_scale=dataset", "--resume"]) == 2  # (c = N_k)
    assert "the configuration changed (source.likelihood_scale: 'mean' -> 'dataset')" in capsys.readouterr().err
    assert main(["source", *config, "source.lr=0.5", "--resume"]) == 2  # read: refused
    assert "the configuration changed (source.lr: " in capsys.readouterr().err
    assert main(["transfer", *config]) == 0
    unread = ["target.selection_examples=3", "target.particle_index=1"]  # read by neither method
    assert main(["target", *config, "target.methods=[prompt_tuning]", *unread, "target.kde_weight=0.5", "--resume"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning"]  # (bmtpt reads it)
    assert main(["target", *config, "target.methods=[prompt_tuning]", *unread, "--resume"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning", "bmtpt"]
    capsys.readouterr()
    assert main(["target", *config, "target.methods=[bmtpt]", "target.kde_weight=0.5", "--resume"]) == 2
    assert "the configuration changed (target.kde_weight: 0.0 -> 0.5); " in capsys.readouterr().err
    # nor a prior's bandwidth without the prior (kde_weight 0), nor the other prompt init's setting
    assert main(["target", *config, "target.methods=[bmtpt]", "target.kde_bandwidth=0.3", "prompt.init_std=0.5",
                 "--resume"]) == 0  # fmt: skip
    assert main(["source", *config, "prompt.init_std=0.5", "--resume"]) == 0
    assert main(["source", *config, "prompt.vocab_top_k=7", "--resume"]) == 2  # (the vocab init reads it)
    assert "the configuration changed (prompt.vocab_top_k: " in capsys.readouterr().err


def test_targets_from_other_source_particles_are_stale(model_dirs, tmp_path, capsys):
    """A target stage records the particles it started from: once the source stage's particles differ (a
    source trained again on data changed outside the configuration, or resumed with more steps), the target
    is refused for resume and left out of the table, which `source` writes again (a resumed source had left
    the stale bmtpt row in it, and `--overwrite` had written such rows back)."""
    from safetensors.torch import load_file, save_file

    config = _config(tmp_path, model_dirs, source={"steps": 2}, target={"steps": 2, "methods": ["bmtpt", "prompt_tuning"]})
    run_dir = tmp_path / "run"
    assert main(["transfer", *config]) == 0
    assert sorted(json.loads((run_dir / "results.json").read_text())) == ["bmtpt", "prompt_tuning"]
    particles = run_dir / "source-bmtpt" / "particles.safetensors"
    original = particles.read_bytes()
    save_file({"particles": load_file(particles)["particles"] + 0.01}, particles, metadata={"method": "bmtpt"})
    capsys.readouterr()
    assert main(["target", *config, "--resume"]) == 2
    assert f"{particles} changed since it trained (its source stage was trained again)" in capsys.readouterr().err
    assert main(["eval", *config]) == 2  # (only the prompts trained from these particles and settings)
    assert "cannot use " in capsys.readouterr().err
    assert main(["eval", *config, "target.methods=[prompt_tuning]"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning"]
    particles.write_bytes(original)  # the particles it trained from: current again
    assert main(["target", *config, "--resume"]) == 0
    assert sorted(json.loads((run_dir / "results.json").read_text())) == ["bmtpt", "prompt_tuning"]
    # more source steps: the source trains, and the table it writes leaves the bmtpt row out
    assert main(["source", *config, "source.steps=3", "--resume"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning"]
    assert "| bmtpt |" not in (run_dir / "results.md").read_text()


def test_a_folder_written_another_way_is_the_same_configuration(model_dirs, tmp_path, capsys):
    """model.name_or_path (data.data_dir, model.tokenizer alike) compared as strings had refused a stage for
    `./models/t5` against `models/t5` or its absolute path; folders that exist are compared as real paths."""
    import os

    config = _config(tmp_path, model_dirs, source={"steps": 2})
    assert main(["source", *config]) == 0
    for written in (f"{model_dirs['llama']}/.", os.path.relpath(model_dirs["llama"])):
        assert main(["source", *config, f"model.name_or_path={written}", "--resume"]) == 0, capsys.readouterr().err
    assert main(["source", *config, f"model.name_or_path={model_dirs['t5']}", "--resume"]) == 2
    assert "the configuration changed (model.name_or_path: " in capsys.readouterr().err


def test_a_folder_is_the_one_it_was_at_training_time(model_dirs, tmp_path, monkeypatch, capsys):
    """The real path compared is the one recorded when the stage trained: a link pointed elsewhere since, or
    the same relative path from another directory, is another folder (both had been re-resolved now, so a
    stage trained on one backbone was taken as trained on another)."""
    import os

    link = tmp_path / "current"
    link.symlink_to(model_dirs["llama"])
    config = _config(tmp_path, model_dirs, source={"steps": 2})
    assert main(["source", *config, f"model.name_or_path={link}"]) == 0
    link.unlink()
    link.symlink_to(model_dirs["t5"])
    for path in (link, model_dirs["t5"]):
        assert main(["source", *config, f"model.name_or_path={path}", "--resume"]) == 2
        assert "the configuration changed (model.name_or_path: " in capsys.readouterr().err
    # the same relative path from two directories
    for name, kind in (("a", "llama"), ("b", "t5")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model").symlink_to(model_dirs[kind])
    monkeypatch.chdir(tmp_path / "a")
    assert main(["source", *config, "model.name_or_path=model", "--overwrite"]) == 0
    monkeypatch.chdir(tmp_path / "b")
    assert main(["source", *config, "model.name_or_path=model", "--resume"]) == 2
    assert "the configuration changed (model.name_or_path: " in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "a")
    assert main(["source", *config, f"model.name_or_path={os.path.realpath(model_dirs['llama'])}", "--resume"]) == 0


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which JSON does not have")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_non_finite_metrics_are_null_in_valid_json_and_reported(model_dirs, tmp_path, capsys, caplog):
    # float16 activations overflow with a prompt of norm ~1e6: the evaluation loss of the initial prompt (no
    # training step: one would stop the stage, see the next test) is not finite
    config = _config(
        tmp_path,
        model_dirs,
        model={"dtype": "float16"},
        prompt={"init": "normal", "init_std": 1.0e6},
        target={"methods": ["prompt_tuning"], "steps": 0},
    )
    with caplog.at_level("WARNING"):
        assert main(["target", *config]) == 0
    eval_json = _strict_json(tmp_path / "run" / "target-prompt_tuning" / "eval.json")
    # the ranking of label words by NLLs that are not finite is no accuracy either (it had been 0 <= x <= 1)
    assert eval_json["loss"] is None and eval_json["accuracy"] is None
    assert _strict_json(tmp_path / "run" / "results.json") == {"prompt_tuning": eval_json}
    assert "| prompt_tuning | " in capsys.readouterr().out and "n/a" in (tmp_path / "run" / "results.md").read_text()
    assert "target prompt_tuning: loss, accuracy not finite" in caplog.text


@pytest.mark.parametrize("command,stage", [("source", "source bmtpt"), ("target", "target prompt_tuning")])
def test_a_diverged_stage_stops_with_its_step_and_latest_checkpoint(model_dirs, tmp_path, capsys, command, stage):
    """Overflowing float16 activations (a prompt of norm ~1e6) give NaN/Inf gradients at the first step: the
    stage stops there with a message (no traceback, exit code 1) instead of stepping Adam with them (the
    gradient rule and the target prompt went on as NaN; SVGD raised its input error without context), and
    no particles or prompt are written."""
    config = _config(
        tmp_path,
        model_dirs,
        model={"dtype": "float16"},
        prompt={"init": "normal", "init_std": 1.0e6},
        source={"steps": 3},
        target={"methods": ["prompt_tuning"], "steps": 3},
    )
    assert main([command, *config]) == 1
    err = capsys.readouterr().err
    assert f"bmt-fast {command}: training diverged: {stage}: step 1: " in err, err
    scores = "the particles' scores" if command == "source" else "the target prompt's gradients"
    assert f"{scores} hold " in err and "NaN/Inf value(s)" in err and "no checkpoint was written" in err
    assert "Traceback" not in err
    folder = tmp_path / "run" / ("source-bmtpt" if command == "source" else "target-prompt_tuning")
    assert not list(folder.glob("*.safetensors")) and not (folder / "eval.json").exists()


def test_errors_of_the_user_are_messages_not_tracebacks(model_dirs, tmp_path, capsys):
    config = _config(tmp_path, model_dirs, target={"methods": ["prompt_tuning"]})
    (tmp_path / "bad.safetensors").write_text("not a safetensors file")
    assert main(["eval", *config, "--prompt", str(tmp_path / "bad.safetensors")]) == 2
    assert f"{tmp_path / 'bad.safetensors'} is not a safetensors file" in capsys.readouterr().err
    assert main(["eval", *config, "--split", "nope"]) == 2
    assert "--split nope: task 'product_sentiment' has no split 'nope'" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("source: {steps: [1,\n")
    assert main(["source", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "broken.yaml is not valid YAML" in capsys.readouterr().err
    # an output_dir that is a file (or under one): mkdir's traceback had come after the checks
    (tmp_path / "file").write_text("")
    for out in ("file", "file/run"):
        assert main(["source", *config, f"output_dir={tmp_path / out}"]) == 2
        err = capsys.readouterr().err
        assert f"output_dir: {tmp_path / 'file'} is a file, not a folder" in err and "Traceback" not in err


def test_plot_skips_a_last_metrics_line_cut_short(model_dirs, tmp_path, capsys):
    config = _config(tmp_path, model_dirs, source={"steps": 2})
    assert main(["source", *config]) == 0
    with (tmp_path / "run" / "source-bmtpt" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "spre')
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert sorted(p.rsplit("/", 1)[-1] for p in capsys.readouterr().out.split()) == [
        "particle_spread.png",
        "source_loss.png",
    ]


def test_eval_refuses_prompts_trained_under_another_configuration(model_dirs, tmp_path, capsys):
    """`eval` of a run folder's prompts takes the configuration they were trained with (evaluation settings
    may differ): another backbone, prompt length or seed is refused before anything is read or written (the
    results table was replaced by an evaluation on whatever the config named)."""
    config = _config(tmp_path, model_dirs, source={"steps": 2}, target={"steps": 2})
    run_dir = tmp_path / "run"
    assert main(["transfer", *config]) == 0
    table = (run_dir / "results.json").read_text()
    capsys.readouterr()
    for change in ("seed=5", "target.lr=0.5", f"model.name_or_path={model_dirs['t5']}"):
        assert main(["eval", *config, change]) == 2
        err = capsys.readouterr().err
        assert "cannot use" in err and "target-bmtpt: the configuration changed" in err, err
        assert (run_dir / "results.json").read_text() == table
    assert main(["eval", *config, "data.max_eval_examples=4"]) == 0  # an evaluation setting: evaluated


def test_a_stage_of_no_steps_resumes_like_any_other(model_dirs, tmp_path, capsys):
    """source.steps=0 keeps the starting particles as checkpoint 0 with the configuration: `--resume` with
    more steps trains on from them, with other settings it is refused (the stage had no checkpoint and was
    taken as it was: untrained particles under source.steps=3)."""
    from bmt_fast.transfer.runner import load_particles

    config = _config(tmp_path, model_dirs, source={"steps": 0})
    stage = tmp_path / "run" / "source-bmtpt"
    assert main(["source", *config]) == 0
    start = load_particles(stage)
    assert main(["source", *config, "--resume", "source.steps=3", "source.lr=0.5"]) == 2
    assert "the configuration changed (source.lr: 0.05 -> 0.5)" in capsys.readouterr().err
    assert main(["source", *config, "--resume", "source.steps=3"]) == 0
    assert not torch.equal(load_particles(stage), start)
    assert json.loads((stage / "source.json").read_text())["steps"] == 3


def test_export_peft_turned_on_with_resume_exports_finished_targets(model_dirs, tmp_path, capsys):
    """target.export_peft is a resumable change: `--resume target.export_peft=true` had done nothing for a
    target finished without it (no peft/ folder, no word). Now the finished prompt is exported, as training
    would have; a complete peft/ folder is left as it is."""
    from bmt_fast.transfer.runner import PROMPT_FILE, read_prompt

    config = _config(tmp_path, model_dirs, source={"steps": 1}, target={"steps": 1, "export_peft": False})
    stage = tmp_path / "run" / "target-prompt_tuning"
    assert main(["target", *config, "target.methods=[prompt_tuning]"]) == 0
    assert not (stage / "peft").exists()
    assert main(["target", *config, "target.methods=[prompt_tuning]", "target.export_peft=true", "--resume"]) == 0
    adapter = json.loads((stage / "peft" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 4
    assert torch.equal(read_prompt(stage / "peft"), read_prompt(stage / PROMPT_FILE))
    written = (stage / "peft" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["target", *config, "target.methods=[prompt_tuning]", "target.export_peft=true", "--resume"]) == 0
    assert (stage / "peft" / "adapter_model.safetensors").stat().st_mtime_ns == written
    # trained further without the export: the adapter of the earlier prompt goes (it had stayed, and the next
    # `--resume target.export_peft=true` had taken it as current: peft/ and prompt.safetensors differed)
    earlier = read_prompt(stage / PROMPT_FILE)
    assert main(["target", *config, "target.methods=[prompt_tuning]", "target.steps=2", "--resume"]) == 0
    assert not torch.equal(read_prompt(stage / PROMPT_FILE), earlier) and not (stage / "peft").exists()
    assert main(["target", *config, "target.methods=[prompt_tuning]", "target.steps=2", "target.export_peft=true",
                 "--resume"]) == 0  # fmt: skip
    assert torch.equal(read_prompt(stage / "peft"), read_prompt(stage / PROMPT_FILE))
    # an adapter of another prompt (copied in, or left by an older version) is exported again
    (stage / "peft" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert main(["target", *config, "target.methods=[prompt_tuning]", "target.steps=2", "target.export_peft=true",
                 "--resume"]) == 0  # fmt: skip
    assert torch.equal(read_prompt(stage / "peft"), read_prompt(stage / PROMPT_FILE))


def test_overwrite_removes_nothing_for_a_config_the_backbone_cannot_serve(model_dirs, tmp_path, capsys):
    """What the backbone's config and tokenizer refuse is found before --overwrite removes the stages and
    the table and writes config.yaml: a prompt.vocab_top_k of special tokens only ("no token left", raised
    when the stage drew its initial prompts), a tokenizer without an EOS token (a ValueError's traceback
    once the weights loaded)."""
    import shutil

    from transformers import AutoTokenizer

    config = _config(tmp_path, model_dirs, source={"steps": 1}, target={"steps": 1, "methods": ["prompt_tuning"]})
    run_dir = tmp_path / "run"
    assert main(["transfer", *config]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    no_eos = tmp_path / "no_eos"
    shutil.copytree(model_dirs["llama"], no_eos)
    tokenizer = AutoTokenizer.from_pretrained(no_eos)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(no_eos)
    capsys.readouterr()
    for command in ("source", "target", "transfer"):
        assert main([command, *config, "prompt.vocab_top_k=4", "--overwrite"]) == 2
        assert "prompt.vocab_top_k=4: no token left" in capsys.readouterr().err
        assert main([command, *config, f"model.tokenizer={no_eos}", "--overwrite"]) == 2
        assert "has no EOS token" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert main(["source", *config, "prompt.vocab_top_k=6", "--overwrite"]) == 0  # (ids 4, 5: not special)


def test_source_keeps_the_rows_of_targets_it_did_not_change(model_dirs, tmp_path, capsys, caplog):
    """`source` judges the table's rows by what each target stage recorded, not by its own target settings:
    it had removed the table for data.target_task=null and left out every row for another target.steps (its
    own stage reads neither). A row goes only where the target's inputs changed: the particles it started
    from (a source resumed with more steps), the backbone or the data."""
    import logging

    from bmt_fast.transfer import Run
    from bmt_fast.transfer.config import load_config

    config = _config(tmp_path, model_dirs, source={"steps": 2}, target={"steps": 2, "methods": ["bmtpt", "prompt_tuning"]})
    run_dir = tmp_path / "run"
    assert main(["transfer", *config]) == 0
    table = (run_dir / "results.json").read_text()
    assert list(json.loads(table)) == ["bmtpt", "prompt_tuning"]
    # the same particles again (bit for bit on the CPU): every row stays
    for change in ("data.target_task=null", "target.steps=3", "target.lr=0.5"):
        assert main(["source", *config, change, "--overwrite"]) == 0, change
        assert (run_dir / "results.json").read_text() == table, change
        assert "| bmtpt |" in (run_dir / "results.md").read_text()
    # a run that fails after --overwrite removed the source leaves no row of a target trained from it
    Run(load_config(config[1], ["data.target_task=null"]), "source", overwrite=True)
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning"]
    assert main(["source", *config]) == 0  # (trained again: not a row again until a target's table)
    assert main(["target", *config, "--resume"]) == 0
    assert (run_dir / "results.json").read_text() == table
    # other particles: the bmtpt row goes, prompt_tuning's (no source) stays
    with caplog.at_level(logging.INFO, logger="bmt_fast.transfer.runner"):
        assert main(["source", *config, "source.steps=3", "data.target_task=null", "--resume"]) == 0
    assert list(json.loads((run_dir / "results.json").read_text())) == ["prompt_tuning"]
    assert "| bmtpt |" not in (run_dir / "results.md").read_text()
    assert "leaving out bmtpt: " in caplog.text and "particles.safetensors changed since it trained" in caplog.text
    # another backbone setting: a target trained under the old one is no row of the run folder now
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bmt_fast.transfer.runner"):
        assert main(["source", *config, "model.max_source_length=30", "--overwrite"]) == 0
    assert not (run_dir / "results.json").exists() and not (run_dir / "results.md").exists()
    assert "its backbone or data changed (model.max_source_length: 32 -> 30)" in caplog.text


def test_demo_checks_its_outputs_before_training(tmp_path, capsys):
    """--output-json naming a folder had failed after the whole demo (about 15 minutes), with a traceback
    and the table unprinted: now a one-line error before the backbone is even looked for."""
    import time

    (tmp_path / "taken").mkdir()
    started = time.perf_counter()
    code = main(["demo", "--quick", "--out-dir", str(tmp_path / "demo"), "--output-json", str(tmp_path / "taken")])
    assert code == 2 and time.perf_counter() - started < 30
    err = capsys.readouterr().err
    assert "--output-json is a folder" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # (nothing made)
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--out-dir", str(tmp_path / "file")], "--out-dir is a file"),
                          (["--output-json", str(tmp_path / "file" / "r.json")], "is a file, not a folder")):  # fmt: skip
        assert main(["demo", "--quick", *argv]) == 2
        assert message in capsys.readouterr().err, argv


def test_another_target_task_in_an_output_dir_of_its_own(model_dirs, tmp_path, capsys):
    """configs/paper_t5_base.yaml had described a second target task in the same output_dir, where the first
    task's target-<method>/ folders (named by method) refuse it, or --overwrite replaces them. The way it
    describes now: an output_dir of its own with the finished source stages copied in, which `target` uses as
    they are. eval.json and the table's rows record the target task (an eval.json written before that is
    read as it is)."""
    import shutil

    methods = ["bmtpt", "prompt_tuning"]
    config = _config(tmp_path, model_dirs, source={"steps": 1}, target={"steps": 1, "methods": methods})
    first, second = tmp_path / "run", tmp_path / "topic"
    assert main(["transfer", *config]) == 0
    capsys.readouterr()
    assert main(["target", *config, "data.target_task=topic"]) == 2
    assert "already has results" in capsys.readouterr().err
    second.mkdir()
    shutil.copytree(first / "source-bmtpt", second / "source-bmtpt")
    assert main(["target", *config, f"output_dir={second}", "data.target_task=topic"]) == 0
    assert sorted(p.name for p in second.iterdir()) == [
        "config.yaml", "results.json", "results.md", "source-bmtpt", "target-bmtpt", "target-prompt_tuning"
    ]  # fmt: skip
    for folder, task in ((first, "product_sentiment"), (second, "topic")):
        for method in ("bmtpt", "prompt_tuning"):
            assert json.loads((folder / f"target-{method}" / "eval.json").read_text())["task"] == task
            assert json.loads((folder / "results.json").read_text())[method]["task"] == task
    assert main(["eval", *config, f"output_dir={second}", "data.target_task=topic"]) == 0
    assert json.loads((second / "results.json").read_text())["bmtpt"]["task"] == "topic"
    # an eval.json of before (no "task"): taken as it is, by `target --resume` and in the table
    eval_file = first / "target-bmtpt" / "eval.json"
    old = {k: v for k, v in json.loads(eval_file.read_text()).items() if k != "task"}
    eval_file.write_text(json.dumps(old))
    assert main(["target", *config, "target.methods=[prompt_tuning]", "--resume"]) == 0
    assert json.loads((first / "results.json").read_text())["bmtpt"] == old
    assert main(["target", *config, "--resume"]) == 0
    assert json.loads((first / "results.json").read_text())["bmtpt"] == old


def test_a_config_file_in_its_output_dir_is_not_overwritten(model_dirs, tmp_path, caplog, monkeypatch):
    """A command writes its configuration to <output_dir>/config.yaml; where that was the --config file itself
    (a config kept in its run folder) the run had rewritten it silently, also where nothing changed: its
    comments gone. Now a file that holds the command's configuration is left as it is; overrides that change
    it are recorded there, the run's record, with a warning naming the file; a config file elsewhere takes
    overrides, and config.yaml records them, as before."""
    from bmt_fast.transfer.config import load_config
    from conftest import merge

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "config.yaml"
    settings = {"source": {"steps": 1}, "target": {"steps": 1, "methods": ["prompt_tuning"]}}
    text = "# my experiment\n" + yaml.safe_dump(merge(base_dict(run_dir, model_dirs["llama"]), settings))
    path.write_text(text)
    assert main(["source", "--config", str(path)]) == 0
    assert main(["source", "--config", str(path), "seed=0", "--resume"]) == 0  # (the same configuration)
    assert path.read_text() == text
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert main(["source", "--config", "run/config.yaml", "source.steps=2", "--resume"]) == 0
    assert f"{path}, the --config file, is rewritten with this command's configuration (source.steps" in caplog.text
    assert load_config(path).source.steps == 2 and "# my experiment" not in path.read_text()
    path.write_text(text.replace("steps: 1\n", "steps: 2\n", 1))  # (the source's steps: the file as the run now is)
    text = path.read_text()
    from safetensors.torch import save_file

    save_file({"prompt": torch.randn(4, 32)}, str(tmp_path / "prompt.safetensors"))
    prompt = ["--prompt", str(tmp_path / "prompt.safetensors")]
    assert main(["eval", "--config", str(path), "data.max_eval_examples=4", *prompt]) == 0  # (writes no config)
    assert path.read_text() == text
    elsewhere = tmp_path / "exp.yaml"
    elsewhere.write_text(text)
    assert main(["source", "--config", str(elsewhere), "source.steps=2", "--resume"]) == 0
    assert load_config(path).source.steps == 2 and "# my experiment" not in path.read_text()


def test_eval_of_a_prompt_file_needs_no_source_tasks(model_dirs, tmp_path, capsys):
    """`eval --prompt FILE` evaluates that file on the target task and reads no source stage, but had required
    data.source_tasks (for the source stages of target.methods, which it never reads). Without --prompt it
    evaluates the run's prompts, checked against their source stages: there the tasks are still required."""
    from safetensors.torch import save_file

    data = base_dict(tmp_path / "run", model_dirs["llama"])
    del data["data"]["source_tasks"]
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    save_file({"prompt": torch.randn(4, 32)}, str(tmp_path / "prompt.safetensors"))
    assert main(["eval", "--config", str(path), "--prompt", str(tmp_path / "prompt.safetensors")]) == 0
    assert "| prompt.safetensors |" in capsys.readouterr().out
    assert main(["eval", "--config", str(path)]) == 2
    assert "data.source_tasks must name at least one task" in capsys.readouterr().err
