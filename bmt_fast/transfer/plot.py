"""PNG plots of a run folder: source losses per task, particle spread, target losses, target metrics."""

from __future__ import annotations

import json
from pathlib import Path

from .config import nearest_existing
from .metrics_log import RunFileError, read_metrics


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the plots the run folder has data for; returns their paths. A plot it has no data for (any
    more) is removed from out_dir, so no PNG of an earlier state of the folder stays beside the new ones."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file, not a run folder")
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    if not nearest_existing(out_dir).is_dir():
        # (out_dir, or a folder above it, is a file: a FileExistsError traceback before)
        raise NotADirectoryError(
            f"{out_dir} is not a folder: the plots are several PNGs, written into a folder (--out DIR)"
        )
    sources = _stage_metrics(run_dir, "source-")
    targets = _stage_metrics(run_dir, "target-")
    if not (sources or targets or any(run_dir.glob("target-*/eval.json"))) and not out_dir.is_dir():
        return []  # (nothing to plot: no empty plots/ folder left in a folder that is no run)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        (_source_losses, sources, out_dir / "source_loss.png"),
        (_spread, sources, out_dir / "particle_spread.png"),
        (_target_curves, targets, out_dir / "target_loss.png"),
        (_target_metrics, run_dir, out_dir / "target_metrics.png"),
    ]
    written = []
    for plot, data, path in plots:
        if plot(data, path) is not None:
            written.append(path)
        else:
            path.unlink(missing_ok=True)
    return written


def _stage_metrics(run_dir: Path, prefix: str) -> dict[str, list[dict]]:
    stages = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(prefix))
    found = {p.name[len(prefix) :]: read_metrics(p / "metrics.jsonl") for p in stages}
    return {k: v for k, v in found.items() if v}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in rows], [v for _, v in rows]


def _figure(count: int, width: float = 5.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(width * count, 3.8), squeeze=False)
    return fig, axes[0]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _source_losses(sources: dict[str, list[dict]], path: Path) -> Path | None:
    if not sources:
        return None
    fig, axes = _figure(len(sources))
    for ax, (method, records) in zip(axes, sources.items()):
        keys = sorted({k for r in records for k in r if k.startswith("loss/")})
        for key in keys:
            ax.plot(*_series(records, key), label=key[len("loss/") :])
        ax.set(title=f"source {method}", xlabel="step", ylabel="mean NLL per example")
        ax.legend(fontsize="small")
    return _save(fig, path)


def _spread(sources: dict[str, list[dict]], path: Path) -> Path | None:
    # One-particle stages have no spread (and the floor bandwidth): leave them out.
    with_spread = {m: r for m, r in sources.items() if any((x.get("spread") or 0) > 0 for x in r)}
    if not with_spread:
        return None
    fig, (left, right) = _figure(2)
    for method, records in with_spread.items():
        left.plot(*_series(records, "spread"), label=method)
        right.plot(*_series(records, "bandwidth"), label=method)
    left.set(title="particle spread", xlabel="step", ylabel="mean pairwise distance")
    right.set(title="SVGD bandwidth H", xlabel="step", ylabel="H", yscale="log")
    left.legend(fontsize="small")
    return _save(fig, path)


def _target_curves(targets: dict[str, list[dict]], path: Path) -> Path | None:
    if not targets:
        return None
    eval_keys = sorted(
        {k for r in targets.values() for x in r for k in x if k.startswith("eval/") and k != "eval/loss"}
    )
    fig, axes = _figure(1 + bool(eval_keys))
    for method, records in targets.items():
        axes[0].plot(*_series(records, "loss"), label=method)
        if eval_keys:
            axes[1].plot(*_series(records, eval_keys[0]), marker="o", label=method)
    axes[0].set(title="target training loss", xlabel="step", ylabel="mean NLL per example")
    axes[0].legend(fontsize="small")
    if eval_keys:
        axes[1].set(title=f"target {eval_keys[0][len('eval/') :]}", xlabel="step")
    return _save(fig, path)


def _target_metrics(run_dir: Path, path: Path) -> Path | None:
    results = {}
    for folder in sorted(run_dir.glob("target-*/eval.json")):
        try:
            row = json.loads(folder.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunFileError(f"{folder}: not valid JSON ({error}); `target --resume` evaluates it again") from None
        if not isinstance(row, dict):
            raise RunFileError(f"{folder}: not a JSON object")
        results[folder.parent.name[len("target-") :]] = row
    metrics = sorted({k for r in results.values() for k, v in r.items() if isinstance(v, float) and k != "loss"})
    if not results or not metrics:
        return None
    fig, axes = _figure(len(metrics), width=max(4.0, 1.2 * len(results)))
    for ax, metric in zip(axes, metrics):
        names = [m for m in results if isinstance(results[m].get(metric), float)]  # null: not finite
        values = [results[m][metric] for m in names]
        bars = ax.bar(names, values)
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
        ax.set(title=f"target {metric}", ylabel=metric)
        ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)
