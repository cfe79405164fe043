"""SVGD over particles split across the ranks of a process group: `svgd_step(..., group=)`.

Each rank holds a slice of the particles (any number of rows, zero included). The step

1. checks that the ranks' inputs fit together (one small all-gather of a row of metadata per rank), so
   that a bad input raises the same error on every rank instead of leaving the others waiting: also one
   that only its own rank can see (a score of another shape, a bad bandwidth value or backend name, a
   bad `out`): that rank sends a row that says so and its error, which every rank then raises;
2. all-gathers particles and scores (sizes may differ between ranks; one collective for both);
3. agrees on one bandwidth: the given one or the median rule over all N particles, computed on the
   group's first rank (exact up to EXACT_MEDIAN_MAX_PARTICLES particles, sampled beyond) and broadcast;
4. computes phi for its own rows only,

       phi_r = (1/N) [ score_r + K'_rA (score_A - (2/H) xc_A) + (2/H) rowsum(K'_rA) xc_r ]

   (K' is K without each particle's own term k_rr = 1, which the single-process op also keeps out of
   the folded sums: with a small given H, (2/H) xc_r is large and its two copies cancel there) with K_rA
   streamed in (row block x column block) pieces through the backend's `rbf_kernel`, so no rank holds
   more than one block of the kernel matrix.

The result equals `svgd_step` on the concatenated particles (rank order) up to summation order; every rank
uses the same centring shift and bandwidth because every rank holds the same gathered particles.
"""

from __future__ import annotations

import builtins
import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist

from . import backends
from ._validation import FLOATING_DTYPES, all_finite, as_rows, bandwidth_in, fold_overflow_error, fold_overflows
from .ops import DEFAULT_NUM_PAIRS, median_bandwidth
from .reference import accumulation_dtype, centre

# Rows x columns of one kernel block: 4096 x 8192 fp32 = 128 MiB.
ROW_BLOCK = 4096
COLUMN_BLOCK = 8192
# Up to this many particles the median bandwidth is exact (numpy convention, as the single-process op);
# beyond it, the median of DEFAULT_NUM_PAIRS sampled pairs (fixed seed, so every run agrees).
EXACT_MEDIAN_MAX_PARTICLES = 65536
SAMPLED_MEDIAN_SEED = 0

# Columns of the metadata row each rank contributes (int64); _KIND: which agreement the row is for (a step's
# inputs, or SVGD.step's first-step flag: rows of one shape, so that a failed rank's row meets either);
# _FAILED: the rank's own checks raised.
_ROWS, _EVENT, _FEATURES, _DTYPE, _MEDIAN, _FINITE, _BANDWIDTH, _CHECKS, _KIND, _FAILED = range(10)
_STEP_ROW, _FLAG_ROW = 1, 2
# The error types a failed rank's error is raised as on every rank (others: RuntimeError).
_SHARED_ERRORS = ("TypeError", "ValueError", "RuntimeError", "NotImplementedError")


def svgd_step(
    x: torch.Tensor,
    score: torch.Tensor,
    h: torch.Tensor | None,
    *,
    group: dist.ProcessGroup,
    backend: str,
    check_inputs: bool,
) -> torch.Tensor:
    """phi for this rank's rows, shape (n_local, *event): x and score validated locally (n_local may be 0);
    h None = median rule. (The caller, ops.svgd_step, has checked the group and this rank's inputs.)"""
    x2, s2 = as_rows(x), as_rows(score)
    sizes, unchecked = agree_on_inputs(x, score, h, group, check_inputs)
    any_checks = len(unchecked) < len(sizes)
    x_all, score_all = all_gather_rows(torch.cat([x2, s2], dim=1), sizes, group).split(x2.shape[1], dim=1)
    if any_checks and unchecked:
        # Where some ranks check and others do not, every rank scans the rows of those that did not (the same
        # gathered rows everywhere: every rank raises together). A NaN score on a rank with check_inputs=False
        # had made the checking ranks' phi all NaN without an error.
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        bad = [r for r in unchecked if not (all_finite(x_all[starts[r] : starts[r] + sizes[r]])
                                            and all_finite(score_all[starts[r] : starts[r] + sizes[r]]))]  # fmt: skip
        if bad:
            raise ValueError(f"x or score contains NaN/Inf values on rank(s) {bad} of the group")
    h_shared = shared_bandwidth(x_all, h, group, backend)
    start = sum(sizes[: dist.get_rank(group)])
    rows = slice(start, start + x.shape[0])
    # (the fold's overflow is checked on every rank where any rank checks: the ranks whose check_inputs
    # differed had ended apart, one raising, another returning NaN into its next collective)
    phi = svgd_step_local_rows(x_all, score_all, rows, h_shared, backend, check_inputs=any_checks)
    return phi.reshape(x.shape)


