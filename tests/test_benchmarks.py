"""The benchmark harness: providers agree with the float64 reference, a quick sweep writes well-formed rows,
failures are recorded instead of ending the sweep, and the plots and README table are regenerated."""

import csv
import math

import pytest
import torch
from helpers import requires_cpu_extension

from benchmarks import harness, median_bandwidth, plot, rbf_kernel, svgd_step
from benchmarks.harness import CSV_HEADER, STATUSES, Case, Inputs
from benchmarks.providers import providers_for

OPS = {"svgd_step": svgd_step, "rbf_kernel": rbf_kernel, "median_bandwidth": median_bandwidth}
CPU = torch.device("cpu")


def runnable(op, *, jit):
    return [name for name, p in providers_for(op).items() if not p.why_unavailable(CPU) and p.jit == jit]


# Both regimes for the providers that run at once; one size for those that compile first (~10 s each).
CHECKS = [(op, name, n, d) for op in OPS for name in runnable(op, jit=False) for n, d in [(50, 7), (6, 1000)]]
CHECKS += [("svgd_step", name, 50, 7) for name in runnable("svgd_step", jit=True)]


@pytest.mark.parametrize("op,name,n,d", CHECKS)
def test_provider_matches_float64_reference(op, name, n, d):
    spec = OPS[op].SPEC
    inputs = Inputs.make(Case(n, d), torch.float32, CPU, seed=3)
    expected = spec.reference(inputs.float64())
    provider = providers_for(op)[name]
    assert harness.relative_error(provider.build(inputs)(), expected) <= provider.rtol


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
    rows = {(r["provider"], r["n"]): r for r in read_csv(out)}
    assert rows[("test-raises", "64")]["status"] == "error" and "on purpose" in rows[("test-raises", "64")]["note"]
    assert rows[("test-killed", "64")]["status"] == "oom"
    assert rows[("test-hang", "64")]["status"] == "timeout"
    assert rows[("torch-naive", "64")]["status"] == "ok"
    assert rows[("torch-naive", "65536")]["status"] == "skipped" and "would need" in rows[("torch-naive", "65536")]["note"]


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


def test_a_csv_with_another_header_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="another header"):
        harness.append_rows(path, [dict.fromkeys(CSV_HEADER, "")])
