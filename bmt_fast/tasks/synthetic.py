"""The built-in synthetic family: small yes/no text tasks with known relations, for the demo.

Every task maps a short review-like phrase ("the soup was great", "what an awful film") to one of two
label words, `no` / `yes`, which are single common tokens. The phrases are built from a noun of one topic
(food, movies, hotels), an adjective of a known sentiment, and a template; no task name is in the input,
so the soft prompt is the only thing that tells the tasks apart. The relations, by construction:

    synthetic/target          food phrases; `yes` iff the adjective is positive. The target task.
    synthetic/helpful_food    the target's rule on other food phrases (no phrase shared with the target):
                              helps, the same task from more data.
    synthetic/helpful_movies  the target's rule on movie phrases: helps through the shared adjectives,
                              the cross-domain case.
    synthetic/conflict_food   exactly the inputs of helpful_food with the opposite labels: conflicts; a
                              prompt that fits it answers every target example wrong.
    synthetic/unrelated_topic movie and hotel phrases; `yes` iff the phrase is about a movie. In every
                              split each (topic, sentiment) pair is equally frequent, so its labels say
                              nothing about sentiment: no help, no harm, beyond noise.

An average of separately trained source prompts mixes helpful_food and conflict_food, which pull in
opposite directions; the joint posterior weighs them against each other and the other sources instead.
Whether that helps on the target is what the demo measures: it is not built in (in the measured demo,
README "Demo", BMTPT and SPoT end level while BMTPT starts better). All draws are seeded (numpy PCG64), so a seed gives the same tasks on
every platform; the tasks registered on import use seed 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Example, InMemoryTask
from .registry import register_task

LABEL_WORDS = ("no", "yes")
POSITIVE_ADJECTIVES = ("good", "great", "nice", "lovely", "wonderful", "excellent",
                       "perfect", "pleasant", "fantastic", "superb", "delightful", "brilliant")
NEGATIVE_ADJECTIVES = ("bad", "awful", "terrible", "poor", "horrible", "boring",
                       "nasty", "dreadful", "lousy", "disappointing", "mediocre", "unpleasant")
TOPIC_NOUNS = {
    "food": ("soup", "pizza", "bread", "cake", "salad", "pasta", "coffee", "tea", "pie", "steak", "burger", "dessert"),
    "movies": ("film", "movie", "plot", "ending", "acting", "script", "soundtrack", "sequel", "show", "story",
               "cast", "director"),
    "hotels": ("room", "bed", "staff", "view", "pool", "lobby", "breakfast", "service", "hotel", "shower",
               "location", "stay"),
}
TEMPLATES = ("the {noun} was {adj}", "{a} {adj} {noun}", "this {noun} is {adj}", "what {a} {adj} {noun}",
             "the {noun} seemed {adj}", "such {a} {adj} {noun}")

TARGET = "synthetic/target"
HELPFUL_FOOD = "synthetic/helpful_food"
HELPFUL_MOVIES = "synthetic/helpful_movies"
CONFLICT_FOOD = "synthetic/conflict_food"
UNRELATED_TOPIC = "synthetic/unrelated_topic"
SOURCES = (HELPFUL_FOOD, HELPFUL_MOVIES, CONFLICT_FOOD, UNRELATED_TOPIC)
RELATIONS = {
    HELPFUL_FOOD: "helps: the target's rule on other phrases of the target's topic",
    HELPFUL_MOVIES: "helps: the target's rule on another topic, through the shared adjectives",
    CONFLICT_FOOD: "conflicts: the inputs of helpful_food with the opposite labels",
    UNRELATED_TOPIC: "unrelated: labels the topic (movie or hotel), independent of sentiment",
}

_SPLITS = ("train", "validation", "test")
_POLARITIES = (NEGATIVE_ADJECTIVES, POSITIVE_ADJECTIVES)  # index = sentiment label (0 negative, 1 positive)


def _phrase(template: str, noun: str, adjective: str) -> str:
    article = "an" if adjective[0] in "aeiou" else "a"
    return template.format(noun=noun, adj=adjective, a=article)


def _pool(topic: str, sentiment: int) -> list[str]:
    """Every phrase of a topic and sentiment, in a fixed order."""
    return [_phrase(t, n, a) for t in TEMPLATES for n in TOPIC_NOUNS[topic] for a in _POLARITIES[sentiment]]


def sentiment_of(phrase: str) -> int:
    """1 when the phrase's adjective is positive, 0 when negative (each phrase has exactly one)."""
    words = set(phrase.split())
    return int(bool(words & set(POSITIVE_ADJECTIVES)))


