"""The synthetic demo family: determinism, shape, and the stated relations among its tasks."""

from collections import Counter

import numpy as np
import pytest

from bmt_fast.tasks import InMemoryTask, get_task, task_names
from bmt_fast.tasks import synthetic as syn

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def family():
    return syn.synthetic_family(seed=0)


def inputs(task, split):
    return [e.input_text for e in task.examples[split]]


def test_family_is_registered_under_synthetic_names(family):
    names = {syn.TARGET, *syn.SOURCES}
    assert names == set(family) and names <= set(task_names())
    assert set(syn.RELATIONS) == set(syn.SOURCES)
    for name in names:
        registered = get_task(name)
        assert isinstance(registered, InMemoryTask) and registered.name == name
        assert all(registered.load(split) == family[name].load(split) for split in SPLITS)


def test_same_seed_same_tasks_other_seed_other_tasks(family):
    again = syn.synthetic_family(seed=0)
    other = syn.synthetic_family(seed=1)
    for name in family:
        for split in SPLITS:
            assert family[name].examples[split] == again[name].examples[split]
        assert family[name].examples["train"] != other[name].examples["train"]


def test_split_sizes_labels_and_label_words(family):
    for task in family.values():
        assert task.label_words == ("no", "yes")
        for split, size in zip(SPLITS, (256, 64, 64)):
            examples = task.examples[split]
            assert len(examples) == size
            assert Counter(e.label for e in examples) == {0: size // 2, 1: size // 2}
            assert all(e.target_text == task.label_words[e.label] for e in examples)
    small = syn.synthetic_family(seed=0, sizes=(8, 4, 4))
    assert [len(small[syn.TARGET].examples[s]) for s in SPLITS] == [8, 4, 4]


def test_label_words_are_single_common_words_and_inputs_are_short(family):
    assert all(word.isalpha() and word.islower() and len(word) <= 3 for word in syn.LABEL_WORDS)
    lengths = [len(e.input_text.split()) for task in family.values() for s in SPLITS for e in task.examples[s]]
    assert max(lengths) <= 5


def test_vocabulary_assigns_each_word_one_sentiment_and_one_topic():
    assert not set(syn.POSITIVE_ADJECTIVES) & set(syn.NEGATIVE_ADJECTIVES)
    nouns = [noun for group in syn.TOPIC_NOUNS.values() for noun in group]
    assert len(nouns) == len(set(nouns))


def test_no_phrase_is_shared_between_splits_or_with_the_target(family):
    target_phrases = {p for s in SPLITS for p in inputs(family[syn.TARGET], s)}
    for name, task in family.items():
        per_split = [set(inputs(task, s)) for s in SPLITS]
        assert sum(map(len, per_split)) == len(set().union(*per_split))  # no duplicates, splits disjoint
        if name != syn.TARGET:
            assert not target_phrases & set().union(*per_split), name


def test_target_and_helpful_tasks_share_the_sentiment_rule(family):
    for name, topic in ((syn.TARGET, "food"), (syn.HELPFUL_FOOD, "food"), (syn.HELPFUL_MOVIES, "movies")):
        for split in SPLITS:
            for example in family[name].examples[split]:
                assert example.label == syn.sentiment_of(example.input_text)
                assert syn.topic_of(example.input_text) == topic


def test_conflicting_task_is_helpful_food_with_opposite_labels(family):
    helpful, conflict = family[syn.HELPFUL_FOOD], family[syn.CONFLICT_FOOD]
    for split in SPLITS:
        assert inputs(conflict, split) == inputs(helpful, split)
        for h, c in zip(helpful.examples[split], conflict.examples[split]):
            assert c.label == 1 - h.label and c.target_text != h.target_text


def test_unrelated_task_labels_topic_independently_of_sentiment(family):
    for split, size in zip(SPLITS, (256, 64, 64)):
        examples = family[syn.UNRELATED_TOPIC].examples[split]
        assert all(e.label == (syn.topic_of(e.input_text) == "movies") for e in examples)
        cells = Counter((e.label, syn.sentiment_of(e.input_text)) for e in examples)
        assert cells == {(label, s): size // 4 for label in (0, 1) for s in (0, 1)}


def _bag_of_words_transfer(family, source_name):
    """Accuracy on the target's validation split of a logistic regression on word counts trained on the
    source's train split: a cheap stand-in for a prompt trained on the source."""
    texts = [e.input_text for t in family.values() for s in SPLITS for e in t.examples[s]]
    vocabulary = {w: i for i, w in enumerate(sorted({w for text in texts for w in text.split()}))}

    def features(examples):
        x = np.zeros((len(examples), len(vocabulary) + 1))
        x[:, -1] = 1.0
        for row, example in enumerate(examples):
            for word in example.input_text.split():
                x[row, vocabulary[word]] += 1.0
        return x, np.array([e.label for e in examples], dtype=float)

    x, y = features(family[source_name].examples["train"])
    w = np.zeros(x.shape[1])
    for _ in range(300):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        w -= 0.5 * (x.T @ (p - y) / len(y) + 1e-3 * w)
    x_val, y_val = features(family[syn.TARGET].examples["validation"])
    return float(np.mean((x_val @ w > 0) == (y_val == 1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_stated_relations_show_in_transfer_to_the_target(seed):
    family = syn.synthetic_family(seed=seed)
    assert _bag_of_words_transfer(family, syn.HELPFUL_FOOD) >= 0.95
    assert _bag_of_words_transfer(family, syn.HELPFUL_MOVIES) >= 0.95
    assert _bag_of_words_transfer(family, syn.CONFLICT_FOOD) <= 0.05
    assert 0.3 <= _bag_of_words_transfer(family, syn.UNRELATED_TOPIC) <= 0.7


def test_accuracy_metric_of_a_synthetic_task(family):
    task = family[syn.TARGET]
    examples = task.load("validation", limit=4)
    predictions = [e.target_text for e in examples[:3]] + [task.label_words[1 - examples[3].label]]
    assert task.compute_metrics(predictions, examples) == {"accuracy": 0.75}


@pytest.mark.parametrize("sizes", [(10, 4, 4), (8, 4), (0, 4, 4), (4000, 4, 4)])
def test_bad_sizes_are_rejected(sizes):
    with pytest.raises(ValueError, match="sizes|phrases"):
        syn.synthetic_family(seed=0, sizes=sizes)


def test_an_in_memory_task_refuses_metrics_it_does_not_compute():
    """compute_metrics scores accuracy alone: metric_names=("f1", ...) had been accepted and listed by
    `python -m bmt_fast.tasks`, yet accuracy came back (and a NaN evaluation named the declared metrics)."""
    with pytest.raises(ValueError, match=r"scores accuracy only, got metric_names \('f1', 'matthews_corrcoef'\)"):
        InMemoryTask(name="t", examples={}, metric_names=("f1", "matthews_corrcoef"))
    assert InMemoryTask(name="t", examples={}).metric_names == ("accuracy",)

    class Scored(InMemoryTask):  # (as the error advises: a subclass that computes its own metrics)
        def compute_metrics(self, predictions, examples):
            return {"f1": 1.0}

    assert Scored(name="t", examples={}, metric_names=("f1",)).metric_names == ("f1",)
