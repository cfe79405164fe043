"""Plots and the README table from the benchmark CSVs.

    python -m benchmarks.plot                      # PNGs beside the CSVs in benchmarks/results/
    python -m benchmarks.plot --readme README.md   # and regenerate the table between the markers

For every device, op and dtype: `<device>_<op>_<dtype>_{time,memory,ratio}.png`, one panel per d with n
on the x axis and a line per provider (median time, peak extra memory, time / limit). Only the latest
row of each (device, op, provider, dtype, n, d) counts, so re-running a size replaces it. Rows measured
under another setting than the op's default (`svgd_step --data clusters`, `svgd_step_vmap --batch` other
than 16; read from the note the op's `describe` writes) count as another op, `<op>-clusters` or
`<op>-batch<B>`, with their own tables and plots: they had replaced the default rows of their sizes (the
targets' too), each marked only as measured in another run. An op without
limits (the end-to-end prompt_transfer_step) gets no ratio plot; one compared with a baseline provider
(`SPEEDUPS`) gets `..._speedup.png` instead: baseline time / provider time.

The markdown between `<!-- bench:start -->` and `<!-- bench:end -->` is replaced by the targets of the
issue (met or missed, with the measured figure) and one table per op: median time and its ratio to the
limit for each provider, or why a provider has no time (out of memory, skipped, time-out, ...), and for the
ops of `SPEEDUPS` a speed-up column.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import CSV_HEADER, LIMITS, RESULTS_DIR, device_slug, read_rows

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
Key = tuple  # (device, op, provider, dtype, n, d), op with its variant (see variant)
DEFAULT_VMAP_BATCH = 16  # benchmarks.svgd_step_vmap.DEFAULT_BATCH (not imported: it registers providers)
# op -> (provider, baseline): the speed-up column and plot show time(baseline) / time(provider)
SPEEDUPS = {"prompt_transfer_step": ("batched", "sequential")}


def is_timing_csv(path: Path) -> bool:
    """A CSV written by the benchmark harness (its header starts like CSV_HEADER)."""
    with open(path, newline="") as f:
        return f.readline().strip().split(",")[:4] == list(CSV_HEADER[:4])


def latest_rows(paths: list[Path]) -> list[dict]:
    """The last row of each (device, op, provider, dtype, n, d) over all files, in file order. A file that is
    missing, of another format (header) or holds a damaged row is an error naming it."""
    latest: dict[Key, dict] = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{path}: no such CSV file")
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_HEADER:
            raise SystemExit(f"{path}: not a CSV of this harness's format (its header differs)")
        for line, row in enumerate(read_rows(path), 2):
            try:
                if None in row or any(row[f] is None for f in CSV_HEADER):
                    raise ValueError("its number of fields differs from the header's")
                if variant(row):  # (another setting's rows: an op of their own, see the module's docstring)
                    row = {**row, "op": f"{row['op']}-{variant(row)}"}
                key = (row["device"], row["op"], row["provider"], row["dtype"], int(row["n"]), int(row["d"]))
            except ValueError as error:
                raise SystemExit(f"{path}, row at line {line}: damaged ({error})") from None
            latest[key] = row
    return list(latest.values())


def variant(row: dict) -> str:
    """The setting a row was measured under, from its note: "" for its op's default (Gaussian particles, the
    default batch of svgd_step_vmap), else the suffix its op gets in the tables and plots."""
    if "two clusters" in row["note"]:
        return "clusters"
    batch = re.search(r"a batch of (\d+) particle sets", row["note"])
    return f"batch{batch.group(1)}" if batch and int(batch.group(1)) != DEFAULT_VMAP_BATCH else ""


def number(row: dict, field: str) -> float | None:
    try:
        value = float(row[field])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def group(rows: list[dict], *fields: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[f] for f in fields)].append(row)
    return groups


def provider_order(names: set[str]) -> list[str]:
    """bmt_fast backends first, the other providers next, the limits last."""
    bmt = sorted(n for n in names if n.startswith("bmt_fast"))
    limits = [n for n in LIMITS if n in names]
    others = sorted(n for n in names if n not in bmt and n not in limits)
    return bmt + others + limits


# ---- plots ---------------------------------------------------------------------------------------------

METRICS = {
    "time": ("time_median_s", "median time [s]"),
    "memory": ("peak_extra_mb", "peak extra memory [MB]"),
    "ratio": ("time_vs_limit", "time / limit (1 = limit)"),
}


def plot_all(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (device, op, dtype), group_rows in sorted(group(rows, "device", "op", "dtype").items()):
        dims = sorted({int(r["d"]) for r in group_rows})
        providers = provider_order({r["provider"] for r in group_rows})
        for metric, (field, label) in METRICS.items():
            if metric == "ratio" and not any(number(r, field) for r in group_rows):
                continue  # no limits (an end-to-end op): nothing to plot
            # the providers with a point to draw (rows of unavailable ones took colours of the cycle)
            shown = [p for p in providers if not (metric != "time" and p in LIMITS) and any(
                r["provider"] == p and r["status"] in ("ok", "mismatch") and (number(r, field) or 0) > 0
                for r in group_rows)]  # fmt: skip
            styles = provider_styles(shown)
            cols = min(4, len(dims))
            rows_n = math.ceil(len(dims) / cols)
            fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
            for ax, d in zip(axes.flat, dims):
                drawn = draw_panel(ax, [r for r in group_rows if int(r["d"]) == d], shown, field, styles)
                ax.set_title(f"d = {d}", fontsize=9)
                ax.set_xlabel("n (particles)")
                ax.set_ylabel(label, fontsize=8)
                if metric == "ratio" and drawn:
                    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
            for ax in list(axes.flat)[len(dims):]:
                ax.axis("off")
            # every provider drawn in any panel, in provider order (the first panel's alone left some out)
            found = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
            labels = [p for p in shown if p in found]
            handles = [found[p] for p in labels]
            fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8)
            fig.suptitle(f"{op} on {device}, {dtype}: {label}", fontsize=10)
            fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 6), 1, 0.95))
            path = out_dir / f"{device_slug(device)}_{op}_{dtype}_{metric}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        if op in SPEEDUPS:
            written += plot_speedup(plt, device, op, dtype, group_rows, out_dir)
    return written


def speedups(rows: list[dict], op: str) -> dict[tuple[int, int], float]:
    """(n, d) -> time(baseline) / time(provider) where both have a time."""
    fast, baseline = SPEEDUPS[op]
    times = {(r["provider"], int(r["n"]), int(r["d"])): number(r, "time_median_s") for r in rows
             if r["op"] == op and r["status"] in ("ok", "mismatch")}  # fmt: skip
    return {(n, d): times[(baseline, n, d)] / t for (p, n, d), t in times.items()
            if p == fast and t and times.get((baseline, n, d))}  # fmt: skip


def plot_speedup(plt, device: str, op: str, dtype: str, rows: list[dict], out_dir: Path) -> list[Path]:
    values = speedups(rows, op)
    if not values:
        return []
    fast, baseline = SPEEDUPS[op]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for d in sorted({d for _, d in values}):
        points = sorted((n, v) for (n, dd), v in values.items() if dd == d)
        ax.plot(*zip(*points), marker="o", label=f"d = {d}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (particles)")
    ax.set_ylabel(f"time {baseline} / time {fast}", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{op} on {device}, {dtype}\nspeed-up of {fast} over {baseline}", fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{device_slug(device)}_{op}_{dtype}_speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# the limits in black, told apart by line and marker (matplotlib's cycle has a grey of its own)
LIMIT_STYLES = {
    "limit-gemm": dict(linestyle="--", color="black", marker="s"),
    "limit-copy": dict(linestyle=":", color="black", marker="D"),
}


def provider_styles(providers: list[str]) -> dict[str, dict]:
    """One colour per provider for every panel of a figure (each panel's own colour cycle gave one colour to
    different providers), the limits a style each."""
    styles: dict[str, dict] = {}
    palette = [f"C{i}" for i in range(10)]  # matplotlib's cycle, then tab20's lighter shades
    if sum(p not in LIMIT_STYLES for p in providers) > len(palette):
        import matplotlib

        palette += [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors[1::2]]
    colours = iter(palette * (1 + len(providers) // len(palette)))
    for provider in providers:
        styles[provider] = dict(LIMIT_STYLES.get(provider) or {"color": next(colours)})
        if provider.startswith("bmt_fast") and provider != "bmt_fast-torch":
            styles[provider]["linewidth"] = 2.2  # the kernels under test stand out
    return styles


def draw_panel(ax, rows: list[dict], providers: list[str], field: str, styles: dict[str, dict] | None = None) -> bool:
    """One line per provider over n (log-log); a provider's failures at some n leave gaps."""
    drawn = False
    for provider in providers:
        points = sorted(
            (int(r["n"]), number(r, field)) for r in rows if r["provider"] == provider and r["status"] in ("ok", "mismatch")
        )
        points = [(n, v) for n, v in points if v is not None and v > 0]
        if not points:
            continue
        style = {"marker": "o", **(styles or provider_styles(providers))[provider]}
        ax.plot(*zip(*points), markersize=3, label=provider, **style)
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    return drawn


