"""The official metrics of the benchmark tasks, as plain functions over Python sequences (or 1-D tensors
and numpy arrays, read as lists of Python values; the results are Python floats).

Every score is a fraction in [0, 1] (correlations in [-1, 1]); reports multiply by 100.

Classification metrics take integer class indices. A prediction that is no class of the task (the
model generated something other than a label word) is passed as -1 by the tasks: it never equals a gold
label, so it is wrong for accuracy, a missed positive (never a false positive) for F1, and a class of
its own in the Matthews confusion matrix -- the convention of scoring with sklearn on index -1.

Degenerate inputs have defined values instead of NaN or a warning, as sklearn does for these cases:
  * Pearson, Spearman and Matthews correlation are 0.0 when either side is constant;
  * F1 is 0.0 when there is no positive in the predictions nor in the references.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from typing import Hashable, Iterable, Sequence

__all__ = [
    "accuracy",
    "f1_binary",
    "f1_macro",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "normalize_answer",
    "exact_match",
    "token_f1",
    "squad_scores",
    "multirc_scores",
]


def _as_list(values: Sequence) -> list:
    """values as a list of plain Python values: a tensor or numpy array through its tolist() (its 0-dim
    elements hash by identity, so each had been a class, or a MultiRC question, of its own)."""
    tolist = getattr(values, "tolist", None)
    return tolist() if callable(tolist) else list(values)


def _check_pair(predictions: Sequence, references: Sequence) -> tuple[list, list]:
    """predictions and references as lists (_as_list), of one positive length."""
    predictions, references = _as_list(predictions), _as_list(references)
    if len(predictions) != len(references):
        raise ValueError(f"predictions has {len(predictions)} items but references has {len(references)}")
    if len(predictions) == 0:
        raise ValueError("predictions and references are empty: nothing to score")
    return predictions, references


def _gold_list(gold_answers: Sequence[str], name: str) -> Sequence[str]:
    if isinstance(gold_answers, str):  # (iterated, a string's characters had been the answers)
        raise TypeError(f"{name}: gold_answers must be a sequence of answers, got the string {gold_answers!r}")
    gold_answers = _as_list(gold_answers)  # (a numpy array's truth value is ambiguous)
    if not gold_answers:
        raise ValueError(f"{name} needs at least one gold answer")
    return gold_answers


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    predictions, references = _check_pair(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def _f1_from_counts(true_positives: int, false_positives: int, false_negatives: int) -> float:
    denominator = 2 * true_positives + false_positives + false_negatives
    return 2 * true_positives / denominator if denominator else 0.0


def f1_binary(predictions: Sequence[int], references: Sequence[int], positive: int = 1) -> float:
    """F1 of the class `positive` (MRPC, QQP: the paraphrase / duplicate class)."""
    predictions, references = _check_pair(predictions, references)
    tp = sum(p == positive and r == positive for p, r in zip(predictions, references))
    fp = sum(p == positive and r != positive for p, r in zip(predictions, references))
    fn = sum(p != positive and r == positive for p, r in zip(predictions, references))
    return _f1_from_counts(tp, fp, fn)


def f1_macro(predictions: Sequence[int], references: Sequence[int], classes: Iterable[int]) -> float:
    """Unweighted mean over `classes` of each class's F1 (CB). Every listed class counts, present or not,
    as in T5's `mean_multiclass_f1` (sklearn's fbeta_score with labels=range(num_classes)), the metric of
    the prompt-transfer papers' T5 code; jiant and `evaluate`'s super_glue average over the classes that
    occur (the same on the full CB validation set, where all three do)."""
    classes = _as_list(classes)
    if not classes:
        raise ValueError("f1_macro needs at least one class")
    return sum(f1_binary(predictions, references, positive=c) for c in classes) / len(classes)


def matthews_corrcoef(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation (CoLA), multi-class form (Gorodkin's R_K), which is the usual phi coefficient
    for two classes: cov(pred, ref) / sqrt(cov(pred, pred) * cov(ref, ref)) over one-hot indicators."""
    predictions, references = _check_pair(predictions, references)
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    predicted_counts = Counter(predictions)
    true_counts = Counter(references)
    classes = set(predicted_counts) | set(true_counts)
    cov_pred_true = correct * n - sum(predicted_counts[c] * true_counts[c] for c in classes)
    cov_pred_pred = n * n - sum(count * count for count in predicted_counts.values())
    cov_true_true = n * n - sum(count * count for count in true_counts.values())
    if cov_pred_pred == 0 or cov_true_true == 0:
        return 0.0  # one side is constant: no correlation can be measured
    return cov_pred_true / math.sqrt(cov_pred_pred * cov_true_true)


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation (STS-B), accumulated in float64 around the means. Each side is divided by its
    largest magnitude first (r does not change): a generated score of 300 digits, finite as a float, had
    overflowed the sums (r = -0.0, or an OverflowError)."""
    predictions, references = _check_pair(predictions, references)
    x = [float(v) for v in predictions]
    y = [float(v) for v in references]
    if not all(math.isfinite(v) for v in x + y):
        raise ValueError("pearson: predictions and references must be finite numbers")
    x, y = _unit_scaled(x), _unit_scaled(y)
    mean_x = math.fsum(x) / len(x)
    mean_y = math.fsum(y) / len(y)
    dx = [v - mean_x for v in x]
    dy = [v - mean_y for v in y]
    sxx = math.fsum(v * v for v in dx)
    syy = math.fsum(v * v for v in dy)
    if sxx == 0.0 or syy == 0.0:
        return 0.0  # one side is constant: no correlation can be measured
    r = math.fsum(a * b for a, b in zip(dx, dy)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))  # rounding can leave |r| a hair above 1


def _unit_scaled(values: list[float]) -> list[float]:
    largest = max(abs(v) for v in values)
    return [v / largest for v in values] if largest > 0 else values


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span (scipy.stats.rankdata 'average')."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1
        for position in range(start, end + 1):
            ranks[order[position]] = shared
        start = end + 1
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation (STS-B): Pearson over average ranks."""
    predictions, references = _check_pair(predictions, references)
    return pearson(_average_ranks([float(v) for v in predictions]), _average_ranks([float(v) for v in references]))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    gold_answers = _gold_list(gold_answers, "exact_match")
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in gold_answers))