def check_group(group: object) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("svgd_step(group=...) needs an initialised torch.distributed process group")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a process outside it
        raise ValueError("this process is not a member of `group`")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD), "
            f"got {type(group).__name__}"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of `group`")


def check_backend(backend: str, x: torch.Tensor) -> None:
    """An unknown or unavailable backend, found before any collective (a one-row probe: x may have no rows)."""
    x2 = as_rows(x)
    backends.select(backend, "rbf_kernel", x2.new_empty((1, x2.shape[1])))


@contextlib.contextmanager
def failing_together(group) -> Iterator[None]:
    """Runs this rank's own checks (the body). Where they raise, this rank takes part in the metadata
    all-gather of agree_on_inputs with a row that says so, and every rank raises that error (see
    _raise_failure); otherwise the step goes on to agree_on_inputs as every other rank does."""
    try:
        yield
    except Exception as error:  # noqa: BLE001  re-raised on every rank, this one included
        failed = torch.zeros(_FAILED + 1, dtype=torch.int64, device=_metadata_device(group))
        failed[_FAILED] = 1
        _raise_failure(_gather_rows(failed, group), group, error)
        raise  # (not reached: _raise_failure raises)


def _metadata_device(group) -> torch.device:
    """Where the metadata rows go: the current GPU for NCCL, the CPU otherwise (every rank the same, also a
    rank whose x is not a tensor at all)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(mine: torch.Tensor, group) -> torch.Tensor:
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return torch.stack(rows).cpu()


def _raise_failure(table: torch.Tensor, group, error: Exception | None) -> None:
    """Where some rank's own checks failed (table's _FAILED column), every rank raises the first such rank's
    error: its type (a builtin one) and message, naming the rank. One more collective (the messages), run
    by every rank only when a failure is known to all."""
    failed = [r for r in range(table.shape[0]) if table[r, _FAILED]]
    if not failed:
        return
    mine = None if error is None else (type(error).__name__, str(error))
    messages: list = [None] * table.shape[0]
    dist.all_gather_object(messages, mine, group=group)
    kind, message = messages[failed[0]]
    raised = getattr(builtins, kind) if kind in _SHARED_ERRORS else RuntimeError
    raise raised(f"{message} (svgd_step(group=...): rank {failed[0]} of the group)") from error


def agree_on_inputs(
    x: torch.Tensor, score: torch.Tensor, h: torch.Tensor | None, group, check_inputs: bool
) -> tuple[list[int], list[int]]:
    """Rows per rank, and the ranks that do not check their inputs, after checking that every rank's inputs fit
    together. Every rank sees every rank's metadata, so every rank raises the same error (a rank that
    raised alone would leave the others waiting in the next collective)."""
    finite = not check_inputs or (all_finite(x) and all_finite(score))
    # H's bits whatever check_inputs (one value: its read costs nothing beside the collectives): a rank that
    # skipped sending them had made the comparison fail on the others alone (they raised, it hung in the next
    # collective), and with check_inputs=False everywhere different values went unchecked (rank 0's was used)
    bits = 0 if h is None else _float_bits(float(h))
    mine = torch.tensor(
        [x.shape[0], _event_key(x.shape[1:]), math.prod(x.shape[1:]), FLOATING_DTYPES.index(x.dtype), h is None, finite, bits,
         check_inputs, _STEP_ROW, 0],
        dtype=torch.int64,
        device=_metadata_device(group),
    )
    table = _gather_rows(mine, group)
    _raise_failure(table, group, None)
    _check_kinds(table, _STEP_ROW)
    # (the features first: shapes whose keys collide, e.g. (1, 1_000_004) and (2, 1), would have sent rows
    # of other sizes into the all-gather, which aborted the process)
    for column in (_FEATURES, _EVENT):
        _check_column(
            table, column, ValueError, f"x must have the same event shape on every rank (this rank: {tuple(x.shape[1:])})"
        )
    dtypes = [FLOATING_DTYPES[int(i)] for i in table[:, _DTYPE]]
    _check_column(table, _DTYPE, TypeError, f"x must have the same dtype on every rank, got {_per_rank(dtypes)}")
    _check_column(table, _MEDIAN, ValueError, 'bandwidth must be "median" on every rank or on none')
    values = [_bits_float(int(b)) for b in table[:, _BANDWIDTH]]
    _check_column(table, _BANDWIDTH, ValueError, f"bandwidth must be the same on every rank, got {_per_rank(values)}")
    bad = [r for r in range(table.shape[0]) if not table[r, _FINITE]]
    if bad:
        raise ValueError(f"x or score contains NaN/Inf values on rank(s) {bad} of the group")
    sizes = table[:, _ROWS].tolist()
    if sum(sizes) == 0:
        raise ValueError("x has no particles on any rank of the group")
    return sizes, [r for r in range(table.shape[0]) if not table[r, _CHECKS]]


def all_gather_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's rows of t concatenated in rank order; sizes[r] = rows on rank r (padded to the largest)."""
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