# ---- README table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal of the benchmark issue, checked on the latest rows of a device."""

    text: str
    op: str
    n: int
    d: int
    kind: str  # "vs_limit" (time / limit), "vs_provider" (time / other provider's time), "memory_gb"
    bound: float
    provider: str = "bmt_fast-cpu"
    other: str = ""
    device_type: str = "cpu"
    dtype: str = "float32"

    def measure(self, rows: list[dict]) -> tuple[float | None, str]:
        """(measured figure, or None with the reason)."""
        mine = find(rows, self.op, self.provider, self.n, self.d)
        if mine is None or mine["status"] != "ok":
            return None, f"{self.provider}: {mine['status'] + ' ' + mine['note'] if mine else 'not measured'}"
        if self.kind == "memory_gb":
            value = number(mine, "peak_extra_mb")
            return (None, "no memory figure") if value is None else (value * 2**20 / 1e9, "")
        if self.kind == "vs_limit":
            return number(mine, "time_vs_limit"), ""
        other = find(rows, self.op, self.other, self.n, self.d)
        if other is None or number(other, "time_median_s") is None:
            return None, f"{self.other}: {other['status'] + ' ' + other['note'] if other else 'not measured'}"
        return number(mine, "time_median_s") / number(other, "time_median_s"), ""


