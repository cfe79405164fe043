"""Small synthetic text-to-text tasks for the trainer tests, registered on import (the module is named in
`data.task_modules` by the configs the tests write)."""

from __future__ import annotations

import random

from bmt_fast.tasks import Example, InMemoryTask, register_task

GOOD = ["good", "great", "fine", "nice", "superb", "lovely"]
BAD = ["bad", "awful", "poor", "dull", "boring", "weak"]
THINGS = ["movie", "film", "story", "plot", "actor", "scene", "phone", "lamp", "chair", "book"]
TOPICS = {"sports": ["ball", "goal", "team", "match"], "food": ["bread", "soup", "cake", "rice"]}


def _sentiment(prefix: str, seed: int, count: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        positive = rng.random() < 0.5
        word = rng.choice(GOOD if positive else BAD)
        out.append(
            Example(
                f"{prefix}: the {rng.choice(THINGS)} was {word}",
                "positive" if positive else "negative",
                int(not positive),
            )
        )
    return out


def _topic(seed: int, count: int) -> list[Example]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    out = []
    for _ in range(count):
        label = rng.randrange(len(names))
        words = rng.sample(TOPICS[names[label]], 2)
        out.append(Example(f"topic: a {words[0]} and a {words[1]}", names[label], label))
    return out


def _echo(seed: int, count: int) -> list[Example]:
    rng = random.Random(seed)
    words = GOOD + BAD + THINGS
    return [Example(f"repeat: {w}", w) for w in (rng.choice(words) for _ in range(count))]


def make_tasks() -> list[InMemoryTask]:
    return [
        InMemoryTask(
            name="movie_sentiment",
            examples={"train": _sentiment("movie", 1, 48), "validation": _sentiment("movie", 2, 16)},
            label_words=("positive", "negative"),
        ),
        InMemoryTask(
            name="topic",
            examples={"train": _topic(3, 24), "validation": _topic(4, 16)},
            label_words=("food", "sports"),
        ),
        InMemoryTask(
            name="product_sentiment",
            examples={"train": _sentiment("product", 5, 32), "validation": _sentiment("product", 6, 16)},
            label_words=("positive", "negative"),
        ),
        InMemoryTask(name="echo", examples={"train": _echo(7, 32), "validation": _echo(8, 8)}),
    ]


def corpus() -> list[str]:
    """Every text the tasks can produce (the tokenizer is trained on it)."""
    texts = []
    for task in make_tasks():
        for examples in task.examples.values():
            texts += [e.input_text for e in examples] + [e.target_text for e in examples]
        texts += list(task.label_words or ())
    return texts


TASKS = {task.name: register_task(task) for task in make_tasks()}
