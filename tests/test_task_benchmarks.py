"""The benchmark tasks end to end: hub-schema fixture files -> datasets' JSON loader -> formatter -> metrics.

Fixture labels are listed next to each hand-computed score.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bmt_fast.tasks import benchmarks, get_task, task_names
from bmt_fast.tasks.base import Example

FIXTURES = Path(__file__).parent / "fixtures" / "data"
BENCHMARK_NAMES = [task.name for task in benchmarks.BENCHMARK_TASKS]
EXPORT = "hf://datasets/aps/super_glue@refs/convert/parquet"  # the hub's Parquet copy of SuperGLUE


@pytest.fixture(scope="module", autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory):
    """datasets writes an Arrow cache of every file it loads: keep it out of the user's cache."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


def load(name, split="validation"):
    return get_task(name).load(split, data_dir=FIXTURES)


def test_registry_holds_the_paper_tasks_with_real_hub_ids():
    expected = {
        "cola": ("nyu-mll/glue", "cola"), "sst2": ("nyu-mll/glue", "sst2"), "mrpc": ("nyu-mll/glue", "mrpc"),
        "qqp": ("nyu-mll/glue", "qqp"), "stsb": ("nyu-mll/glue", "stsb"), "mnli": ("nyu-mll/glue", "mnli"),
        "qnli": ("nyu-mll/glue", "qnli"), "rte": ("nyu-mll/glue", "rte"),
        "boolq": ("aps/super_glue", "boolq"), "cb": ("aps/super_glue", "cb"), "copa": ("aps/super_glue", "copa"),
        "multirc": ("aps/super_glue", "multirc"), "wic": ("aps/super_glue", "wic"),
        "wsc": ("aps/super_glue", "wsc.fixed"), "record": ("aps/super_glue", "record"),
        "squad": ("rajpurkar/squad", "plain_text"),
    }
    assert set(expected) <= set(task_names())
    for name, (hub_path, hub_config) in expected.items():
        task = get_task(name)
        assert (task.hub_path, task.hub_config) == (hub_path, hub_config), name
    assert set(benchmarks.SOURCE_TASKS) == {"mnli", "qnli", "qqp", "sst2", "squad", "record"}
    assert set(benchmarks.TARGET_TASKS) == set(benchmarks.GLUE_TASKS) | set(benchmarks.SUPER_GLUE_TASKS)


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_fixture_formats_into_text_to_text_examples(name, split):
    task = get_task(name)
    examples = load(name, split)
    assert examples
    for example in examples:
        assert example.input_text.startswith(name + " ")
        assert example.target_text
        if task.is_classification:
            assert example.target_text == task.label_words[example.label]
        elif example.answers:
            assert example.target_text == example.answers[0]
        else:
            assert float(example.target_text) == pytest.approx(example.label, abs=0.1 + 1e-9)  # STS-B: nearest 0.2


def _perfect_predictions(task, examples):
    if task.is_classification or any(e.answers for e in examples):
        return [e.target_text for e in examples]
    return [repr(e.label) for e in examples]  # STS-B: the unrounded gold score


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_every_metric_is_perfect_on_gold_predictions_and_drops_on_wrong_ones(name):
    task = get_task(name)
    examples = load(name)
    perfect = task.compute_metrics(_perfect_predictions(task, examples), examples)
    assert list(perfect) == list(task.metric_names)
    assert all(value == pytest.approx(1.0) for value in perfect.values()), perfect
    wrong = task.compute_metrics(["@@ no answer @@"] * len(examples), examples)
    assert all(value < 1.0 for value in wrong.values()), wrong


def test_cola_matthews_by_hand():
    examples = load("cola")  # labels 1, 0, 1, 1, 0
    predictions = ["acceptable", "unacceptable", "unacceptable", "acceptable", "acceptable"]
    # tp 2, tn 1, fp 1, fn 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2)
    assert get_task("cola").compute_metrics(predictions, examples) == {"matthews_corrcoef": pytest.approx(1 / 6)}
    constant = get_task("cola").compute_metrics(["acceptable"] * 5, examples)
    assert constant["matthews_corrcoef"] == 0.0