TARGETS = [
    Target("svgd_step n=8192 d=128: time ≤ 1.15 × GEMM limit", "svgd_step", 8192, 128, "vs_limit", 1.15),
    Target("svgd_step n=8192 d=128: time ≤ 0.55 × torch-naive", "svgd_step", 8192, 128, "vs_provider", 0.55,
           other="torch-naive"),
    Target("svgd_step n=65536 d=64: peak extra memory ≤ 0.5 GB", "svgd_step", 65536, 64, "memory_gb", 0.5),
    # bytes/s ≥ 0.7 × copy bytes/s  <=>  time ≤ copy time / 0.7
    Target("svgd_step n=16 d=409600: bytes/s ≥ 0.7 × torch copy (time ≤ 1.43 × copy limit)", "svgd_step", 16,
           409_600, "vs_limit", 1 / 0.7),
    # GPU (the GPU issue): 60 % of bf16 tensor-core throughput, taken as torch's own bf16 GEMMs on the
    # op's FLOPs in the same run (the GEMM limit; below the dense datasheet peak, so a lenient reading),
    # for each GPU provider: the CUDA kernels, Triton's default and Triton with allow_tf32=True (one bf16
    # product, the precision of torch's own bf16 matmuls; Triton's bf16 default since 2026-12-04, whose
    # bmt_fast-triton rows before then are of the three-product split).
    *[target
      for provider in ("bmt_fast-cuda", "bmt_fast-triton", "bmt_fast-triton-tf32")
      for target in (
          Target(f"{provider}: svgd_step n=65536 d=128 bf16: ≥ 60 % of bf16 GEMM throughput (time ≤ 1.67 × GEMM "
                 "limit)", "svgd_step", 65536, 128, "vs_limit", 1 / 0.6, provider=provider, device_type="cuda",
                 dtype="bfloat16"),
          Target(f"{provider}: svgd_step n=65536 d=128 bf16: time ≤ 0.2 × torch-naive", "svgd_step", 65536, 128,
                 "vs_provider", 0.2, provider=provider, other="torch-naive", device_type="cuda", dtype="bfloat16"),
          Target(f"{provider}: svgd_step n=65536 d=128 bf16: faster than attention-sdpa (time < 1 × its time)",
                 "svgd_step", 65536, 128, "vs_provider", 0.999, provider=provider, other="attention-sdpa",
                 device_type="cuda", dtype="bfloat16"))],
    *[Target(f"{provider}: svgd_step n=16 d=409600: bytes/s ≥ 0.7 × torch copy (time ≤ 1.43 × copy limit)",
             "svgd_step", 16, 409_600, "vs_limit", 1 / 0.7, provider=provider, device_type="cuda")
      for provider in ("bmt_fast-cuda", "bmt_fast-triton")],
]  # fmt: skip


