"""python -m bmt_fast.tasks: the task table, and loading local files with --data-dir."""

from pathlib import Path

import pytest

from bmt_fast.tasks.__main__ import main

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def test_without_tasks_it_prints_the_task_table(capsys):
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["task", "hub", "id"]
    rte = next(line for line in lines if line.startswith("rte "))
    assert rte.split()[:4] == ["rte", "nyu-mll/glue", "rte", "accuracy"]
    assert any(line.startswith("stsb ") and line.endswith("score as a number") for line in lines)


def test_data_dir_loads_and_shows_examples(capsys):
    assert main(["--data-dir", str(FIXTURES), "--show", "1", "rte", "synthetic/target"]) == 0
    out = capsys.readouterr().out
    assert "rte validation: 4 examples" in out
    assert "  input:  rte sentence1: The festival drew ten thousand visitors." in out
    assert "  target: entailment" in out
    assert "synthetic/target validation: 64 examples" in out


def test_missing_files_and_unknown_tasks_fail_with_a_message(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "rte", "no_such_task"]) == 1
    err = capsys.readouterr().err
    assert "error: rte: no validation file for task 'rte'" in err
    assert "error: no_such_task: unknown task" in err


def test_an_empty_file_and_a_negative_count_fail_with_a_message(tmp_path, capsys):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text("")
    assert main(["--data-dir", str(tmp_path), "--split", "train", "sst2", "rte"]) == 1
    err = capsys.readouterr().err
    assert f"error: sst2: task 'sst2': {tmp_path / 'sst2' / 'train.jsonl'} is empty" in err
    assert "error: rte: no train file" in err  # the next task is still looked at
    with pytest.raises(SystemExit) as exit_info:
        main(["--show", "-1", "rte"])
    assert exit_info.value.code == 2 and "--show: must be >= 0, got -1" in capsys.readouterr().err


def test_a_malformed_file_fails_with_a_message_and_the_next_task_is_loaded(tmp_path, capsys):
    """A line that is no JSON: `datasets` raises its DatasetGenerationError, which the command had let out as a
    traceback, leaving the tasks after it unchecked (the trainer's checks report it: load_examples)."""
    (tmp_path / "rte").mkdir()
    good = (FIXTURES / "rte" / "validation.jsonl").read_text()
    (tmp_path / "rte" / "validation.jsonl").write_text(good + "{not json\n")
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "validation.jsonl").write_text((FIXTURES / "squad" / "validation.jsonl").read_text())
    assert main(["--data-dir", str(tmp_path), "rte", "squad"]) == 1
    captured = capsys.readouterr()
    assert "error: rte: DatasetGenerationError: " in captured.err and "JSON parse error" in captured.err
    assert "squad validation: 4 examples" in captured.out


def test_a_data_dir_whose_name_reads_as_a_glob(tmp_path, capsys):
    """`datasets` reads data_files as glob patterns: a folder named "data[v1]" had matched nothing (a
    character class) and the JSON loader stopped with a bare StopIteration."""
    for name in ("data[v1]", "data*x", "data{a}?"):
        folder = tmp_path / name / "rte"
        folder.mkdir(parents=True)
        (folder / "validation.jsonl").write_text((FIXTURES / "rte" / "validation.jsonl").read_text())
        assert main(["--data-dir", str(tmp_path / name), "rte"]) == 0, name
        assert "rte validation: 4 examples" in capsys.readouterr().out
