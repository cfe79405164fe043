"""Fixtures of the trainer tests: tiny T5 / Llama / Marian folders built once per session, configs that use them."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may be downloaded

import pytest  # noqa: E402

import synthetic_tasks  # noqa: E402,F401  (registers the synthetic tasks)
from tiny import save_tiny, save_untied_t5  # noqa: E402

KINDS = ("t5", "llama", "marian")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_models")
    dirs = {kind: save_tiny(kind, base / kind, synthetic_tasks.corpus()) for kind in KINDS}
    dirs["t5_untied"] = save_untied_t5(dirs["t5"], base / "t5_untied")  # (T5 v1.1's layout; no backbone fixture)
    return dirs


@pytest.fixture(scope="session")
def backbones(model_dirs):
    """PromptedModel per kind, loaded through the trainer's own loader (shared: the backbone is frozen)."""
    from bmt_fast.transfer import load_backbone

    return {kind: load_backbone(make_config("unused", model_dirs[kind])) for kind in KINDS}


def base_dict(output_dir, model_dir) -> dict:
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "progress": False,
        "model": {"name_or_path": str(model_dir), "max_source_length": 32, "max_target_length": 8},
        "prompt": {"length": 4},
        "data": {
            "source_tasks": ["movie_sentiment", "topic"],
            "target_task": "product_sentiment",
            "task_modules": ["synthetic_tasks"],
            "max_eval_examples": 8,
        },
        "source": {"num_particles": 3, "steps": 4, "batch_size": 4, "lr": 0.05, "log_every": 1, "checkpoint_every": 2},
        "target": {"steps": 4, "batch_size": 4, "lr": 0.05, "log_every": 1, "checkpoint_every": 2},
    }


def merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(output_dir, model_dir, **changes):
    from bmt_fast.transfer.config import RunConfig, from_dict

    return from_dict(RunConfig, merge(base_dict(output_dir, model_dir), changes))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two on a shared machine (no OpenMP spin contention), and
    the results do not depend on how many cores the machine has."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