def test_mrpc_f1_of_the_equivalent_class_by_hand():
    examples = load("mrpc")  # labels 1, 0, 1, 1, 0
    scores = get_task("mrpc").compute_metrics(["equivalent"] * 5, examples)
    assert scores == {"f1": pytest.approx(6 / 8), "accuracy": pytest.approx(3 / 5)}  # tp 3, fp 2, fn 0


def test_qqp_accuracy_and_f1_by_hand():
    examples = load("qqp")  # labels 0, 1, 1, 0
    scores = get_task("qqp").compute_metrics(["duplicate", "duplicate", "not_duplicate", "not_duplicate"], examples)
    assert scores == {"accuracy": pytest.approx(0.5), "f1": pytest.approx(0.5)}  # tp 1, fp 1, fn 1


def test_stsb_targets_round_to_a_fifth_and_correlations_by_hand():
    task = get_task("stsb")
    examples = load("stsb")  # scores 4.8, 0.4, 2.5, 3.75, 1.0
    assert [e.target_text for e in examples] == ["4.8", "0.4", "2.4", "3.8", "1.0"]
    assert [e.label for e in examples] == pytest.approx([4.8, 0.4, 2.5, 3.75, 1.0])
    # T5's preprocessor: tf.round(label * 5) / 5 on the float32 label, halves to even (tf.round), printed
    # with one decimal: numpy's float32 arithmetic and round-half-even as the oracle
    np = pytest.importorskip("numpy")
    scores = [i / 10 for i in range(51)] + [i / 100 for i in range(501)] + [0.4333, 2.6667, 4.125, 1e-9]

    def t5(score):
        return "%.1f" % (np.round(np.float32(score) * np.float32(5)) / np.float32(5))

    assert [task.target_text(t) for t in scores] == [t5(t) for t in scores]
    assert [task.target_text(t) for t in (0.1, 0.3, 0.5, 1.3, 2.5, 4.5)] == ["0.0", "0.4", "0.4", "1.2", "2.4", "4.4"]
    with pytest.raises(ValueError, match=r"label 7.5 is outside the scores' range \[0, 5\]"):
        task.format({"sentence1": "a", "sentence2": "b", "label": 7.5})
    scores = task.compute_metrics(["4.0", "1", " 2.0 ", "3.0", "very similar"], examples)
    # the unparsable prediction scores -1: x = (4, 1, 2, 3, -1); deviations from 1.8 and from 2.49:
    # sxy = 12.44, sxx = 14.8, syy = 13.512; ranks (5, 2, 3, 4, 1) vs (5, 1, 3, 4, 2): 1 - 6*2/(5*24)
    assert scores["pearson"] == pytest.approx(12.44 / math.sqrt(14.8 * 13.512))
    assert scores["spearman"] == pytest.approx(0.9)


def test_mnli_validation_is_the_matched_section_and_mismatched_is_there_too():
    assert [e.label for e in load("mnli", "validation")] == [0, 1, 2]
    assert [e.label for e in load("mnli", "validation_matched")] == [0, 1, 2]
    assert [e.target_text for e in load("mnli", "validation_mismatched")] == ["contradiction", "entailment", "neutral"]


def test_cb_accuracy_and_macro_f1_by_hand():
    examples = load("cb")  # labels 0, 1, 1, 2, 0, 1
    words = get_task("cb").label_words
    scores = get_task("cb").compute_metrics([words[i] for i in (0, 0, 1, 2, 2, 1)], examples)
    # per-class F1: 1/2, 4/5, 2/3 (see test_task_metrics.test_f1_macro_by_hand)
    assert scores == {"accuracy": pytest.approx(4 / 6), "f1_macro": pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)}


def test_multirc_groups_answer_options_by_question():
    examples = load("multirc")  # questions 0-0 (True, False, True), 0-1 (False, False), 1-0 (True)
    assert [e.group for e in examples] == ["0-0", "0-0", "0-0", "0-1", "0-1", "1-0"]
    predictions = ["True", "False", "False", "False", "false", "True"]  # case is ignored
    scores = get_task("multirc").compute_metrics(predictions, examples)
    assert scores == {"f1a": pytest.approx(0.8), "exact_match": pytest.approx(2 / 3)}


