"""The official metrics against values worked out by hand (in the comments), and against scipy."""

import math

import pytest
from scipy import stats

from bmt_fast.tasks import metrics


def test_accuracy_counts_equal_pairs():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy([-1, 2], [1, 2]) == 0.5  # an unrecognised prediction (-1) is wrong


def test_f1_binary_by_hand():
    # tp = positions 0 and 4, fp = position 1, fn = position 2: F1 = 2*2 / (2*2 + 1 + 1)
    assert metrics.f1_binary([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(2 / 3)
    # the positive class can be any label: positive=0 gives tp=1 (pos 3), fp=1 (pos 2), fn=1 (pos 1)
    assert metrics.f1_binary([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], positive=0) == pytest.approx(0.5)


def test_f1_binary_unrecognised_prediction_is_a_missed_positive_not_a_false_positive():
    # -1 against gold 1: fn; 1 against gold 1: tp; 1 against gold 0: fp -> 2 / (2 + 1 + 1)
    assert metrics.f1_binary([-1, 1, 1], [1, 1, 0]) == pytest.approx(0.5)
    # -1 against gold 0 adds nothing: F1 stays that of the other examples
    assert metrics.f1_binary([1, -1], [1, 0]) == 1.0


def test_f1_binary_without_any_positive_is_zero():
    assert metrics.f1_binary([0, 0], [0, 0]) == 0.0


def test_f1_macro_by_hand():
    predictions = [0, 0, 1, 2, 2, 1]
    references = [0, 1, 1, 2, 0, 1]
    # class 0: tp 1, fp 1, fn 1 -> 1/2; class 1: tp 2, fp 0, fn 1 -> 4/5; class 2: tp 1, fp 1, fn 0 -> 2/3
    assert metrics.f1_macro(predictions, references, classes=(0, 1, 2)) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_f1_macro_counts_a_listed_class_that_never_occurs_as_zero():
    assert metrics.f1_macro([0, 1], [0, 1], classes=(0, 1, 2)) == pytest.approx(2 / 3)


def test_matthews_binary_by_hand_and_as_phi_coefficient():
    predictions = [1, 1, 0, 0, 1, 0]
    references = [1, 0, 0, 0, 1, 1]
    # tp 2, fp 1, tn 2, fn 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert metrics.matthews_corrcoef(predictions, references) == pytest.approx(1 / 3)
    # for two classes MCC is the Pearson correlation of the 0/1 vectors
    assert metrics.matthews_corrcoef(predictions, references) == pytest.approx(
        stats.pearsonr(predictions, references).statistic
    )


def test_matthews_multiclass_by_hand():
    # n=4, correct=2, pred counts {0:2, 1:1, 2:1}, true counts {0:1, 1:2, 2:1}
    # (2*4 - (2*1 + 1*2 + 1*1)) / sqrt((16 - 6) * (16 - 6)) = 3/10
    assert metrics.matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)


def test_matthews_treats_unrecognised_prediction_as_its_own_class():
    # correct=3, pred counts {-1:1, 1:1, 0:2}, true counts {1:2, 0:2}
    # (3*4 - (0 + 1*2 + 2*2)) / sqrt((16 - 6) * (16 - 8)) = 6 / sqrt(80)
    assert metrics.matthews_corrcoef([-1, 1, 0, 0], [1, 1, 0, 0]) == pytest.approx(6 / math.sqrt(80))


@pytest.mark.parametrize("predictions", [[1, 1, 1, 1], [0, 0, 0, 0]])
def test_matthews_of_constant_predictions_is_zero(predictions):
    assert metrics.matthews_corrcoef(predictions, [1, 0, 1, 0]) == 0.0


def test_matthews_perfect_and_inverted():
    assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_pearson_by_hand_and_against_scipy():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    # deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert metrics.pearson(x, y) == pytest.approx(11 / math.sqrt(130))
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)


def test_spearman_by_hand_with_ties_and_against_scipy():
    x, y = [1, 2, 3, 4], [10, 30, 20, 20]
    # ranks of y: (1, 4, 2.5, 2.5); deviations (-1.5, 1.5, 0, 0) against (-1.5, -.5, .5, 1.5): 1.5 / sqrt(5 * 4.5)
    assert metrics.spearman(x, y) == pytest.approx(1 / math.sqrt(10))
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_correlations_agree_with_scipy_on_random_data():
    import random

    rng = random.Random(0)
    x = [rng.uniform(0, 5) for _ in range(50)]
    y = [v + rng.gauss(0, 1) for v in x]
    y_rounded = [round(v) for v in y]  # many ties
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert metrics.spearman(x, y_rounded) == pytest.approx(stats.spearmanr(x, y_rounded).statistic, abs=1e-12)


@pytest.mark.parametrize("metric", [metrics.pearson, metrics.spearman])
def test_correlation_with_a_constant_side_is_zero(metric):
    assert metric([3.0, 3.0, 3.0], [1.0, 2.0, 4.0]) == 0.0
    assert metric([1.0, 2.0, 4.0], [2.5, 2.5, 2.5]) == 0.0