def _token_f1_single(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0  # includes empty prediction or empty gold, as in the official v1.1 script
    precision = common / len(prediction_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Bag-of-tokens F1 of the normalised texts, the maximum over the gold answers."""
    gold_answers = _gold_list(gold_answers, "token_f1")
    prediction_tokens = normalize_answer(prediction).split()
    return max(_token_f1_single(prediction_tokens, normalize_answer(gold).split()) for gold in gold_answers)


def squad_scores(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and mean token F1 (SQuAD v1.1, ReCoRD), each the max over an example's answers."""
    predictions, gold_answers = _check_pair(predictions, gold_answers)
    n = len(predictions)
    return {
        "exact_match": math.fsum(exact_match(p, g) for p, g in zip(predictions, gold_answers)) / n,
        "f1": math.fsum(token_f1(p, g) for p, g in zip(predictions, gold_answers)) / n,
    }


def multirc_scores(
    predictions: Sequence[int], references: Sequence[int], groups: Sequence[Hashable], positive: int = 1
) -> dict[str, float]:
    """MultiRC: F1a is the binary F1 over all answer options; exact match is the fraction of questions
    (groups of answer options) whose options are all labelled correctly."""
    predictions, references = _check_pair(predictions, references)
    groups = _as_list(groups)
    if len(groups) != len(references):
        raise ValueError(f"groups has {len(groups)} items but references has {len(references)}")
    all_correct: dict[Hashable, bool] = defaultdict(lambda: True)
    for p, r, g in zip(predictions, references, groups):
        all_correct[g] = all_correct[g] and p == r
    return {
        "f1a": f1_binary(predictions, references, positive=positive),
        "exact_match": sum(all_correct.values()) / len(all_correct),
    }