def test_a_row_limit_keeps_whole_multirc_questions():
    """max_*_examples cut after the 4th row kept one of question 0-1's two options, which then counted as
    exactly right from that option alone; ungrouped tasks take exactly `limit` rows."""
    task = get_task("multirc")
    assert [e.group for e in task.load("validation", FIXTURES, limit=4)] == ["0-0", "0-0", "0-0", "0-1", "0-1"]
    assert [e.group for e in task.load("validation", FIXTURES, limit=3)] == ["0-0", "0-0", "0-0"]
    assert [e.group for e in task.load("validation", FIXTURES, limit=1)] == ["0-0", "0-0", "0-0"]
    assert len(task.load("validation", FIXTURES, limit=6)) == 6
    assert len(get_task("rte").load("validation", FIXTURES, limit=1)) == 1


def test_copa_input_holds_premise_question_and_both_choices():
    example = load("copa")[0]
    assert example.input_text == (
        "copa premise: My hands were cold. question: effect choice1: I put on gloves. choice2: I took off my coat."
    )
    assert example.target_text == "choice1"


def test_wsc_marks_the_pronoun_at_span2_index():
    example = load("wsc")[0]
    assert "because *it* was hungry." in example.input_text
    assert example.input_text.endswith("span1_text: The dog span2_text: it")
    row = {"text": "It rained so it was wet.", "span1_index": 0, "span2_index": 1, "span1_text": "It",
           "span2_text": "it", "label": 0}
    assert "*" not in get_task("wsc").format(row).input_text  # the index does not point at the pronoun


def test_squad_em_and_f1_by_hand():
    examples = load("squad")
    assert examples[0].answers == ("coal", "coal to the city")
    predictions = ["Coal", "12 years", "the old stone church", "on Sundays"]
    # EM (1, 0, 0, 0); F1 (1, 1/2 [12 years ~ twelve years], 6/7 [P 1, R 3/4], 0)
    scores = get_task("squad").compute_metrics(predictions, examples)
    assert scores == {"exact_match": pytest.approx(1 / 4), "f1": pytest.approx((1 + 1 / 2 + 6 / 7) / 4)}


def test_record_input_lists_entities_and_cleans_highlights():
    examples = load("record")
    assert examples[0].input_text.startswith(
        "record query: The tunnel was designed by @placeholder. entities: Eastbridge, Omar Haddad, Westport passage:"
    )
    assert "Westport. Tunnel opens next month. Omar Haddad leads the project" in examples[0].input_text
    assert "@highlight" not in examples[0].input_text
    scores = get_task("record").compute_metrics(["Haddad", "Eastbridge", "Voss"], examples)
    # EM (1, 0, 0); F1 (1, 0, 2/3 [P 1, R 1/2])
    assert scores == {"exact_match": pytest.approx(1 / 3), "f1": pytest.approx((1 + 2 / 3) / 3)}


def test_unlabelled_test_rows_load_but_cannot_be_scored():
    rte_test = load("rte", "test")
    assert [(e.label, e.target_text) for e in rte_test] == [(None, ""), (None, "")]
    with pytest.raises(ValueError, match="unlabelled"):
        get_task("rte").compute_metrics(["entailment"] * 2, rte_test)
    record_test = load("record", "test")
    assert record_test[0].answers == () and record_test[0].target_text == ""
    with pytest.raises(ValueError, match="without gold answers"):
        get_task("record").compute_metrics(["Milltown"], record_test)
    assert [e.label for e in load("stsb", "test")] == [None, None]


def test_labels_may_be_bools_or_class_names():
    task = get_task("boolq")
    row = {"question": "q", "passage": "p"}
    assert task.format({**row, "label": True}).target_text == "True"
    assert task.format({**row, "label": "False"}).label == 0
    assert task.format({**row, "label": np.int64(1)}).label == 1
    assert get_task("stsb").format({"sentence1": "a", "sentence2": "b", "label": np.float32(2.5)}).label == 2.5
    with pytest.raises(ValueError, match="not a finite number"):
        get_task("stsb").format({"sentence1": "a", "sentence2": "b", "label": "high"})
    with pytest.raises(ValueError, match="label 2"):
        task.format({**row, "label": 2})


def test_predictions_match_label_words_after_strip_then_ignoring_case():
    task = get_task("rte")
    assert task.predicted_index(" not_entailment\n") == 1
    assert task.predicted_index("Entailment") == 0
    assert task.predicted_index("entailment.") == -1