def topic_of(phrase: str) -> str:
    words = set(phrase.split())
    return next(topic for topic, nouns in TOPIC_NOUNS.items() if words & set(nouns))


class _PhraseSource:
    """Hands out disjoint, shuffled phrases of each (topic, sentiment), so no phrase is used twice."""

    def __init__(self, seed: int):
        self._pools = {}
        for topic_index, topic in enumerate(TOPIC_NOUNS):
            for sentiment in (0, 1):
                pool = _pool(topic, sentiment)
                order = np.random.default_rng([seed, topic_index, sentiment]).permutation(len(pool))
                self._pools[topic, sentiment] = [pool[i] for i in order]
        self._used = {key: 0 for key in self._pools}

    def take(self, topic: str, sentiment: int, count: int) -> list[str]:
        start = self._used[topic, sentiment]
        if start + count > len(self._pools[topic, sentiment]):
            raise ValueError(f"only {len(self._pools[topic, sentiment])} {topic} phrases of sentiment {sentiment} "
                             f"exist; the requested split sizes need more")
        self._used[topic, sentiment] = start + count
        return self._pools[topic, sentiment][start:start + count]


def _shuffled(labelled: list[tuple[str, int]], seed: int, task_index: int, split_index: int) -> list[Example]:
    order = np.random.default_rng([seed, 100 + task_index, split_index]).permutation(len(labelled))
    return [Example(labelled[i][0], LABEL_WORDS[labelled[i][1]], labelled[i][1]) for i in order]


def _sentiment_split(source: _PhraseSource, topic: str, size: int) -> list[tuple[str, int]]:
    return [(phrase, s) for s in (0, 1) for phrase in source.take(topic, s, size // 2)]


def _topic_split(source: _PhraseSource, size: int) -> list[tuple[str, int]]:
    """Movie phrases (yes) and hotel phrases (no), a quarter of the split for each (topic, sentiment)."""
    return [(phrase, int(topic == "movies")) for topic in ("hotels", "movies") for s in (0, 1)
            for phrase in source.take(topic, s, size // 4)]


def _task(name: str, splits: dict[str, list[Example]]) -> InMemoryTask:
    return InMemoryTask(name=name, examples=splits, label_words=LABEL_WORDS, metric_names=("accuracy",))


def synthetic_family(seed: int = 0, sizes: Sequence[int] = (256, 64, 64)) -> dict[str, InMemoryTask]:
    """The family's tasks by name, each with train/validation/test splits of `sizes` examples (multiples
    of 4), balanced between the labels (unrelated_topic also between the sentiments)."""
    sizes = tuple(sizes)
    if len(sizes) != len(_SPLITS) or any(isinstance(n, bool) or not isinstance(n, int) or n < 4 or n % 4
                                         for n in sizes):
        raise ValueError(f"sizes must be three multiples of 4 (train, validation, test), got {sizes!r}")
    source = _PhraseSource(seed)

    def build(task_index: int, make_split) -> dict[str, list[Example]]:
        return {split: _shuffled(make_split(size), seed, task_index, split_index)
                for split_index, (split, size) in enumerate(zip(_SPLITS, sizes))}

    target = build(0, lambda n: _sentiment_split(source, "food", n))
    helpful_food = build(1, lambda n: _sentiment_split(source, "food", n))
    helpful_movies = build(2, lambda n: _sentiment_split(source, "movies", n))
    unrelated = build(3, lambda n: _topic_split(source, n))
    conflict_food = {split: [Example(e.input_text, LABEL_WORDS[1 - e.label], 1 - e.label) for e in examples]
                     for split, examples in helpful_food.items()}
    return {
        TARGET: _task(TARGET, target),
        HELPFUL_FOOD: _task(HELPFUL_FOOD, helpful_food),
        HELPFUL_MOVIES: _task(HELPFUL_MOVIES, helpful_movies),
        CONFLICT_FOOD: _task(CONFLICT_FOOD, conflict_food),
        UNRELATED_TOPIC: _task(UNRELATED_TOPIC, unrelated),
    }


def register_synthetic_family(seed: int = 0, sizes: Sequence[int] = (256, 64, 64)) -> dict[str, InMemoryTask]:
    """Build the family and register its tasks under their `synthetic/...` names (replacing any there)."""
    family = synthetic_family(seed, sizes)
    for task in family.values():
        register_task(task)
    return family


register_synthetic_family()
