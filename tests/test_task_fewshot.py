"""k-shot sampling (balanced per class, nested across k, seeded) and mean ± std over seeds."""

from pathlib import Path

import numpy as np
import pytest

from bmt_fast.tasks import get_task
from bmt_fast.tasks.base import Example
from bmt_fast.tasks.fewshot import FEW_SHOT_K, aggregate_seeds, k_shot, summarize


def labelled(counts):
    """Distinct examples, counts[c] of class c."""
    return [Example(f"class {c} item {i}", str(c), c) for c, n in enumerate(counts) for i in range(n)]


def test_balanced_draw_has_k_of_every_class_without_repeats():
    examples = labelled([40, 10, 33])
    for k in FEW_SHOT_K[:1] + (8,):
        drawn = k_shot(examples, k, seed=0)
        assert [sum(e.label == c for e in drawn) for c in range(3)] == [k, k, k]
        assert len(set(drawn)) == len(drawn)
        assert set(drawn) <= set(examples)


def test_same_seed_same_draw_and_seeds_differ():
    examples = labelled([50, 50])
    assert k_shot(examples, 16, seed=3) == k_shot(examples, 16, seed=3)
    draws = {tuple(k_shot(examples, 16, seed=s)) for s in range(5)}
    assert len(draws) == 5


def test_smaller_k_is_a_subset_of_larger_k_for_one_seed():
    examples = labelled([40, 40])
    sets = [set(k_shot(examples, k, seed=7)) for k in FEW_SHOT_K]
    assert sets[0] < sets[1] < sets[2]


def test_unlabelled_or_regression_examples_draw_k_in_total():
    regression = [Example(f"pair {i}", "1.0", i / 10) for i in range(30)]
    qa = [Example(f"question {i}", "answer", None, answers=("answer",)) for i in range(30)]
    for examples in (regression, qa):
        drawn = k_shot(examples, 16, seed=0)
        assert len(drawn) == 16 and len(set(drawn)) == 16


def test_balanced_false_draws_k_in_total_from_classification():
    drawn = k_shot(labelled([30, 30]), 4, seed=0, balanced=False)
    assert len(drawn) == 4


def test_fixture_train_split_of_cb_draws_per_class():
    data = Path(__file__).parent / "fixtures" / "data"
    drawn = k_shot(get_task("cb").load("train", data_dir=data), 2, seed=0)  # 2 of each of the 3 classes
    assert sorted(e.label for e in drawn) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "examples, k, message",
    [
        (labelled([10, 3]), 4, "class 1 has 3 examples, fewer than k=4"),
        ([Example("a", "b", None)] * 3, 4, "only 3 are available"),
        (labelled([10, 10]), 0, "positive integer"),
        (labelled([4]) + [Example("x", "y", None)], 2, "integer label on every example"),
    ],
)
def test_impossible_draws_are_clear_errors(examples, k, message):
    with pytest.raises(ValueError, match=message):
        k_shot(examples, k, seed=0)


def test_aggregate_seeds_mean_and_sample_std_by_hand():
    results = [{"accuracy": 0.5, "f1": 0.4}, {"accuracy": 0.7, "f1": 0.6}, {"accuracy": 0.6, "f1": 0.8}]
    summary = aggregate_seeds(results)
    # accuracy: mean 0.6, deviations (-.1, .1, 0) -> sqrt(0.02 / 2) = 0.1; f1: mean 0.6, sqrt(0.08 / 2) = 0.2
    assert summary["accuracy"].mean == pytest.approx(0.6) and summary["accuracy"].std == pytest.approx(0.1)
    assert summary["f1"].mean == pytest.approx(0.6) and summary["f1"].std == pytest.approx(0.2)
    assert summary["f1"].std == pytest.approx(np.std([0.4, 0.6, 0.8], ddof=1))
    assert str(summary["accuracy"]) == "60.0 ± 10.0"
    assert summary["f1"].format(scale=1, digits=2) == "0.60 ± 0.20"
    assert summary["f1"].n == 3


def test_one_seed_has_zero_std():
    assert summarize([0.25]).std == 0.0


def test_aggregate_rejects_empty_or_inconsistent_results():
    with pytest.raises(ValueError, match="no per-seed results"):
        aggregate_seeds([])
    with pytest.raises(ValueError, match="seed result 1"):
        aggregate_seeds([{"accuracy": 0.5}, {"f1": 0.5}])


def test_numpy_bool_and_tensor_integer_labels_draw_k_per_class():
    """Labels read through pandas / numpy (numpy.int64), bools and 0-dim integer tensors are classes: k per
    class (they had not counted as integer labels, and the draw had silently been k in total)."""
    import torch

    plain = labelled([30, 10])
    for convert in (np.int64, bool, np.bool_, torch.tensor):
        examples = [Example(e.input_text, e.target_text, convert(e.label)) for e in plain]
        drawn = k_shot(examples, 4, seed=13)
        assert sorted(int(e.label) for e in drawn) == [0] * 4 + [1] * 4, convert
        assert [e.input_text for e in drawn] == [e.input_text for e in k_shot(plain, 4, seed=13)]