def test_a_row_without_a_column_names_it():
    with pytest.raises(KeyError, match="'sentence2'"):
        get_task("rte").format({"sentence1": "a", "label": 0})


def test_missing_task_folder_split_or_column_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no validation file for task 'rte'"):
        get_task("rte").load("validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="has no split 'test'"):
        get_task("squad").load("test", data_dir=FIXTURES)
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "validation.jsonl").write_text(json.dumps({"sentence1": "a", "label": 0, "idx": 0}) + "\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence2'\]"):
        get_task("rte").load("validation", data_dir=tmp_path)


def test_check_split_finds_what_load_would_refuse_without_loading(tmp_path):
    rte = get_task("rte")
    rte.check_split("validation", FIXTURES)
    rte.check_split("train")  # no data_dir: the hub, only the split name is checked
    with pytest.raises(ValueError, match="has no split 'validation_matched'"):
        rte.check_split("validation_matched")
    with pytest.raises(FileNotFoundError, match="no validation file for task 'rte'"):
        rte.check_split("validation", tmp_path)
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "validation.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="task 'rte', split 'validation': .*validation.jsonl is empty"):
        rte.check_split("validation", tmp_path)
    with pytest.raises(ValueError, match="validation.jsonl is empty"):
        rte.load("validation", tmp_path)  # not a bare StopIteration from `datasets`
    rows = _fixture_rows("rte", "validation")
    (tmp_path / "rte" / "validation.jsonl").write_text("".join(json.dumps({**r, "sentence2": None} | {"s2": 1}) + "\n"
                                                              for r in rows))
    rte.check_split("validation", tmp_path)  # the column is there (its values are checked when it loads)
    (tmp_path / "rte" / "validation.jsonl").unlink()
    with open(tmp_path / "rte" / "validation.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence1", "label", "idx"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("sentence1", "label", "idx")} for r in rows)
    with pytest.raises(ValueError, match=r"validation.csv\): missing column\(s\) \['sentence2'\]"):
        rte.check_split("validation", tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "parquet" / "squad").mkdir(parents=True)
    squad_rows = [{k: v for k, v in r.items() if k != "answers"} for r in _fixture_rows("squad", "validation")]
    pq.write_table(pa.Table.from_pylist(squad_rows), tmp_path / "parquet" / "squad" / "validation.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answers'\]"):
        get_task("squad").check_split("validation", tmp_path / "parquet")