def shared_bandwidth(x_all: torch.Tensor, h: torch.Tensor | None, group, backend: str) -> torch.Tensor:
    """The bandwidth every rank uses (float64, 0-dim): the given one or the median rule over all particles,
    both taken from the group's first rank and broadcast, so that every rank uses the same bits."""
    shared = torch.zeros(2, dtype=torch.float64, device=x_all.device)  # H, and whether computing it failed
    failure = None
    if dist.get_rank(group) == 0:
        try:
            shared[0] = h.detach() if h is not None else median_of_all(x_all, backend)
        except Exception as error:  # noqa: BLE001  (e.g. out of memory) raised on every rank below
            failure, shared[1] = error, 1.0
    dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
    if h is None and bool(shared[1]):  # (the other ranks had waited in the next collective until the timeout)
        table = torch.zeros(dist.get_world_size(group), _FAILED + 1, dtype=torch.int64)
        table[0, _FAILED] = 1
        _raise_failure(table, group, failure)
    return shared[0]


def median_of_all(x_all: torch.Tensor, backend: str) -> torch.Tensor:
    """Median-rule bandwidth over all particles: exact for moderate n, sampled pairs beyond."""
    if x_all.shape[0] <= EXACT_MEDIAN_MAX_PARTICLES:
        return median_bandwidth(x_all, backend=backend, check_inputs=False)
    generator = torch.Generator(device="cpu").manual_seed(SAMPLED_MEDIAN_SEED)
    return median_bandwidth(x_all, method="sampled", num_pairs=DEFAULT_NUM_PAIRS, generator=generator, check_inputs=False)