def find(rows: list[dict], op: str, provider: str, n: int, d: int) -> dict | None:
    return next((r for r in rows if r["op"] == op and r["provider"] == provider and int(r["n"]) == n and int(r["d"]) == d), None)


def human_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def cell(row: dict | None, limits: dict[str, dict] | None = None) -> str:
    """A table cell: the median time and its ratio to its own run's limit, † where the table row's limit
    column (of that kind) is from another run (the table keeps each provider's latest row)."""
    if row is None:
        return ""
    median = number(row, "time_median_s")
    if row["status"] in ("ok", "mismatch") and median is not None:
        text = human_time(median)
        ratio = number(row, "time_vs_limit")
        if ratio is not None and row["provider"] not in LIMITS:
            text += f" ({ratio:.2f}×)"
            shown = (limits or {}).get(f"limit-{row['limit_kind']}")
            if shown is not None and shown["run_id"] != row["run_id"]:
                text += " †"
        return text + (" ≠" if row["status"] == "mismatch" else "")
    return row["status"]


def op_rank(op: str) -> tuple[int, str]:
    from benchmarks import OPS

    base = op.split("-")[0]  # (a variant after its op)
    return (OPS.index(base) if base in OPS else len(OPS), op)


def device_type(device: str) -> str:
    """'AMD EPYC (2 cores)' and 'AMD EPYC (2 cores, AVX2)' (harness.device_name) are CPUs."""
    return "cpu" if re.search(r"\(\d+ cores(, [^()]+)?\)$", device) else "cuda"


