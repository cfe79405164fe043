"""Few-shot training sets for the target tasks, and mean ± std over the seeds that drew them.

`k_shot(examples, k, seed)` draws, for classification (every example has an integer label), k examples
*per class* (balanced, the usual few-shot protocol of the prompt-transfer papers); otherwise (regression,
extractive QA, or balanced=False) k examples in total. The draw depends only on the seed and the
examples, so for one seed a smaller k is a subset of a larger one (4 ⊂ 16 ⊂ 32). MultiRC rows are
answer options: they are sampled as rows, not as whole questions.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .base import Example

FEW_SHOT_K = (4, 16, 32)
DEFAULT_SEEDS = (13, 21, 42, 87, 100)  # five draws per k, the seeds of the LM-BFF few-shot protocol


def _class_indices(examples: Sequence[Example]) -> dict[int, list[int]] | None:
    """Indices of each class, or None when no example has an integer label. A class label is anything
    operator.index takes: Python ints and bools, numpy integers and bools (labels read with pandas / numpy: these had
    not counted, and the draw had silently been k in total instead of k per class), 0-dim integer tensors."""
    keys = [_class_key(example.label) for example in examples]
    if all(key is None for key in keys):
        return None
    if any(key is None for key in keys):
        bad = next(example.label for example, key in zip(examples, keys) if key is None)
        raise ValueError(f"balanced k-shot needs an integer label on every example; found label {bad!r}")
    by_class: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        by_class.setdefault(key, []).append(index)
    return by_class


def _class_key(label: object) -> int | None:
    if label is None or isinstance(label, (str, bytes)):
        return None
    if isinstance(label, np.bool_):  # (numpy 2's bool takes no operator.index: a pandas bool column's labels)
        return int(label)
    try:
        return operator.index(label)
    except TypeError:  # (a float, a string's answer list, ...: not a class)
        return None


def k_shot(examples: Sequence[Example], k: int, seed: int, balanced: bool = True) -> list[Example]:
    """k examples per class (balanced classification) or k in total, drawn without replacement with
    `seed`, in a shuffled order. Raises ValueError when a class (or the set) has fewer than k examples."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    rng = np.random.default_rng(seed)
    by_class = _class_indices(examples) if balanced else None
    if by_class is None:
        if len(examples) < k:
            raise ValueError(f"k={k} examples requested but only {len(examples)} are available")
        return [examples[i] for i in rng.permutation(len(examples))[:k]]
    chosen: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        if len(indices) < k:
            raise ValueError(f"class {label} has {len(indices)} examples, fewer than k={k}")
        # one permutation per class whatever k is: smaller k draws a prefix of what larger k draws
        chosen.extend(indices[i] for i in rng.permutation(len(indices))[:k])
    order = rng.permutation(len(chosen))  # interleave the classes
    return [examples[chosen[i]] for i in order]


@dataclass(frozen=True)
class SeedSummary:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single seed) of one metric over seeds."""

    mean: float
    std: float
    n: int

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"

    def __str__(self) -> str:
        return self.format()


def summarize(values: Sequence[float]) -> SeedSummary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarize")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return SeedSummary(mean, 0.0, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return SeedSummary(mean, math.sqrt(variance), len(values))


def aggregate_seeds(results: Sequence[Mapping[str, float]]) -> dict[str, SeedSummary]:
    """Per-metric mean ± std over per-seed metric dicts (e.g. task.compute_metrics of each seed's run).
    Every seed must report the same metrics."""
    if not results:
        raise ValueError("no per-seed results to aggregate")
    names = list(results[0])
    for index, result in enumerate(results):
        if set(result) != set(names):
            raise ValueError(f"seed result {index} has metrics {sorted(result)}, the first has {sorted(names)}")
    return {name: summarize([result[name] for result in results]) for name in names}
