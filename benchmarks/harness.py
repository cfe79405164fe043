"""Benchmark harness: providers timed side by side with the hardware limit measured in the same run.

How one benchmark runs (`python -m benchmarks.svgd_step [--quick]`):

* The parent process plans the cases (n, d), starts a worker process and shows progress (tqdm). The worker
  does all the measuring and streams one JSON event per line back. If the worker dies (the kernel's OOM
  killer, a crash) or a call outlives its time-out, the parent records that provider at that size as
  "oom"/"crashed"/"timeout" and starts a new worker for what is left, so one bad provider never ends the
  sweep.
* Before timing, every provider runs at two small sizes (one per regime) against the float64 reference of
  `bmt_fast.reference`; a provider that disagrees is recorded as "wrong" and not timed. At each
  benchmarked size, every provider's result is compared with an anchor provider (the compiled bmt_fast
  backend of the device when there is one): `max_rel_err` = max|a - b| / max|b|.
* Warm-up: one call (its time is `first_call_s`; for compiling providers it includes the compile), and a
  second one for compiling providers or calls under a second.
* Peak extra memory: one call per provider, alone. CPU: the Linux resident-set high-water mark (VmHWM in
  /proc/self/status, reset by writing 5 to /proc/self/clear_refs just before the call) minus the
  resident set just before it (after gc, malloc_trim and `bmt_fast.empty_cache()`, with the inputs
  allocated: memory that torch's allocator or bmt_fast's block cache kept from the warm-up calls would
  otherwise serve the call unseen; every CPU row committed before this was written did not empty
  bmt_fast's cache (memory_method without "bmt_fast.empty_cache"), so it left out a result and temporaries
  that came from it). GPU: torch.cuda.max_memory_allocated minus
  memory_allocated before the call. The result tensor counts.
* Timed rounds: each round calls every provider and both limits once, in an order rotated from round to
  round, so that load from other processes on a shared machine hits all of them alike. Calls shorter than
  `min_sample_s` are repeated within one sample and averaged. At least `min_repeats` and at most
  `max_repeats` samples, fewer rounds when the case's round budget is spent. GPU work is synchronised.
* Limits, measured in the same rounds: `limit-gemm` is torch's own matmuls doing the op's nominal FLOPs
  (shapes as the op needs them, one block of rows at a time where n x n would not fit), `limit-copy` is a
  torch copy that moves the bytes the op must move (read + write counted). Many-particle rows compare
  with the GEMM limit, few-particle/huge-d rows with the copy limit: `time_vs_limit` = time / limit
  (1.0 = as fast as the limit, lower is better).
* Each provider that cannot run, would not fit in memory, runs out of memory or time gets a row saying
  so. Rows are appended to `benchmarks/results/<device>.csv` as they arrive.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import importlib
import itertools
import json
import math
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
EVENT_PREFIX = "@@bench "

CSV_HEADER = [
    "timestamp", "run_id", "op", "provider", "status", "note",
    "device", "threads", "dtype", "n", "d", "regime", "bandwidth",
    "repeats", "time_median_s", "time_q1_s", "time_q3_s", "time_min_s", "time_max_s", "first_call_s",
    "peak_extra_mb", "flops", "gflops", "bytes", "gb_per_s",
    "limit_kind", "limit_s", "time_vs_limit", "limit_gemm_s", "limit_copy_s",
    "max_rel_err", "checked_against",
    "torch", "triton", "provider_version", "bmt_fast_commit", "memory_method", "env",
]  # fmt: skip
# Environment variables that change how CPU code runs; the ones that are set go into the "env" column.
RECORDED_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME",
                "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
# glibc malloc in the worker reuses freed memory instead of mapping every large block afresh (unless the caller
# set these): otherwise whether a result lands on already-touched pages depends on what other providers freed
# before (glibc's adaptive mmap threshold), and first-touch page faults of a 26 MB phi alone cost more than
# the whole svgd_step at n=16, d=409600. Reused pages are what a training loop sees in steady state.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def worker_environment() -> dict[str, str]:
    """The environment the providers run in (a worker process): the caller's, with WORKER_MALLOC_ENV's
    defaults. Every row's "env" column is read from it, also the rows the parent writes (unavailable,
    crashed, timed out), which had lacked the MALLOC_* settings."""
    return {**WORKER_MALLOC_ENV, **os.environ}


STATUSES = ("ok", "mismatch", "wrong", "skipped", "unavailable", "oom", "timeout", "crashed", "error")
LIMITS = ("limit-gemm", "limit-copy")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cross-check tolerance of a provider at a benchmarked size relative to its small-size tolerance: two fp32
# implementations summing up to 65,536 terms in different orders drift further apart than one from fp64.
# Capped: a result 10 % off the anchor is wrong in every dtype benchmarked (bf16's largest legitimate
# difference in the committed rows is 6 %, SDPA at 65,536 x 128 on the H200; the uncapped bf16 bound had been
# 0.4, so a provider 30 % off passed).
CROSS_CHECK_FACTOR = 10.0
CROSS_CHECK_CAP = 0.1
# A provider's rtol is for fp32 inputs; other dtypes scale it by their precision. float64's factor keeps its
# rounding-level agreement (5e-16 to 2e-14 measured) apart from a provider that computes in fp32 inside
# (~1e-6, which the factor 1 had let pass). Errors of the method itself (sampling, another median rule) are
# a provider's method_rtol, which does not scale.
DTYPE_TOLERANCE_FACTOR = {torch.float32: 1.0, torch.float64: 1e-8, torch.float16: 50.0, torch.bfloat16: 400.0}
CHECK_CASES = ((200, 16), (8, 2048))
ANCHOR_PREFERENCE = ("bmt_fast-cuda", "bmt_fast-triton", "bmt_fast-cpu", "bmt_fast-torch", "torch-naive")  # CHECK_CASES: one size per regime (8 x 2048 takes the CPU kernel's Gram path)


# ---- cases, inputs, ops ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    n: int
    d: int

    @property
    def regime(self) -> str:
        """"few": a handful of particles of huge dimension (soft prompts), bound by memory traffic;
        "many": many particles of moderate dimension, bound by the GEMM-like work."""
        return "few" if self.n <= 256 and self.d > 4096 else "many"

    def __str__(self) -> str:
        return f"n={self.n} d={self.d}"


def bandwidth_for(case: Case) -> float:
    return 2.0 * case.d / math.log(case.n + 1)


@dataclass
class Inputs:
    """Particles x (n, d), scores, and a fixed bandwidth H as a 0-dim tensor and as a float.

    H = 2d / log(n + 1): the median rule's value for the standard-normal particles drawn here (their
    squared distances concentrate around 2d), so kernel values are neither all 0 nor all 1."""

    x: torch.Tensor
    score: torch.Tensor
    h: torch.Tensor
    h_float: float

    @staticmethod
    def make(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> "Inputs":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(case.n, case.d, generator=generator).to(device=device, dtype=dtype)
        score = torch.randn(case.n, case.d, generator=generator).to(device=device, dtype=dtype)
        h = bandwidth_for(case)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return Inputs(x, score, torch.tensor(h, dtype=acc, device=device), h)

    def float64(self) -> "Inputs":
        return Inputs(self.x.double(), self.score.double(), self.h.double(), self.h_float)


@dataclass(frozen=True)
class OpSpec:
    """What the harness needs to know about an op besides its providers.

    flops(n, d): nominal FLOPs of one call (what achieved FLOP/s is computed from); None: no FLOP count
        (the flops and gflops columns stay empty).
    bytes_moved(n, d, elem_bytes): the bytes one call must at least read and write; None: not counted.
    gemm_limit(inputs): a run() doing the nominal FLOPs with torch's own matmuls; None: no limits at all
        (no limit rows, no time_vs_limit), as for an end-to-end step that has no single hardware limit.
    reference(inputs64): the float64 oracle from bmt_fast.reference.
    sweep(device, quick): the cases to run.
    make_inputs(case, dtype, device, seed): what `Provider.build` receives (default: `Inputs.make`); it
        needs a `float64()` method giving the reference's inputs. The end-to-end prompt-transfer step
        (`benchmarks/prompt_transfer_step.py`) passes a small HF model, a batch and M prompts here.
    check_cases: the (n, d) of the small-size check against the reference, one per regime.
    time_exponent: how a call's time grows with n at fixed d; the harness skips a size whose time,
        predicted from a smaller n, would surely exceed the call limit.
    bandwidth_label(case): what the bandwidth column says (default: the fixed H of `bandwidth_for`).
    describe(case): added to the note of every row of the case (e.g. which model an end-to-end row ran).
    error_scale: the inputs' conditioning: the providers' tolerances (check and cross-check, within
        CROSS_CHECK_CAP) are multiplied by it (particles far apart next to the kernel's width: fp32 itself is
        ~1e-3 off there, torch's own formula too).
    options: extra command-line options of the op, name -> `add_argument` keywords (`--name` on the
        command line); their values go to `configure`, in the parent and in every worker.
    configure(options) -> OpSpec: the spec to run for these option values (e.g. another model).
    """

    name: str
    flops: Callable[[int, int], float] | None
    bytes_moved: Callable[[int, int, int], float] | None
    gemm_limit: Callable[[Inputs], Callable[[], torch.Tensor]] | None
    reference: Callable[[Inputs], torch.Tensor]
    sweep: Callable[[torch.device, bool], list[Case]]
    description: str = ""
    make_inputs: Callable[..., object] = Inputs.make
    check_cases: tuple[tuple[int, int], ...] = CHECK_CASES
    time_exponent: float = 2.0
    bandwidth_label: Callable[[Case], str] | None = None
    describe: Callable[[Case], str] | None = None
    error_scale: float = 1.0
    options: dict[str, dict] = field(default_factory=dict)
    configure: Callable[[dict], "OpSpec"] | None = None


def configured(op: OpSpec, options: dict) -> OpSpec:
    """The op as run with these option values (the op itself when it has no options)."""
    return op.configure(options) if op.configure is not None else op


def copy_limit(spec: OpSpec, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """A torch copy moving the op's bytes: half of them read, half written."""
    n, d = inputs.x.shape
    elems = max(1, int(spec.bytes_moved(n, d, inputs.x.element_size()) // (2 * inputs.x.element_size())))
    src = torch.randn(elems, device=inputs.x.device).to(inputs.x.dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def grid(ns: Iterable[int], ds: Iterable[int]) -> list[Case]:
    return [Case(n, d) for d in ds for n in ns]


def trim(cases: Iterable[Case], flops: Callable[[int, int], float], max_flops: float, keep: Iterable[Case]) -> list[Case]:
    """Cases within a FLOP budget (the CPU cannot run the biggest GPU sizes in a sweep) plus the key cases."""
    keep = list(keep)
    chosen = [c for c in cases if flops(c.n, c.d) <= max_flops or c in keep]
    return chosen + [c for c in keep if c not in chosen]


# ---- device and environment -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """'family 6 model 167' from /proc/cpuinfo ('' elsewhere): VMs that name their CPU only 'Intel(R) Xeon(R)
    Processor' run on different hosts under that one name (a 2-core VM reported model 207, Emerald Rapids,
    and later model 167 with other caches and speeds), whose timings must not share a table."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        pass
    if "cpu family" in fields and "model" in fields:
        return f"family {fields['cpu family']} model {fields['model']}"
    return ""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# bmt_fast's CPU kernels pick an instruction set at run time (`python -m bmt_fast.info`: cpu_isa); the VMs we
# measure on often report only "AMD EPYC", so the CPU device name says which build ran.
CPU_ISA_NAMES = {"v4": "AVX-512", "v3": "AVX2", "base": "SSE2"}


def cpu_isa() -> str:
    """The instruction set of the CPU kernels in use ('AVX-512', 'AVX2', 'SSE2'), '' without the extension."""
    from bmt_fast import _extension

    if not _extension.CPU.loaded:
        return ""
    isa = _extension.CPU.module.build_info().get("cpu_isa", "")
    return CPU_ISA_NAMES.get(isa, isa)


def device_name(device: torch.device) -> str:
    """'NVIDIA H200'; 'Intel(R) Xeon(R) Processor (2 cores, AVX-512, family 6 model 167)' (rows measured before the ISA was named
    lack it, and those before 2026-12-03's fourth session the CPUID family and model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    details = [f"{cpu_count()} cores"] + [part for part in (cpu_isa(), cpu_id()) if part]
    return f"{cpu_model()} ({', '.join(details)})"


def device_slug(name: str) -> str:
    """A file-name-safe form of the device name: 'Intel(R) Xeon(R) Processor (2 cores)' ->
    'intel-r-xeon-r-processor-2-cores'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_csv(device: torch.device) -> Path:
    return RESULTS_DIR / f"{device_slug(device_name(device))}.csv"


def triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except Exception:  # noqa: BLE001 - not installed, or metadata unreadable
        return ""


def git_commit() -> str:
    """The checkout's commit, "+dirty" with local edits; BMT_FAST_COMMIT overrides it, for copies of a checkout
    whose .git does not follow the files (a GPU machine's copy of the working tree)."""
    if os.environ.get("BMT_FAST_COMMIT"):
        return os.environ["BMT_FAST_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(  # local edits to the code (the results themselves do not count)
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory ------------------------------------------------------------------------------------------


class CpuPeakMemory:
    """Peak resident memory of one call above the resident memory just before it (Linux)."""

    method = "cpu: VmHWM after clear_refs minus VmRSS before the call (gc + malloc_trim + bmt_fast.empty_cache first)"

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._libc = libc if hasattr(libc, "malloc_trim") else None  # glibc only
        self.why_unavailable = ""
        try:
            self._reset_high_water_mark()
            self._status_kb("VmHWM")
        except (OSError, KeyError) as exc:
            self.why_unavailable = f"cannot read or reset the RSS high-water mark: {exc}"

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    @staticmethod
    def _reset_high_water_mark() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def start(self) -> None:
        gc.collect()
        import bmt_fast

        bmt_fast.empty_cache()  # the CPU ops' cached blocks (csrc/cpu/huge_pages.h) back to malloc, then
        if self._libc is not None:  # freed heap pages back to the OS, or they would hide new allocations
            self._libc.malloc_trim(0)  # (the workers set MALLOC_MMAP_MAX_=0: every block is heap memory)
        self._baseline_kb = self._status_kb("VmRSS")
        self._reset_high_water_mark()

    def peak_extra_bytes(self) -> int:
        return 1024 * max(0, self._status_kb("VmHWM") - self._baseline_kb)


class CudaPeakMemory:
    method = "cuda: max_memory_allocated minus memory_allocated before the call"
    why_unavailable = ""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        self._baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_extra_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._baseline)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages)


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()  # (the CPU allocator's own: "DefaultCPUAllocator: can't allocate memory")
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text


# ---- rows --------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


@dataclass
class Context:
    """Everything a row needs besides the measurement."""

    op: OpSpec
    device: torch.device
    dtype: torch.dtype
    run_id: str
    device_name: str
    commit: str
    memory_method: str

    def row(self, provider: str, case: Case, status: str, note: str = "", **fields) -> dict:
        e = torch.empty((), dtype=self.dtype).element_size()
        op = self.op
        bandwidth = op.bandwidth_label(case) if op.bandwidth_label else fmt(bandwidth_for(case), 6)
        note = "; ".join(text for text in (note, op.describe(case) if op.describe else "") if text)
        row = dict.fromkeys(CSV_HEADER, "")
        env = worker_environment()
        row.update(
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            run_id=self.run_id, op=self.op.name, provider=provider, status=status, note=note,
            device=self.device_name, threads=torch.get_num_threads() if self.device.type == "cpu" else "",
            dtype=str(self.dtype).replace("torch.", ""), n=case.n, d=case.d, regime=case.regime,
            bandwidth=bandwidth,
            flops=int(op.flops(case.n, case.d)) if op.flops else "",
            bytes=int(op.bytes_moved(case.n, case.d, e)) if op.bytes_moved else "",
            limit_kind=("gemm" if case.regime == "many" else "copy") if self.op.gemm_limit is not None else "",
            torch=torch.__version__, triton=triton_version(), bmt_fast_commit=self.commit,
            memory_method=self.memory_method,
            env=" ".join(f"{k}={env[k]}" for k in RECORDED_ENV if k in env),
        )  # fmt: skip
        row.update({k: v for k, v in fields.items() if k in row})
        return row


def timing_fields(ctx: Context, case: Case, samples: list[float], limits: dict[str, float]) -> dict:
    """Median, quartiles and extremes of the samples, throughput and the ratio to the limits."""
    s = sorted(samples)
    median = statistics.median(s)
    e = torch.empty((), dtype=ctx.dtype).element_size()
    kind = "limit-gemm" if case.regime == "many" else "limit-copy"
    limit = limits.get(kind)
    return dict(
        repeats=len(s), time_median_s=fmt(median), time_q1_s=fmt(percentile(s, 0.25)),
        time_q3_s=fmt(percentile(s, 0.75)), time_min_s=fmt(s[0]), time_max_s=fmt(s[-1]),
        gflops=fmt(ctx.op.flops(case.n, case.d) / median / 1e9 if ctx.op.flops else None),
        gb_per_s=fmt(ctx.op.bytes_moved(case.n, case.d, e) / median / 1e9 if ctx.op.bytes_moved else None),
        limit_s=fmt(limit), time_vs_limit=fmt(median / limit if limit else None),
        limit_gemm_s=fmt(limits.get("limit-gemm")), limit_copy_s=fmt(limits.get("limit-copy")),
    )  # fmt: skip


def check_out_file(path: Path) -> None:
    """Before anything is measured: refuse a folder, a path that cannot be written (under a file, no
    permission: found after the measurements before, as a traceback), or a CSV with another header (an older
    format)."""
    if path.is_dir():
        raise SystemExit(f"--out {path} is a folder; name a CSV file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--out {path}: cannot make its folder ({error})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemExit(f"--out {path}: not writable")
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            first = f.readline()
        if not first.endswith(("\n", "\r")) and ",".join(CSV_HEADER).startswith(first):
            return  # (our header cut short by a run killed while writing it: append_rows drops it and writes it)
        header = next(csv.reader([first]), [])
        if header != CSV_HEADER:
            raise SystemExit(f"{path} has another header; write to a new file with --out")


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows under the fixed header (written when the file is new); refuse a file with another header.
    A last record without its line end (a run killed mid-write) is dropped first (drop_cut_last_record, said
    on stderr): kept, it had made the plot script refuse the whole file as damaged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_out_file(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            ended = f.read(1) in (b"\n", b"\r")
        if not ended:
            drop_cut_last_record(path)
            new = path.stat().st_size == 0  # (the header itself was cut short)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_HEADER)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def drop_cut_last_record(path: Path) -> None:
    """The file's last line has no newline: its last record was cut short (the harness ends every row with
    one), so it is cut off, from the start of that record (a quoted note may hold line breaks: a whole-looking
    last line had been kept though cut inside its last field, and a record with a line break cut at the
    break, leaving an open quote that swallowed the next row)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")  # (bytes back as they were)
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    through = list(itertools.accumulate(len(line) for line in lines))  # characters through each line
    reader = csv.reader(lines)
    start = position = 0  # where the last record read (or the one that failed to parse) starts
    try:
        for _ in reader:
            start, position = position, through[reader.line_num - 1]
    except csv.Error:  # (an open quote at the end: the record from position on)
        start = position
    last = text[start:]
    with open(path, "r+b") as f:
        f.truncate(len(text[:start].encode("utf-8", errors="surrogateescape")))
    print(f"{path}: dropped a row cut short: {last[:120]!r}", file=sys.stderr)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- the worker: measures ----------------------------------------------------------------------------


@dataclass
class Settings:
    min_repeats: int = 3
    max_repeats: int = 7
    min_sample_s: float = 0.02
    max_call_s: float = 60.0
    case_budget_s: float = 60.0  # time for the timed rounds of one case, beyond min_repeats
    compile_allowance_s: float = 300.0  # extra time allowed for a first call that compiles
    jit_overhead_s: float = 30.0  # what compiling usually adds to a first call (a cached compile: less)
    memory_headroom: float = 0.8  # skip a provider whose estimate exceeds this share of available memory


class Worker:
    def __init__(self, spec: dict, emit: Callable[..., None]):
        self.emit = emit
        self.op: OpSpec = configured(importlib.import_module(spec["module"]).SPEC, spec.get("options", {}))
        from benchmarks.providers import providers_for

        self.providers = providers_for(self.op.name)
        self.device = torch.device(spec["device"])
        self.dtype = DTYPES[spec["dtype"]]
        self.settings = Settings(**spec["settings"])
        self.memory = CudaPeakMemory(self.device) if self.device.type == "cuda" else CpuPeakMemory()
        method = self.memory.method if not self.memory.why_unavailable else f"unavailable: {self.memory.why_unavailable}"
        self.ctx = Context(self.op, self.device, self.dtype, spec["run_id"], spec["device_name"], spec["commit"], method)
        # (provider, d) -> (n, seconds per call, status) of its largest run so far, to skip sure time-outs
        self.history: dict[tuple[str, int], tuple[int, float, str]] = {}
        self.failed: set[str] = set()  # providers that failed the small-size check: not timed
        for name, n, d, seconds, status in spec.get("history", []):
            self.remember(name, Case(n, d), seconds, status)

    # -- helpers --

    def timed_call(self, run: Callable[[], torch.Tensor], batch: int = 1) -> tuple[float, torch.Tensor]:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(batch):
            out = run()
        synchronize(self.device)
        return (time.perf_counter() - start) / batch, out

    def tolerance(self, name: str) -> float:
        return tolerance(self.providers[name], self.dtype, self.op.error_scale)

    def remember(self, name: str, case: Case, seconds: float, status: str) -> None:
        previous = self.history.get((name, case.d))
        if previous is None or previous[0] <= case.n:
            self.history[(name, case.d)] = (case.n, seconds, status)

    def sure_timeout(self, name: str, case: Case) -> str:
        """Why a provider would surely run out of time at this many-particle size (its cost grows as n²,
        or as n ** op.time_exponent)."""
        n0, seconds, status = self.history.get((name, case.d), (case.n, 0.0, ""))
        if case.regime != "many" or n0 >= case.n:
            return ""
        if status == "timeout":
            return f"timed out at n={n0} already"
        power = self.op.time_exponent
        predicted = seconds * (case.n / n0) ** power
        if predicted > self.settings.max_call_s:
            growth = f"(n/{n0})" + ("²" if power == 2 else f"^{power:g}")
            limit = self.settings.max_call_s
            return f"would take ~{predicted:.0f} s per call ({seconds:.3g} s at n={n0}, times {growth}) > {limit:g} s"
        return ""

    # -- small-size check against float64 --

    def check(self, names: list[str]) -> None:
        """Each provider against the float64 reference at the op's check sizes; those that disagree or fail
        go into self.failed, which measure() then leaves out (the parent has recorded them at every size)."""
        for n, d in self.op.check_cases:
            case = Case(n, d)
            inputs = self.op.make_inputs(case, self.dtype, self.device, seed=1)
            expected = self.op.reference(inputs.float64())
            for name in names:
                # (a call's limit and the compile allowance: the allowance alone, 0 allowed, had killed every check)
                deadline = self.settings.max_call_s + self.settings.compile_allowance_s
                self.emit("begin", provider=name, case=[n, d], phase="check", deadline_s=deadline)
                try:
                    actual = self.providers[name].build(inputs)()
                    err = relative_error(actual, expected)
                    ok = err <= self.tolerance(name)
                    note = "" if ok else f"differs from bmt_fast.reference (float64) by {err:.2e} > {self.tolerance(name):.1e}"
                    self.emit("check", provider=name, case=[n, d], ok=ok, error=err, note=note, status="wrong")
                except Exception as exc:  # noqa: BLE001 - a provider failing the check is recorded, not fatal
                    ok, status = False, "oom" if is_oom(exc) else "error"
                    self.emit("check", provider=name, case=[n, d], ok=False, error=None, note=error_note(exc), status=status)
                if not ok:
                    self.failed.add(name)

    # -- one case --

    def measure(self, case: Case, names: list[str]) -> None:
        try:
            inputs = self.op.make_inputs(case, self.dtype, self.device)
        except Exception as exc:  # noqa: BLE001 - inputs that do not fit: every provider's row says so
            if not is_oom(exc):
                raise
            for name in names:  # (a "crashed" worker before, the allocator's error not read as one)
                self.row(name, case, "oom", f"the inputs do not fit: {error_note(exc)}")
            return
        e = torch.empty((), dtype=self.dtype).element_size()
        s = self.settings
        runs: dict[str, Callable[[], torch.Tensor]] = {}
        warm: dict[str, float] = {}
        info: dict[str, dict] = {}
        anchor: tuple[str, torch.Tensor] | None = None

        for name in anchor_first(names, self.providers, self.dtype):
            provider = self.providers[name]
            need = provider.extra_memory(case.n, case.d, e)
            free = available_memory(self.device)
            if need > s.memory_headroom * free:
                self.row(name, case, "skipped", f"would need ~{need / 1e9:.1f} GB; {free / 1e9:.1f} GB available")
                continue
            too_slow = self.sure_timeout(name, case)
            if too_slow:
                self.row(name, case, "skipped", too_slow)
                continue
            self.emit("begin", provider=name, case=[case.n, case.d], phase="warm-up",
                      deadline_s=3 * s.max_call_s + s.compile_allowance_s)  # fmt: skip
            try:
                run = provider.build(inputs)
                first, out = self.timed_call(run)
                # A second warm-up call when the first may have compiled, or was short enough for one-time
                # costs (first touch of memory, thread start) to matter; then the warm call is a sample.
                again = first < 1.0 or (provider.jit and first <= 2 * s.max_call_s + s.jit_overhead_s)
                second = self.timed_call(run)[0] if again else first
            except Exception as exc:  # noqa: BLE001
                self.row(name, case, "oom" if is_oom(exc) else "error", error_note(exc))
                continue
            fields = {"first_call_s": fmt(first)}
            self.remember(name, case, second, "timeout" if second > s.max_call_s else "ok")
            if second > s.max_call_s:
                what = "one call" if not provider.jit or again else "the first call (with its compile)"
                self.row(name, case, "timeout", f"{what} took {second:.1f} s > {s.max_call_s:g} s", **fields)
                continue
            if second >= 1.0 and not provider.jit:
                fields["warm_sample"] = second
            problem = result_problem(out)  # (finite inputs: a NaN had compared as within every tolerance)
            if problem:
                fields.update(status="mismatch", note=problem)
            elif anchor is None:
                anchor = (name, out)
            else:
                try:
                    err = relative_error(out, anchor[1])
                except ValueError as exc:  # (another shape: it had stopped the worker)
                    fields.update(status="mismatch", note=f"{exc} (as {anchor[0]}'s)")
                else:
                    fields.update(max_rel_err=fmt(err, 3), checked_against=anchor[0])
                    tolerance = cross_check_tolerance(self.providers[name], self.dtype, self.providers[anchor[0]], self.op.error_scale)
                    if not err <= tolerance:
                        fields["status"] = "mismatch"
                        fields["note"] = f"differs from {anchor[0]} by {err:.2e}"
            del out
            runs[name], warm[name], info[name] = run, second, fields
        anchor = None
        if not runs:
            return  # every provider was recorded already: no limits to compare with

        limits = [("limit-gemm", self.op.gemm_limit), ("limit-copy", lambda inp: copy_limit(self.op, inp))]
        for kind, build in limits if self.op.gemm_limit is not None else []:
            self.emit("begin", provider=kind, case=[case.n, case.d], phase="warm-up", deadline_s=3 * s.max_call_s + 60)
            try:
                run = build(inputs)
                warm[kind] = self.timed_call(run)[0]
                if warm[kind] < 1.0:
                    warm[kind] = self.timed_call(run)[0]
                runs[kind], info[kind] = run, {}
            except Exception as exc:  # noqa: BLE001
                self.row(kind, case, "oom" if is_oom(exc) else "error", error_note(exc))

        failed: dict[str, BaseException] = {}  # a provider whose later call raised: its row says so, the others are kept
        samples = self.measure_memory(case, runs, warm, info, failed)
        for name, fields in info.items():
            if "warm_sample" in fields and name in samples:
                samples[name].append(fields.pop("warm_sample"))
        self.emit("begin", provider="", case=[case.n, case.d], phase="timed rounds",
                  deadline_s=2 * (sum(warm.values()) * s.max_repeats + s.case_budget_s) + 60)  # fmt: skip
        self.rounds(runs, warm, samples, failed)
        limits = {k: statistics.median(samples[k]) for k in LIMITS if samples.get(k)}
        for name, fields in info.items():
            if name in failed:
                exc = failed[name]
                self.row(name, case, "oom" if is_oom(exc) else "error", f"after its warm-up: {error_note(exc)}")
                continue
            status = fields.pop("status", "ok")
            note = fields.pop("note", "")
            self.row(name, case, status, note, **fields, **timing_fields(self.ctx, case, samples[name], limits))

    def measure_memory(self, case, runs, warm, info, failed) -> dict[str, list[float]]:
        """Peak extra memory of one call per provider; that call is also a timing sample when a sample
        is one call. A provider whose call raises goes from runs and samples into failed."""
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for name, run in list(runs.items()):
            if self.memory.why_unavailable:
                break
            self.emit("begin", provider=name, case=[case.n, case.d], phase="memory",
                      deadline_s=3 * warm[name] + 60)  # fmt: skip
            self.memory.start()
            try:
                elapsed, out = self.timed_call(run)
            except Exception as exc:  # noqa: BLE001 - (it had stopped the worker: every row "crashed")
                self.drop(name, exc, runs, samples, failed)
                continue
            info[name]["peak_extra_mb"] = fmt(self.memory.peak_extra_bytes() / 2**20)
            del out
            if warm[name] >= self.settings.min_sample_s:
                samples[name].append(elapsed)
        return samples

    @staticmethod
    def drop(name, exc, runs, samples, failed) -> None:
        failed[name] = exc
        runs.pop(name, None)
        samples.pop(name, None)

    def rounds(self, runs, warm, samples, failed) -> None:
        s = self.settings
        names = list(runs)
        batch = {k: max(1, min(1000, math.ceil(s.min_sample_s / max(warm[k], 1e-9)))) for k in names}
        start = time.perf_counter()
        for r in range(s.max_repeats):
            for name in names[r % len(names):] + names[: r % len(names)] if names else []:
                if name in runs and len(samples[name]) < s.max_repeats:
                    try:
                        samples[name].append(self.timed_call(runs[name], batch[name])[0])
                    except Exception as exc:  # noqa: BLE001 - (had marked every provider of the case "crashed")
                        self.drop(name, exc, runs, samples, failed)
            spent = time.perf_counter() - start
            if all(len(v) >= s.min_repeats for v in samples.values()) and spent > s.case_budget_s:
                break
            if all(len(v) >= s.max_repeats for v in samples.values()):
                break

    def row(self, name: str, case: Case, status: str, note: str = "", **fields) -> None:
        version = self.providers[name].version() if name in self.providers else f"torch {torch.__version__}"
        self.emit("row", row=self.ctx.row(name, case, status, note, provider_version=version, **fields))


def anchor_first(names: list[str], providers: dict, dtype: torch.dtype) -> list[str]:
    """The provider the others are compared with goes first: the compiled bmt_fast backend if present, else
    the one with the smallest tolerance in this dtype (the first of equals; the first named had been taken,
    a reduced-precision one too, and exact providers were then "mismatch")."""
    anchor = next((p for p in ANCHOR_PREFERENCE if p in names), None)
    if anchor is None and names:
        anchor = min(names, key=lambda name: tolerance(providers[name], dtype))
    return [anchor] + [n for n in names if n != anchor] if anchor else list(names)


def result_problem(out) -> str:
    """Why a provider's result cannot be right whatever it is compared with (its inputs are finite), or ""."""
    try:
        finite = bool(torch.isfinite(torch.as_tensor(out).detach()).all())
    except (TypeError, RuntimeError, ValueError) as exc:
        return f"result is not a tensor: {error_note(exc)}"
    return "" if finite else "result is not finite (the inputs are)"


def relative_error(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise ValueError(f"result has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.abs().max().clamp_min(1e-300)
    return float((actual - expected).abs().max() / scale)


def tolerance(provider, dtype: torch.dtype, scale: float = 1.0) -> float:
    """Allowed max|a - b| / max|b| against the float64 reference at the check sizes: the provider's rtol (for
    fp32 inputs) scaled to the dtype's precision, or its method's own error where that is larger, times the
    inputs' `scale` (OpSpec.error_scale); at most CROSS_CHECK_CAP (uncapped, a bf16 provider 50 % off had
    passed at 0.8)."""
    return min(max(provider.method_rtol, provider.rtol * DTYPE_TOLERANCE_FACTOR[dtype]) * scale, CROSS_CHECK_CAP)


def cross_check_tolerance(provider, dtype: torch.dtype, anchor=None, scale: float = 1.0) -> float:
    """Allowed difference from the anchor provider at a benchmarked size (see CROSS_CHECK_FACTOR): from the
    larger of the two providers' tolerances (the anchor's own error counts too: scipy's exact median had been
    a mismatch against torch-naive's lower median)."""
    own = tolerance(provider, dtype, scale)
    if anchor is not None:
        own = max(own, tolerance(anchor, dtype, scale))
    return min(CROSS_CHECK_FACTOR * own, CROSS_CHECK_CAP)


def error_note(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]


def worker_main() -> None:
    """Entry point of the worker process: the plan comes on stdin, events go to the original stdout;
    everything else anything prints (compilers, KeOps) goes to stderr, i.e. the parent's log file."""
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.load(sys.stdin)

    def emit(kind: str, **payload) -> None:
        events.write(EVENT_PREFIX + json.dumps({"event": kind, **payload}) + "\n")

    worker = Worker(spec, emit)
    if spec.get("check"):
        worker.check(spec["check"])
    for n, d, names in spec["cases"]:
        # (a provider that failed the check is recorded as such at every size by the parent: it had been timed
        # all the same, and its second row, "ok" with a time, was the one the tables showed)
        worker.measure(Case(n, d), [name for name in names if name not in worker.failed])
    emit("done")


# ---- the parent: plans, supervises, writes ----------------------------------------------------------


class Supervisor:
    """Runs the plan in worker processes, restarting them past a provider that killed or hung one."""

    def __init__(self, ctx: Context, spec: dict, out: Path, log: Path, progress):
        self.ctx, self.spec, self.out, self.log, self.progress = ctx, spec, out, log, progress
        self.rows: list[dict] = []
        self.failed_checks: dict[str, str] = {}

    def write(self, row: dict) -> None:
        append_rows(self.out, [row])
        self.rows.append(row)
        if row["provider"] not in LIMITS:
            self.progress.update(1)

    def run(self, check: list[str], cases: list[tuple[Case, list[str]]]) -> None:
        pending = {(c.n, c.d): list(names) for c, names in cases}
        order = [(c.n, c.d) for c, _ in cases]
        to_check = list(check)
        while to_check or any(pending.values()):
            plan = dict(self.spec, check=to_check, history=self.history(),
                        cases=[[n, d, pending[(n, d)]] for n, d in order if pending[(n, d)]])  # fmt: skip
            inflight, returncode = self.run_worker(plan, pending, to_check)
            if returncode == 0 and inflight is None:
                break
            self.record_failure(inflight, returncode, pending, to_check)

    def history(self) -> list[list]:
        """What a restarted worker needs to know to skip sure time-outs: seconds per call so far."""
        past = []
        for row in self.rows:
            seconds = row["time_median_s"] if row["status"] == "ok" else row["first_call_s"]
            if row["status"] in ("ok", "timeout") and seconds:
                past.append([row["provider"], int(row["n"]), int(row["d"]), float(seconds), row["status"]])
        return past

    def run_worker(self, plan: dict, pending: dict, to_check: list[str]):
        """Runs one worker until it finishes, dies or overruns a deadline; returns the in-flight event."""
        with open(self.log, "a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.harness", "--worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True, cwd=Path(__file__).resolve().parent.parent,
                start_new_session=True, env=worker_environment(),
            )  # fmt: skip
        proc.stdin.write(json.dumps(plan))
        proc.stdin.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
        inflight, inflight_started = None, time.monotonic()
        deadline = inflight_started + 600  # until the first event: imports, and torch's first start
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return dict(inflight or {}, killed_after=time.monotonic() - inflight_started), "timeout"
            if line is None:
                proc.wait()
                return (None if proc.returncode == 0 else inflight), proc.returncode
            if not line.startswith(EVENT_PREFIX):
                continue
            event = json.loads(line[len(EVENT_PREFIX):])
            kind = event["event"]
            if kind == "begin":
                inflight, inflight_started = event, time.monotonic()
                deadline = inflight_started + event["deadline_s"]
                self.progress.set_postfix_str(f"n={event['case'][0]} d={event['case'][1]} {event['provider']} {event['phase']}")
            elif kind == "row":
                row = event["row"]
                key = (int(row["n"]), int(row["d"]))
                if row["provider"] in pending.get(key, []):
                    pending[key].remove(row["provider"])
                self.write(row)
                inflight = None
            elif kind == "check":
                self.record_check(event, to_check, pending)
                inflight = None
            elif kind == "done":
                inflight, deadline = None, time.monotonic() + 60

    def record_check(self, event: dict, to_check: list[str], pending: dict) -> None:
        name = event["provider"]
        n, d = event["case"]
        if name in to_check and (n, d) == tuple(self.ctx.op.check_cases[-1]):
            to_check.remove(name)
        if event["ok"] or name in self.failed_checks:
            return
        note = f"small-size check at n={n} d={d}: {event['note']}"
        self.fail_check(name, note, pending, to_check, event.get("status", "wrong"))

    def fail_check(self, name: str, note: str, pending: dict, to_check: list[str], status: str = "wrong") -> None:
        """The provider failed its small-size check: every size it has left is recorded with what happened
        there (wrong: it disagreed with the reference; error, oom, timeout, crashed: it did not finish)."""
        if name in to_check:
            to_check.remove(name)
        self.failed_checks[name] = note
        for (cn, cd), names in pending.items():
            if name in names:
                names.remove(name)
                self.write(self.ctx.row(name, Case(cn, cd), status, note))

    def record_failure(self, inflight: dict | None, returncode, pending: dict, to_check: list[str]) -> None:
        """The worker died or hung: charge it to the provider (or case) it was running."""
        tail = log_tail(self.log)
        if returncode == "timeout":
            status, note = "timeout", f"no result after {inflight.get('killed_after', 0):.0f} s ({inflight.get('phase')}); killed"
        elif returncode in (-signal.SIGKILL, 137):
            status, note = "oom", f"worker killed by SIGKILL (out of memory?) during {inflight and inflight.get('phase')}"
        else:
            status, note = "crashed", f"worker exited with {returncode} during {inflight and inflight.get('phase')}: {tail}"
        if not inflight or not inflight.get("case"):
            for key, names in pending.items():  # cannot tell whom to blame: record the rest and stop
                for name in list(names):
                    self.write(self.ctx.row(name, Case(*key), "crashed", note))
                names.clear()
            to_check.clear()
            return
        n, d = inflight["case"]
        name = inflight["provider"]
        if inflight["phase"] == "check":
            self.fail_check(name, f"small-size check at n={n} d={d}: {note}", pending, to_check, status)
            return
        names = pending.get((n, d), [])
        blamed = [name] if name and name in names else list(names)  # timed rounds: the whole case
        seconds = fmt(inflight["killed_after"]) if "killed_after" in inflight else ""
        for who in blamed:
            names.remove(who)
            self.write(self.ctx.row(who, Case(n, d), status, note, first_call_s=seconds))


def log_tail(path: Path, chars: int = 300) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " ".join(text[-chars:].split())


# ---- command line ------------------------------------------------------------------------------------


def chosen_providers(text: str | None, providers: dict) -> list[str]:
    """The providers named in a comma-separated list (all of them when it is not given); ValueError for a
    list that names none, a name that is not one of them, or one named twice."""
    if text is None:
        return list(providers)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen:  # ("--providers ," had run nothing and exited 0; "" had run every provider)
        raise ValueError(f"--providers names no provider; choose from {', '.join(providers)}")
    twice = sorted({name for name in chosen if chosen.count(name) > 1})
    if twice:  # (a repeated unavailable provider had two rows per size)
        raise ValueError(f"--providers names {', '.join(twice)} more than once")
    unknown = [name for name in chosen if name not in providers]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(providers)}")
    return chosen


def parse_sizes(text: str) -> list[Case]:
    try:
        cases = [Case(*map(int, item.lower().split("x"))) for item in text.split(",") if item.strip()]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"--sizes wants NxD[,NxD...], e.g. 8192x128,16x409600; got {text!r}")
    bad = [str(c) for c in cases if c.n < 1 or c.d < 1]
    if bad or not cases:
        raise argparse.ArgumentTypeError(f"--sizes wants N >= 1 particles of D >= 1 features; got {text!r}")
    twice = sorted({f"{c.n}x{c.d}" for c in cases if cases.count(c) > 1})
    if twice:  # (a repeated size had been timed twice, but a failed provider's row written once)
        raise argparse.ArgumentTypeError(f"--sizes names {', '.join(twice)} more than once")
    return cases


def positive(kind: type, *, zero: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite number of `kind` greater than 0 (at least 0 with zero=True)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants a {kind.__name__}, got {text!r}") from None
        if not (value >= 0 if zero else value > 0) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"wants a finite number {'>=' if zero else '>'} 0, got {text!r}")
        return value

    return parse


def parse_device(text: str) -> torch.device:
    """--device: cpu, or cuda[:i] where torch sees that GPU."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"wants cpu or cuda[:i], got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text}: torch sees {count} CUDA device(s) here")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"wants cpu or cuda[:i], got {text!r}")
    return device


def parser(op: OpSpec) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{op.name}", description=op.description)
    p.add_argument("--quick", action="store_true", help="a small sweep that takes about a minute on a CPU")
    p.add_argument("--providers", help="comma-separated provider names (default: all); see --list")
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:i]")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--out", type=Path, help="CSV to append to (default: benchmarks/results/<device>.csv)")
    p.add_argument("--sizes", type=parse_sizes, help="run these NxD sizes instead of the sweep, e.g. 8192x128,16x409600")
    p.add_argument("--repeats", type=positive(int),
                   help="at most this many timed samples per provider (default 7 on a GPU, 5 on a CPU, quick 3)")
    p.add_argument("--max-call-seconds", type=positive(float),
                   help="a provider whose warm call takes longer is recorded as a time-out")
    p.add_argument("--case-budget-seconds", type=positive(float, zero=True),
                   help="time for the timed rounds of one size beyond the minimum")
    p.add_argument("--compile-seconds", type=positive(float, zero=True),
                   help="extra time a first (compiling) call may take (default 300)")
    p.add_argument("--no-check", action="store_true", help="skip the small-size float64 check")
    p.add_argument("--list", action="store_true", help="list the providers and whether they can run here, then exit")
    for name, keywords in op.options.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, **keywords)
    return p


def settings_for(args) -> Settings:
    if args.quick:
        s = Settings(min_repeats=3, max_repeats=3, max_call_s=5.0, case_budget_s=2.0)
    elif args.device.type == "cpu":  # a full CPU sweep within about 25 minutes on 2 cores
        s = Settings(min_repeats=3, max_repeats=5, max_call_s=30.0, case_budget_s=15.0)
    else:
        s = Settings()
    if args.repeats is not None:
        s.max_repeats = args.repeats
        s.min_repeats = min(s.min_repeats, s.max_repeats)
    if args.max_call_seconds is not None:
        s.max_call_s = args.max_call_seconds
    if args.case_budget_seconds is not None:
        s.case_budget_s = args.case_budget_seconds
    if args.compile_seconds is not None:
        s.compile_allowance_s = args.compile_seconds
    return s


def main(op: OpSpec, argv: list[str] | None = None) -> list[dict]:
    """Runs a benchmark from the command line; returns the rows it appended."""
    from benchmarks.providers import providers_for

    args = parser(op).parse_args(argv)
    options = {name: getattr(args, name) for name in op.options}
    op = configured(op, options)
    device = args.device
    providers = providers_for(op.name)
    if args.list:
        for name, p in providers.items():
            reason = p.unavailable(device, DTYPES[args.dtype])
            print(f"{name:18s} {'available' if not reason else 'unavailable: ' + reason}")
        return []
    try:
        chosen = chosen_providers(args.providers, providers)
    except ValueError as exc:
        raise SystemExit(str(exc))
    cases = args.sizes or op.sweep(device, args.quick)
    name = device_name(device)
    out = args.out or RESULTS_DIR / f"{device_slug(name)}.csv"
    check_out_file(out)
    from tqdm import tqdm  # (after the arguments: --help and --list need no progress bar)

    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    probe_memory = CpuPeakMemory() if device.type == "cpu" else CudaPeakMemory(device)
    ctx = Context(op, device, DTYPES[args.dtype], run_id, name, git_commit(),
                  probe_memory.method if not probe_memory.why_unavailable else "unavailable")  # fmt: skip
    runnable = [p for p in chosen if not providers[p].unavailable(device, DTYPES[args.dtype])]
    log = Path(tempfile.gettempdir()) / f"bmt_fast_bench_{op.name}_{run_id}.log"
    spec = dict(module=f"benchmarks.{op.name}", device=str(device), dtype=args.dtype, run_id=run_id,
                device_name=name, commit=ctx.commit, settings=vars(settings_for(args)), options=options)  # fmt: skip
    print(f"{op.name} on {name}, {args.dtype}, {len(cases)} sizes x {len(chosen)} providers -> {out}", file=sys.stderr)
    print(f"worker log: {log}", file=sys.stderr)
    with tqdm(total=len(cases) * len(chosen), desc=op.name, unit="run", file=sys.stderr) as progress:
        sup = Supervisor(ctx, spec, out, log, progress)
        for provider in chosen:
            reason = providers[provider].unavailable(device, DTYPES[args.dtype])
            if reason:
                for case in cases:
                    sup.write(ctx.row(provider, case, "unavailable", reason))
        sup.run([] if args.no_check else runnable, [(c, runnable) for c in cases])
    print_summary(sup.rows)
    return sup.rows


def print_summary(rows: list[dict], file=sys.stdout) -> None:
    for row in rows:
        if row["status"] == "ok" or row["provider"] in LIMITS:
            limit = f"  x{row['time_vs_limit'] or '?':>6} of limit" if row["limit_kind"] else ""  # none end to end
            detail = (f"{float(row['time_median_s']) * 1e3:10.3f} ms{limit}"
                      f"  {row['peak_extra_mb'] or '?':>8} MB") if row["time_median_s"] else ""  # fmt: skip
        else:
            detail = f"{row['status']}: {row['note']}"
        print(f"{row['op']:20s} n={row['n']:>6} d={row['d']:>7} {row['provider']:18s} {detail}", file=file)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        raise SystemExit("run a benchmark instead: python -m benchmarks.svgd_step --quick")