def test_a_row_the_task_cannot_read_is_named_by_its_place(tmp_path):
    """A label that is no class, a null text: the error names the row (the first data row is 1), which the
    messages had left out (the trainer adds the file: tests/trainer/test_trainer_config.py)."""
    rows = _fixture_rows("rte", "validation")[:3]
    (tmp_path / "rte").mkdir()
    for bad, message in (({"label": 5}, r"row 2: task 'rte': label 5 is neither"),
                         ({"sentence1": None}, r"row 2: task 'rte': column 'sentence1' is null")):  # fmt: skip
        lines = [rows[0], {**rows[1], **bad}, rows[2]]
        (tmp_path / "rte" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(ValueError, match=message):
            get_task("rte").load("validation", data_dir=tmp_path)
        with pytest.raises(ValueError, match=message):  # past a limit too, where a group is completed
            get_task("rte").load("validation", data_dir=tmp_path, limit=2)


def test_a_null_word_index_is_named_by_its_row(tmp_path):
    """WSC's span2_index null (or not a number): the row's error (int(None) had been a bare TypeError), and a
    null text is not read as the word "None"."""
    rows = _fixture_rows("wsc", "validation")[:3]
    (tmp_path / "wsc").mkdir()
    for bad, message in (({"span2_index": None}, r"row 2: task 'wsc': column 'span2_index' is null"),
                         ({"span2_index": "x"}, r"row 2: task 'wsc': span2_index must be a word index, got 'x'"),
                         ({"text": None}, r"row 2: task 'wsc': column 'text' is null")):  # fmt: skip
        lines = [rows[0], {**rows[1], **bad}, rows[2]]
        (tmp_path / "wsc" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(ValueError, match=message):
            get_task("wsc").load("validation", data_dir=tmp_path)


def test_a_split_the_hub_cannot_give_names_the_settings_for_local_files(monkeypatch):
    """Offline: the error tells where a data directory goes (it had named --data-dir / data_dir=, which the
    trainer refuses: its setting is data.data_dir)."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"trainer's data.data_dir=DIR, python -m bmt_fast.tasks --data-dir DIR"):
        get_task("rte").load("validation")


def test_two_files_for_one_split_are_ambiguous(tmp_path):
    (tmp_path / "rte").mkdir()
    for suffix in ("jsonl", "csv"):
        (tmp_path / "rte" / f"train.{suffix}").write_text("")
    with pytest.raises(ValueError, match="several files"):
        get_task("rte").load("train", data_dir=tmp_path)


def _fixture_rows(name, split):
    with open(FIXTURES / name / f"{split}.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_csv_and_parquet_files_load_like_jsonl(tmp_path):
    rows = _fixture_rows("rte", "validation")
    (tmp_path / "csv" / "rte").mkdir(parents=True)
    with open(tmp_path / "csv" / "rte" / "validation.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "parquet" / "squad").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_fixture_rows("squad", "validation")),
                   tmp_path / "parquet" / "squad" / "validation.parquet")
    assert get_task("rte").load("validation", data_dir=tmp_path / "csv") == load("rte")
    assert get_task("squad").load("validation", data_dir=tmp_path / "parquet") == load("squad")


def test_csv_text_that_pandas_would_take_for_missing_is_text(tmp_path):
    """pandas reads "null", "NA", "N/A", "nan" as missing by default: the split was refused as null."""
    (tmp_path / "sst2").mkdir()
    texts = ["null", "NA", "N/A", "nan", "None"]
    with open(tmp_path / "sst2" / "validation.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "label", "idx"])
        writer.writeheader()
        writer.writerows({"sentence": t, "label": i % 2, "idx": i} for i, t in enumerate(texts))
    examples = get_task("sst2").load("validation", data_dir=tmp_path)
    assert [e.input_text for e in examples] == [f"sst2 sentence: {t}" for t in texts]
    assert [e.label for e in examples] == [0, 1, 0, 1, 0]
    with open(tmp_path / "sst2" / "validation.csv", "a", newline="") as handle:
        handle.write(",1,5\n")  # an empty field is still missing
    with pytest.raises(ValueError, match="column 'sentence' is null"):
        get_task("sst2").load("validation", data_dir=tmp_path)


def test_limit_keeps_the_first_rows():
    assert load("cb")[:2] == get_task("cb").load("validation", data_dir=FIXTURES, limit=2)


def test_squad_fixture_answer_offsets_match_the_context():
    for split in ("train", "validation"):
        for row in _fixture_rows("squad", split):
            for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
                assert row["context"][start:start + len(text)] == text


class _RecordingLoader:
    """Stands in for datasets.load_dataset: records the call, returns one row of the task's schema."""

    def __init__(self, row):
        self.row, self.calls = row, []

    def __call__(self, *args, **kwargs):
        import datasets

        self.calls.append((args, kwargs))
        return datasets.Dataset.from_list([self.row])


@pytest.mark.parametrize(
    "name, split, expected_args, expected_kwargs",
    [
        ("rte", "validation", ("nyu-mll/glue", "rte"), {"split": "validation"}),
        ("mnli", "validation", ("nyu-mll/glue", "mnli"), {"split": "validation_matched"}),
        ("squad", "train", ("rajpurkar/squad", "plain_text"), {"split": "train"}),
        ("boolq", "validation", ("parquet",), {
            "data_files": {"validation": EXPORT + "/boolq/validation/*.parquet"},
            "split": "validation"}),
        ("wsc", "train", ("parquet",), {
            "data_files": {"train": EXPORT + "/wsc.fixed/train/*.parquet"},
            "split": "train"}),
    ],
)
def test_hub_loading_calls_load_dataset_with_the_hub_ids(monkeypatch, name, split, expected_args, expected_kwargs):
    import datasets

    fixture_split = "validation_matched" if name == "mnli" else split
    loader = _RecordingLoader(_fixture_rows(name, fixture_split)[0])
    monkeypatch.setattr(datasets, "load_dataset", loader)
    examples = get_task(name).load(split)
    assert loader.calls == [(expected_args, expected_kwargs)]
    assert len(examples) == 1 and isinstance(examples[0], Example)


def test_unreachable_hub_error_points_at_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"--data-dir.*rte/validation\.jsonl"):
        get_task("rte").load("validation")


def test_a_csv_label_left_empty_is_named_by_its_own_row(tmp_path):
    """One empty label makes pandas read the CSV's label column as floats (1.0, 0.0, NaN): whole-number floats
    are the class indices they were written as (row 1's 1.0 had been refused, blaming the wrong row), and the
    empty label is the row named; a fractional one is still refused."""
    (tmp_path / "rte").mkdir()
    path = tmp_path / "rte" / "validation.csv"
    path.write_text("sentence1,sentence2,label,idx\nhello,world,1,0\nhi,there,-1,1\nyo,man,,2\n")
    with pytest.raises(ValueError, match=r"row 3: task 'rte': column 'label' is null"):
        get_task("rte").load("validation", data_dir=tmp_path)
    path.write_text("sentence1,sentence2,label,idx\nhello,world,1,0\nhi,there,-1,1\nyo,man,0.0,2\n")
    assert [e.label for e in get_task("rte").load("validation", data_dir=tmp_path)] == [1, None, 0]
    rte = {"sentence1": "a", "sentence2": "b"}
    for label, message in ((1.5, "label 1.5 is neither"), (np.float64(2.0), "label 2 is neither"),
                           (float("inf"), "label inf is neither"), (None, "column 'label' is null")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            get_task("rte").format({**rte, "label": label})
    assert get_task("rte").format({**rte, "label": -1.0}).label is None  # (unlabelled, as -1)
    assert get_task("mnli").format({"premise": "p", "hypothesis": "h", "label": np.float32(2.0)}).label == 2


def test_values_a_task_cannot_read_are_errors_not_quiet_examples():
    """Malformed values that had given a quietly wrong example or score (session 53's review): a bool label
    of a task with more than two classes (MNLI: class 1, 'neutral'), MultiRC options with null question ids
    (all one question for exact match), a fractional or bool span2_index (cut to a word), a list or record in
    a text column (its Python repr in the input), and an empty gold answer (an empty prediction scored
    EM 1). An integral float index (a CSV column with nulls elsewhere) still reads."""
    with pytest.raises(ValueError, match="label True"):
        get_task("mnli").format({"premise": "p", "hypothesis": "h", "label": True})
    assert get_task("boolq").format({"question": "q", "passage": "p", "label": np.bool_(True)}).label == 1
    multirc = {"paragraph": "P", "question": "Q", "answer": "A", "label": 1}
    with pytest.raises(ValueError, match="idx must hold 'paragraph' and 'question' ids"):
        get_task("multirc").format({**multirc, "idx": {"paragraph": None, "question": None}})
    wsc = {"text": "The dog ate because it was hungry.", "span1_index": 0, "span2_index": 4, "span1_text": "The dog",
           "span2_text": "it", "label": 1}  # fmt: skip
    assert "*it*" in get_task("wsc").format({**wsc, "span2_index": 4.0}).input_text
    for index in (4.7, True):
        with pytest.raises(ValueError, match="span2_index must be a word index"):
            get_task("wsc").format({**wsc, "span2_index": index})
    for value in (["a", "b"], {"text": "a"}):
        with pytest.raises(ValueError, match="column 'sentence1' must hold a text"):
            get_task("rte").format({"sentence1": value, "sentence2": "x", "label": 0})
    with pytest.raises(ValueError, match="must be a list of non-empty texts"):
        get_task("squad").format({"question": "q", "context": "c", "answers": {"text": [""], "answer_start": [0]}})


def test_a_csv_with_a_byte_order_mark_is_read_by_the_check_as_by_the_loader(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark: the split check (which the trainer runs first) had
    read it into the first column's name and refused a file the loader reads."""
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "validation.csv").write_bytes(b"\xef\xbb\xbfsentence1,sentence2,label,idx\nA b.,C d.,0,0\n")
    task = get_task("rte")
    task.check_split("validation", tmp_path)
    assert task.load("validation", data_dir=tmp_path)[0].input_text == "rte sentence1: A b. sentence2: C d."