@pytest.mark.parametrize("huge", [[1e300, 1.0, 2.0, 3.0], [1e308, 1e308, 2.0, 3.0], [-1e308, 1e308, 0.0, 1.0]])
def test_pearson_of_huge_finite_predictions(huge):
    """A degenerate generation parses to a finite 1e300: its squares overflowed the sums (r = -0.0 against
    scipy's -0.77, or an OverflowError that stopped training at a periodic evaluation)."""
    gold = [1.0, 2.0, 3.0, 4.0]
    assert metrics.pearson(huge, gold) == pytest.approx(stats.pearsonr([v / 1e300 for v in huge], gold).statistic)


def test_pearson_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        metrics.pearson([1.0, float("nan")], [1.0, 2.0])


def test_normalize_answer():
    assert metrics.normalize_answer("The  Cat's hat!") == "cats hat"
    assert metrics.normalize_answer("An apple, a day") == "apple day"
    assert metrics.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_takes_any_gold_answer():
    assert metrics.exact_match("the cats hat", ["dog", "Cat's hat."]) == 1.0
    assert metrics.exact_match("cat", ["cats"]) == 0.0


def test_token_f1_is_the_max_over_gold_answers():
    # prediction tokens (big, red, ball); gold "red ball game": 2 common, P = R = 2/3
    assert metrics.token_f1("a big red ball", ["the red ball game", "blue"]) == pytest.approx(2 / 3)
    assert metrics.token_f1("", ["red"]) == 0.0


def test_squad_scores_by_hand():
    scores = metrics.squad_scores(["Paris", "red ball"], [["paris", "Paris, France"], ["the big red ball"]])
    # EM (1, 0); F1 (1, P=1 R=2/3 -> 0.8)
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.9)


def test_multirc_scores_by_hand():
    groups = ["a", "a", "a", "b", "b", "c"]
    references = [1, 0, 1, 0, 0, 1]
    predictions = [1, 0, 0, 0, 0, 1]
    scores = metrics.multirc_scores(predictions, references, groups)
    # F1a: tp 2, fp 0, fn 1 -> 4/5; questions a (wrong at position 2), b, c -> 2 of 3 exact
    assert scores["f1a"] == pytest.approx(0.8)
    assert scores["exact_match"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.accuracy([1, 0], [1]),
        lambda: metrics.f1_binary([], []),
        lambda: metrics.pearson([1.0], [1.0, 2.0]),
        lambda: metrics.squad_scores(["a"], []),
        lambda: metrics.multirc_scores([1, 0], [1, 0], ["a"]),
    ],
)
def test_mismatched_or_empty_inputs_are_rejected(call):
    with pytest.raises(ValueError):
        call()


def test_qa_metrics_need_a_gold_answer():
    with pytest.raises(ValueError, match="gold answer"):
        metrics.exact_match("x", [])
    with pytest.raises(ValueError, match="gold answer"):
        metrics.token_f1("x", [])


def test_a_gold_answer_given_as_a_string_is_refused():
    """A str is a sequence of strings: its characters had been the gold answers (exact_match('the cat',
    'The cat') was 0.0, squad_scores(['Paris'], ['Paris']) 0.0 and 0.0)."""
    with pytest.raises(TypeError, match="sequence of answers, got the string 'The cat'"):
        metrics.exact_match("the cat", "The cat")
    with pytest.raises(TypeError, match="sequence of answers"):
        metrics.token_f1("the cat", "The cat")
    with pytest.raises(TypeError, match="sequence of answers"):
        metrics.squad_scores(["Paris", "in 1990"], ["Paris", "1990"])
    numpy = pytest.importorskip("numpy")  # (an array of answers: its truth value had raised)
    assert metrics.squad_scores(["Paris"], [numpy.array(["paris", "x"])]) == {"exact_match": 1.0, "f1": 1.0}
    assert metrics.exact_match("Paris", numpy.array(["x", "paris"])) == 1.0


def test_tensors_and_arrays_score_as_lists():
    """0-d tensors hash by identity: each element had been a class (Matthews 0.8 for 1/3) or a MultiRC
    question of its own, and every score came back a tensor."""
    torch = pytest.importorskip("torch")
    numpy = pytest.importorskip("numpy")
    predictions, references, groups = [1, 0, 0, 1, 2, 2], [1, 0, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]
    calls = {
        "accuracy": lambda p, r, g: metrics.accuracy(p, r),
        "f1_binary": lambda p, r, g: metrics.f1_binary(p, r),
        "f1_macro": lambda p, r, g: metrics.f1_macro(p, r, classes=range(3)),
        "matthews": lambda p, r, g: metrics.matthews_corrcoef(p, r),
        "pearson": lambda p, r, g: metrics.pearson(p, r),
        "spearman": lambda p, r, g: metrics.spearman(p, r),
        "multirc": lambda p, r, g: metrics.multirc_scores(p, r, g),
    }
    for name, call in calls.items():
        expected = call(predictions, references, groups)
        for convert in (torch.tensor, numpy.array):
            got = call(convert(predictions), convert(references), convert(groups))
            assert got == expected and type(got) is type(expected), (name, convert, got, expected)
            if isinstance(got, dict):
                assert all(type(v) is float for v in got.values())
