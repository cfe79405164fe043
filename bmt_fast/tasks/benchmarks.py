"""The benchmark tasks of the paper and its peers: GLUE, SuperGLUE, SQuAD, as text-to-text tasks.

Inputs follow the T5 / prompt-transfer convention: the task name, then `column: value` for each input
column, e.g. `rte sentence1: ... sentence2: ...`. Targets are label words (the hub's class names, so
`entailment` / `not_entailment`), a number string for STS-B, or the answer text for SQuAD and ReCoRD.
Rows come in the hub's schema (see `loading`); unlabelled rows (label -1 in GLUE/SuperGLUE test splits,
ReCoRD test rows without answers) become examples with label None and an empty target, which can be
predicted but not scored.
"""

from __future__ import annotations

import math
import numbers
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from . import metrics
from .base import Example, Task
from .registry import register_task

GLUE_HUB = "nyu-mll/glue"
SUPER_GLUE_HUB = "aps/super_glue"
SQUAD_HUB = "rajpurkar/squad"

STANDARD_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
# MNLI: `validation` / `test` are the matched sections; both sections are also there by their hub names.
MNLI_SPLITS = {
    "train": "train",
    "validation": "validation_matched",
    "test": "test_matched",
    "validation_matched": "validation_matched",
    "validation_mismatched": "validation_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}
SQUAD_SPLITS = {"train": "train", "validation": "validation"}  # the SQuAD test set is hidden

UNLABELLED = -1  # label of the rows of hidden test splits in the hub's schema
# STS-B predictions that are not a number are scored as this value (below the 0-5 range), as T5 does.
UNPARSABLE_SCORE = -1.0


def column(task: Task, row: Mapping[str, Any], name: str) -> Any:
    """row[name], or a KeyError naming the task, the column and the columns the row has."""
    try:
        return row[name]
    except KeyError:
        raise KeyError(f"task {task.name!r}: the row has no column {name!r}; it has {sorted(row)}") from None


def present(task: Task, row: Mapping[str, Any], name: str) -> Any:
    """column(task, row, name), or a ValueError where it is null (missing) in the file."""
    value = column(task, row, name)
    if value is None:
        raise null_column(task.name, name)
    return value


def null_column(task_name: str, name: str) -> ValueError:
    return ValueError(f"task {task_name!r}: column {name!r} is null (missing) in a row")


def fields_text(prefix: str, fields: Sequence[tuple[str, Any]]) -> str:
    """`prefix name1: value1 name2: value2 ...`, the T5 style of text-to-text inputs (prefix: the task's
    name). A missing value (null in the file) is an error, not the text "None"; so is a value that is no
    text or number (a list or a record had gone into the input as its Python repr)."""
    for name, value in fields:
        if value is None:
            raise null_column(prefix, name)
        if not isinstance(value, (str, numbers.Number)) or _is_bool(value):
            raise ValueError(f"task {prefix!r}: column {name!r} must hold a text, got {value!r}"[:300])
    return " ".join([prefix] + [f"{name}: {' '.join(str(value).split())}" for name, value in fields])


def _is_bool(value: Any) -> bool:
    # (numpy's too, without importing numpy: numpy.bool_, named "bool" since numpy 2)
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def text_list(task: Task, name: str, value: Any) -> list[str]:
    """A column that holds a list of texts (answers, entities; a list, tuple or array): a string, a null or an
    empty entry is an error (a string was taken character by character; an empty gold answer gave an empty
    prediction full marks)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays
        value = value.tolist()
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or any(v is None or (isinstance(v, str) and not v.strip()) for v in value)
    ):
        raise ValueError(f"task {task.name!r}: {name} must be a list of non-empty texts, got {value!r}"[:300])
    return [str(v) for v in value]


def _require_labels(task: Task, examples: Sequence[Example]) -> list:
    labels = [example.label for example in examples]
    if any(label is None for label in labels):
        raise ValueError(f"task {task.name!r}: cannot score unlabelled examples (a hidden test split?)")
    return labels


def _check_lengths(predictions: Sequence[str], examples: Sequence[Example]) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples to score")


@dataclass(frozen=True, eq=False, kw_only=True)
class ClassificationTask(Task):
    """Classification with one label word per class; input = task name + `column: value` pairs."""

    name: str
    hub_path: str
    hub_config: str | None
    text_columns: tuple[str, ...]
    label_words: tuple[str, ...]
    metric_names: tuple[str, ...] = ("accuracy",)
    splits: Mapping[str, str] = field(default_factory=lambda: dict(STANDARD_SPLITS))
    hub_parquet_export: bool = False
    positive_label: int = 1  # the class whose F1 is reported ("f1")

    @property
    def columns(self) -> tuple[str, ...]:
        return self.text_columns + ("label",)

    def input_text(self, row: Mapping[str, Any]) -> str:
        return fields_text(self.name, [(name, column(self, row, name)) for name in self.text_columns])

    def group(self, row: Mapping[str, Any]) -> str | None:
        return None

    def label_index(self, row: Mapping[str, Any]) -> int | None:
        """The class index of the row's label (int, bool or class name); None when unlabelled (-1)."""
        value = column(self, row, "label")
        if isinstance(value, str) and value in self.label_words:
            return self.label_words.index(value)
        if value is None or (isinstance(value, numbers.Real) and not _is_bool(value) and math.isnan(value)):
            raise null_column(self.name, "label")
        if isinstance(value, numbers.Real) and not _is_bool(value) and not isinstance(value, numbers.Integral):
            # a whole-number float is the index it was written as: one empty label makes pandas read a CSV's
            # label column as floats, and the first row's 1.0 had been refused in place of the empty one
            if math.isfinite(value) and value == int(value):
                value = int(value)
        # (numpy integers too; bools, numpy's too, only where there are two classes, False and True: a bool had
        # been read as class 1 of MNLI's three)
        if (not _is_bool(value) and isinstance(value, numbers.Integral)) or (_is_bool(value) and len(self.label_words) == 2):
            value = int(value)
            if value == UNLABELLED:
                return None
            if 0 <= value < len(self.label_words):
                return value
        raise ValueError(
            f"task {self.name!r}: label {value!r} is neither a class index 0..{len(self.label_words) - 1}, "
            f"-1 (unlabelled), nor one of {list(self.label_words)}"
        )

    def format(self, row: Mapping[str, Any]) -> Example:
        label = self.label_index(row)
        target = self.label_words[label] if label is not None else ""
        return Example(self.input_text(row), target, label, group=self.group(row))

    def predicted_index(self, prediction: str) -> int:
        """Class index of a generated text: its label word, matched exactly after stripping spaces, then
        ignoring case; -1 when it is no label word (scored as wrong, see `metrics`)."""
        text = prediction.strip()
        if text in self.label_words:
            return self.label_words.index(text)
        folded = [word.casefold() for word in self.label_words]
        return folded.index(text.casefold()) if text.casefold() in folded else -1

    def compute_metrics(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        _check_lengths(predictions, examples)
        gold = _require_labels(self, examples)
        predicted = [self.predicted_index(p) for p in predictions]
        scorers = {
            "accuracy": lambda: metrics.accuracy(predicted, gold),
            "f1": lambda: metrics.f1_binary(predicted, gold, positive=self.positive_label),
            "f1_macro": lambda: metrics.f1_macro(predicted, gold, classes=range(len(self.label_words))),
            "matthews_corrcoef": lambda: metrics.matthews_corrcoef(predicted, gold),
        }
        return {name: scorers[name]() for name in self.metric_names}


@dataclass(frozen=True, eq=False, kw_only=True)
class MultiRCTask(ClassificationTask):
    """MultiRC: each row is one answer option of a question, labelled True/False; the options of one
    question share a group (paragraph and question ids) for exact match."""

    @property
    def columns(self) -> tuple[str, ...]:
        return self.text_columns + ("label", "idx")

    def group(self, row: Mapping[str, Any]) -> str:
        idx = column(self, row, "idx")
        try:
            ids = (idx["paragraph"], idx["question"])
        except (KeyError, TypeError):
            ids = None
        if ids is None or any(i is None for i in ids):  # (null ids had put every option into one question)
            raise ValueError(f"task {self.name!r}: idx must hold 'paragraph' and 'question' ids, got {idx!r}")
        return f"{ids[0]}-{ids[1]}"

    def compute_metrics(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        _check_lengths(predictions, examples)
        gold = _require_labels(self, examples)
        predicted = [self.predicted_index(p) for p in predictions]
        groups = [example.group for example in examples]
        scores = metrics.multirc_scores(predicted, gold, groups, positive=self.positive_label)
        return {name: scores[name] for name in self.metric_names}


@dataclass(frozen=True, eq=False, kw_only=True)
class WSCTask(ClassificationTask):
    """WSC: does the marked pronoun (span 2) refer to span 1? The pronoun is marked `*it*` in the text
    when span2_index points at it (indices count whitespace-separated words)."""

    @property
    def columns(self) -> tuple[str, ...]:
        return ("text", "span1_index", "span2_index", "span1_text", "span2_text", "label")

    def input_text(self, row: Mapping[str, Any]) -> str:
        words = str(present(self, row, "text")).split()
        span_words = str(present(self, row, "span2_text")).split()
        index = present(self, row, "span2_index")
        try:  # (an integral float: a CSV column with nulls elsewhere; 9.7 or True had been cut to a word)
            start = int(index)
            if _is_bool(index) or start != float(index):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"task {self.name!r}: span2_index must be a word index, got {index!r}") from None
        stop = start + len(span_words)

        def bare(word: str) -> str:
            return word.strip(".,;:!?\"'").casefold()

        if span_words and 0 <= start and stop <= len(words):
            if [bare(w) for w in words[start:stop]] == [bare(w) for w in span_words]:
                words[start] = "*" + words[start]
                words[stop - 1] = words[stop - 1] + "*"
        fields = [("text", " ".join(words)), ("span1_text", column(self, row, "span1_text")),
                  ("span2_text", column(self, row, "span2_text"))]
        return fields_text(self.name, fields)


def _float32(value: float) -> float:
    """`value` rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True, eq=False, kw_only=True)
class RegressionTask(Task):
    """STS-B: the similarity score (0-5) rendered as a number string rounded to the nearest 0.2 as T5 does
    (float32, halves to even); scored with Pearson/Spearman against the unrounded gold score."""

    name: str
    hub_path: str
    hub_config: str | None
    text_columns: tuple[str, ...]
    metric_names: tuple[str, ...] = ("pearson", "spearman")
    splits: Mapping[str, str] = field(default_factory=lambda: dict(STANDARD_SPLITS))
    step: float = 0.2
    low: float = 0.0  # the scores' range (STS-B: 0 to 5)
    high: float = 5.0

    @property
    def columns(self) -> tuple[str, ...]:
        return self.text_columns + ("label",)

    def target_text(self, score: float) -> str:
        # T5's stsb preprocessor: tf.as_string(tf.round(label * 5) / 5, precision=1) on the float32 label,
        # tf.round rounding halves to even: float32 arithmetic, then Python's round (also half to even) of
        # the float32 product. 2.5 -> "2.4", 0.5 -> "0.4", 0.3 -> "0.4" (0.3f * 5 is a hair over 1.5).
        # (Until 2026-12-06 halves rounded up: 2.5 -> "2.6", 13 of the 26 odd tenths unlike T5.)
        per_unit = _float32(round(1 / self.step))
        return f"{_float32(round(_float32(_float32(score) * per_unit)) / per_unit):.1f}"

    def format(self, row: Mapping[str, Any]) -> Example:
        value = column(self, row, "label")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"task {self.name!r}: label {value!r} is not a finite number")
        if value != UNLABELLED and not self.low <= value <= self.high:
            raise ValueError(f"task {self.name!r}: label {value!r} is outside the scores' range [{self.low:g}, "
                             f"{self.high:g}]")
        score = None if value == UNLABELLED else float(value)
        text = fields_text(self.name, [(name, column(self, row, name)) for name in self.text_columns])
        return Example(text, self.target_text(score) if score is not None else "", score)

    @staticmethod
    def predicted_value(prediction: str) -> float:
        try:
            value = float(prediction.strip())
        except ValueError:
            return UNPARSABLE_SCORE
        return value if math.isfinite(value) else UNPARSABLE_SCORE

    def compute_metrics(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        _check_lengths(predictions, examples)
        gold = _require_labels(self, examples)
        predicted = [self.predicted_value(p) for p in predictions]
        scorers = {"pearson": metrics.pearson, "spearman": metrics.spearman}
        return {name: scorers[name](predicted, gold) for name in self.metric_names}


@dataclass(frozen=True, eq=False, kw_only=True)
class ExtractiveQATask(Task):
    """Answer-text targets scored by SQuAD exact match and token F1 (max over the gold answers)."""

    name: str
    hub_path: str
    hub_config: str | None
    metric_names: tuple[str, ...] = ("exact_match", "f1")
    splits: Mapping[str, str] = field(default_factory=lambda: dict(STANDARD_SPLITS))
    hub_parquet_export: bool = False

    def input_text(self, row: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def gold_answers(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def format(self, row: Mapping[str, Any]) -> Example:
        answers = self.gold_answers(row)
        return Example(self.input_text(row), answers[0] if answers else "", None, answers=answers)

    def compute_metrics(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        _check_lengths(predictions, examples)
        if any(not example.answers for example in examples):
            raise ValueError(f"task {self.name!r}: cannot score examples without gold answers (a test split?)")
        scores = metrics.squad_scores(predictions, [example.answers for example in examples])
        return {name: scores[name] for name in self.metric_names}


@dataclass(frozen=True, eq=False, kw_only=True)
class SquadTask(ExtractiveQATask):
    splits: Mapping[str, str] = field(default_factory=lambda: dict(SQUAD_SPLITS))

    @property
    def columns(self) -> tuple[str, ...]:
        return ("question", "context", "answers")

    def input_text(self, row: Mapping[str, Any]) -> str:
        fields = [("question", column(self, row, "question")), ("context", column(self, row, "context"))]
        return fields_text(self.name, fields)

    def gold_answers(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        answers = column(self, row, "answers")
        try:
            texts = answers["text"]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"task {self.name!r}: answers must hold a 'text' list, got {answers!r}") from None
        return tuple(dict.fromkeys(text_list(self, "answers['text']", texts)))


_HIGHLIGHT = re.compile(r"\s*\n@highlight\n\s*")


def record_passage(passage: str) -> str:
    """A ReCoRD passage with its `@highlight` markers turned into sentence breaks."""
    pieces = [piece.strip() for piece in _HIGHLIGHT.split(passage)]
    text = pieces[0]
    for piece in pieces[1:]:
        text += (" " if text.endswith((".", "!", "?", '"', "'")) else ". ") + piece
    return text


@dataclass(frozen=True, eq=False, kw_only=True)
class RecordTask(ExtractiveQATask):
    """ReCoRD: fill `@placeholder` in the query with an entity of the passage; the answer is the entity."""

    @property
    def columns(self) -> tuple[str, ...]:
        return ("passage", "query", "entities", "answers")

    def input_text(self, row: Mapping[str, Any]) -> str:
        entities = list(dict.fromkeys(text_list(self, "entities", column(self, row, "entities"))))
        fields = [("query", column(self, row, "query")), ("entities", ", ".join(entities)),
                  ("passage", record_passage(str(present(self, row, "passage"))))]
        return fields_text(self.name, fields)

    def gold_answers(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(text_list(self, "answers", column(self, row, "answers"))))


def _glue(name: str, text_columns: tuple[str, ...], label_words: tuple[str, ...], **kwargs) -> ClassificationTask:
    return ClassificationTask(
        name=name, hub_path=GLUE_HUB, hub_config=name, text_columns=text_columns, label_words=label_words, **kwargs
    )


def _super_glue(cls, name: str, config: str, text_columns: tuple[str, ...], label_words: tuple[str, ...], **kwargs):
    return cls(
        name=name, hub_path=SUPER_GLUE_HUB, hub_config=config, text_columns=text_columns, label_words=label_words,
        hub_parquet_export=True, **kwargs,
    )


_BOOL = ("False", "True")  # SuperGLUE's class names for its yes/no tasks

BENCHMARK_TASKS: tuple[Task, ...] = (
    # GLUE
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), metric_names=("matthews_corrcoef",)),
    _glue("sst2", ("sentence",), ("negative", "positive")),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), metric_names=("f1", "accuracy")),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), metric_names=("accuracy", "f1")),
    RegressionTask(name="stsb", hub_path=GLUE_HUB, hub_config="stsb", text_columns=("sentence1", "sentence2")),
    _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), splits=dict(MNLI_SPLITS)),
    _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    # SuperGLUE
    _super_glue(ClassificationTask, "boolq", "boolq", ("question", "passage"), _BOOL),
    _super_glue(ClassificationTask, "cb", "cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
                metric_names=("accuracy", "f1_macro")),
    _super_glue(ClassificationTask, "copa", "copa", ("premise", "question", "choice1", "choice2"),
                ("choice1", "choice2")),
    _super_glue(MultiRCTask, "multirc", "multirc", ("question", "answer", "paragraph"), _BOOL,
                metric_names=("f1a", "exact_match")),
    _super_glue(ClassificationTask, "wic", "wic", ("word", "sentence1", "sentence2"), _BOOL),
    _super_glue(WSCTask, "wsc", "wsc.fixed", ("text", "span1_text", "span2_text"), _BOOL),
    RecordTask(name="record", hub_path=SUPER_GLUE_HUB, hub_config="record", hub_parquet_export=True),
    # SQuAD v1.1
    SquadTask(name="squad", hub_path=SQUAD_HUB, hub_config="plain_text"),
)

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
SUPER_GLUE_TASKS = ("boolq", "cb", "copa", "multirc", "wic", "wsc", "record")
SOURCE_TASKS = ("mnli", "qnli", "qqp", "sst2", "squad", "record")
TARGET_TASKS = GLUE_TASKS + SUPER_GLUE_TASKS

for _task in BENCHMARK_TASKS:
    register_task(_task)