def markdown(rows: list[dict]) -> str:
    lines = ["Generated by `python -m benchmarks.plot --readme README.md` from `benchmarks/results/*.csv`; "
             "cells: median time (time / limit; lower is better, 1.00× = the limit). "
             "Limit: torch GEMMs doing the same FLOPs (many particles) or a torch copy of the same bytes "
             "(few particles, huge d). ≠: disagrees with the anchor provider. †: measured in another run "
             "than the limit shown in its row; its ratio is to its own run's limit.", ""]  # fmt: skip
    for (device, dtype), device_rows in sorted(group(rows, "device", "dtype").items()):
        versions = sorted({f"torch {r['torch']}" for r in device_rows})
        dates = sorted({r["timestamp"][:10] for r in device_rows})
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines += [f"#### {device}, {dtype} ({', '.join(versions)}; measured {when})", ""]
        targets = [t for t in TARGETS if t.device_type == device_type(device) and t.dtype == dtype
                   and find(device_rows, t.op, t.provider, t.n, t.d)]  # fmt: skip
        if targets:
            lines += ["| target | measured | met |", "|---|---|---|"]
            for t in targets:
                value, why = t.measure(device_rows)
                unit = " GB" if t.kind == "memory_gb" else "×"
                shown = f"{value:.2f}{unit}" if value is not None else why
                met = "—" if value is None else ("yes" if value <= t.bound else "**no**")
                lines.append(f"| {t.text} | {shown} | {met} |")
            lines.append("")
        for op, op_rows in sorted(group(device_rows, "op").items(), key=lambda item: op_rank(item[0][0])):
            providers = provider_order({r["provider"] for r in op_rows})
            providers = [p for p in providers if any(r["status"] != "unavailable" for r in op_rows if r["provider"] == p)]
            ratios = speedups(op_rows, op[0]) if op[0] in SPEEDUPS else None
            extra = [f"speed-up ({SPEEDUPS[op[0]][1]} / {SPEEDUPS[op[0]][0]})"] if ratios is not None else []
            lines += [f"**{op[0]}**", ""] + setup_lines(op_rows)
            lines += ["| n | d | " + " | ".join(providers + extra) + " |",
                      "|---:|---:|" + "---|" * len(providers + extra)]  # fmt: skip
            sizes = sorted({(r["regime"] == "few", int(r["d"]), int(r["n"])) for r in op_rows})
            for few, d, n in sizes:
                by_provider = {r["provider"]: r for r in op_rows if int(r["n"]) == n and int(r["d"]) == d}
                limits = {kind: by_provider[kind] for kind in LIMITS if kind in by_provider}
                cells = [cell(by_provider.get(p), limits) for p in providers]
                if ratios is not None:
                    cells.append(f"{ratios[(n, d)]:.2f}×" if (n, d) in ratios else "")
                lines.append(f"| {n} | {d} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def setup_lines(op_rows: list[dict]) -> list[str]:
    """For ops without limits (end to end): what was run, from the notes of the timed rows."""
    if any(number(r, "time_vs_limit") is not None for r in op_rows):
        return []
    notes = sorted({r["note"] for r in op_rows if r["status"] == "ok" and r["note"]})
    return [f"No hardware limit; setup: {note}." for note in notes] + ([""] if notes else [])


def replace_between_markers(text: str, body: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the file needs exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{body}{END}{tail}"


def update_readme(path: Path, rows: list[dict]) -> None:
    path.write_text(replace_between_markers(path.read_text(), markdown(rows)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="*", type=Path, help="CSV files (default: benchmarks/results/*.csv)")
    p.add_argument("--out-dir", type=Path, help="where the PNGs go (default: the folder of the first CSV)")
    p.add_argument("--readme", type=Path, help="markdown file whose table between the markers is regenerated")
    p.add_argument("--ops", help="comma-separated ops to include (default: all)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    # Other result files (e.g. triton_precision_*.csv) live beside the timing CSVs: keep only the latter.
    paths = args.csv or [p for p in sorted(RESULTS_DIR.glob("*.csv")) if is_timing_csv(p)]
    if not paths:
        raise SystemExit("no CSV files: run a benchmark first, e.g. python -m benchmarks.svgd_step --quick")
    rows = latest_rows(paths)
    if args.ops:
        wanted = {op.strip() for op in args.ops.split(",")}
        unknown = sorted(wanted - {r["op"] for r in rows})
        if unknown:
            raise SystemExit(f"--ops: no rows of {', '.join(unknown)} (the files hold {', '.join(sorted({r['op'] for r in rows}))})")
        rows = [r for r in rows if r["op"] in wanted]
    if not rows:  # (a table of nothing would replace the README's tables)
        raise SystemExit(f"no rows in {', '.join(map(str, paths))}: nothing to plot, the README is left as it is")
    if args.readme:  # its markers, before any plot is written
        try:
            replace_between_markers(args.readme.read_text(), "")
        except (OSError, ValueError) as error:
            raise SystemExit(f"--readme {args.readme}: {error}") from None
    if not args.no_plots:
        out_dir = args.out_dir or paths[0].parent
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # (a file there, no permission: a traceback before)
            raise SystemExit(f"--out-dir {out_dir}: not a folder the PNGs can go to ({error})") from None
        for path in plot_all(rows, out_dir):
            print(path, file=sys.stderr)
    if args.readme:
        update_readme(args.readme, rows)
        print(f"updated the table in {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