def svgd_step_local_rows(
    x_all: torch.Tensor,
    score_all: torch.Tensor,
    rows: slice,
    h: torch.Tensor,
    backend: str,
    *,
    check_inputs: bool = False,
) -> torch.Tensor:
    """phi for x_all[rows] against every particle, block by block (fp32 accumulation; fp64 for fp64), each
    particle's own term (k_rr = 1: score_r alone) kept out of the folded sums, as in the single-process op.
    check_inputs: a (given) H so small that the folded weights overflow is an error, as in the single-process
    op (the weights come from the gathered particles: the same on each rank; svgd_step checks where any
    rank checks); not checked, phi is NaN there."""
    dtype = accumulation_dtype(x_all.dtype)
    # H in the accumulation dtype (bandwidth_in: a valid 1e39 had raised on every rank as fp32's +inf); one
    # that is not valid there (a NaN median from unchecked NaN particles, a given 1e-60 that is 0 in fp32)
    # gives NaN, as the single-process op does, on every rank alike (rbf_kernel had raised on ranks with rows)
    # A subnormal H (valid for bandwidth_in, whose rule the Triton kernels share) is NaN here too: the CPU's
    # rbf_kernel refuses it, which had raised on the ranks with rows while those without went on.
    h = bandwidth_in(h, dtype)
    if not float(h) >= torch.finfo(dtype).smallest_normal:  # (NaN fails it too)
        return torch.full_like(x_all[rows], float("nan"))
    (xc,) = centre(x_all.to(dtype))
    a = 2.0 / h
    scores = score_all.to(dtype)
    # One GEMM per block gives both sums: K' @ [score - a*xc | 1] = [K'@score - a K'@xc | rowsum(K')].
    weights = torch.cat([scores - a * xc, torch.ones_like(xc[:, :1])], dim=1)
    # (finite inputs, agreed on: the fold's (2/H) * xc overflowed, as the single-process op tells it; a score
    # near the largest value that overflows here is phi's own overflow there, returned as it comes)
    if check_inputs and not all_finite(weights) and fold_overflows(x_all, float(h)):
        raise fold_overflow_error(float(h), x_all.dtype)
    chosen = backends.select(backend, "rbf_kernel", x_all)
    local = xc[rows]
    phi = torch.empty_like(local)
    for r0 in range(0, local.shape[0], ROW_BLOCK):
        block = local[r0 : r0 + ROW_BLOCK]
        first = rows.start + r0  # the block's first row among all particles
        acc = torch.zeros((block.shape[0], weights.shape[1]), dtype=dtype, device=x_all.device)
        for c0 in range(0, xc.shape[0], COLUMN_BLOCK):
            k = chosen.rbf_kernel(block, xc[c0 : c0 + COLUMN_BLOCK], h).to(dtype)
            # the own terms in this column block: rows i with first + i in [c0, c0 + columns)
            lo, hi = max(first, c0), min(first + block.shape[0], c0 + k.shape[1])
            if lo < hi:
                own = torch.arange(lo, hi, device=k.device)
                k[own - first, own - c0] = 0
            acc.addmm_(k, weights[c0 : c0 + COLUMN_BLOCK])
        own_scores = scores[first : first + block.shape[0]]
        phi[r0 : r0 + block.shape[0]] = own_scores + acc[:, :-1] + a * acc[:, -1:] * block
    return (phi / x_all.shape[0]).to(x_all.dtype)


def holds_on_every_rank(value: bool, group) -> bool:
    """Whether `value` is true on every rank of the group: one all-gather of metadata rows, the shape of the one
    a rank whose own checks failed sends from failing_together, so that such a rank meets this collective and
    every rank raises its error (an all-reduce here had waited for that rank's all-gather until the timeout)."""
    mine = torch.zeros(_FAILED + 1, dtype=torch.int64, device=_metadata_device(group))
    mine[0], mine[_KIND] = int(value), _FLAG_ROW
    table = _gather_rows(mine, group)
    _raise_failure(table, group, None)
    _check_kinds(table, _FLAG_ROW)
    return bool(table[:, 0].all())


def _check_kinds(table: torch.Tensor, kind: int) -> None:
    """Every rank's row is of this agreement: a rank at SVGD.step's first-step agreement (lr 0, no state yet, the
    score from the gradient) met by one at a step's input agreement (a score given, another lr, a state) had
    read that rank's row as its own, silently (every rank sees the table: every rank raises)."""
    at_flag = [r for r in range(table.shape[0]) if table[r, _KIND] == _FLAG_ROW]
    if int(table[:, _KIND].ne(kind).sum()):
        raise RuntimeError(
            f"the ranks of the group called SVGD.step differently: rank(s) {at_flag} at a first step from the "
            "gradient with lr 0 and no optimizer state (torch.distributed.checkpoint's initialisation), the others "
            "not; every rank must step with the same call form, learning rate and state"
        )


def agree_on_batch(batch_size: int, group) -> None:
    """vmap over svgd_step(group=...) runs one step's collectives per set: a rank with fewer sets had returned
    while the others waited in their next step's collectives. Every rank raises where the sizes differ."""
    table = _gather_rows(torch.tensor([batch_size], dtype=torch.int64, device=_metadata_device(group)), group)
    sizes = table[:, 0].tolist()
    if len(set(sizes)) > 1:
        raise ValueError(f"vmap over svgd_step(group=...) needs the same batch size on every rank, got {_per_rank(sizes)}")


def _check_column(table: torch.Tensor, column: int, error: type[Exception], message: str) -> None:
    if not bool((table[:, column] == table[0, column]).all()):
        raise error(message)


def _per_rank(values: list) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def _event_key(event: torch.Size) -> int:
    """A deterministic 61-bit key of the event shape (equal shapes give equal keys on every process)."""
    key = len(event)
    for size in event:
        key = (key * 1_000_003 + size) % (2**61 - 1)
    return key


def _float_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float64).view(torch.int64))


def _bits_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))


