"""Worker of tests/test_svgd_step_distributed.py, run by torchrun (gloo, CPU): every rank calls
`svgd_step(..., group=)` on its slice of each case and saves what it got; the test compares the
concatenation with the single-process op. Usage: torchrun --nproc_per_node 2 svgd_distributed_worker.py OUT
"""

from __future__ import annotations

import copy
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import bmt_fast
from bmt_fast import distributed as bd


@dataclass(frozen=True)
class Case:
    sizes: tuple[int, ...]  # rows on each rank
    event: tuple[int, ...]
    dtype: torch.dtype
    bandwidth: str | float
    offset: float = 0.0  # far from the origin: the centring must be shared by the ranks
    backend: str = "auto"
    blocks: tuple[int, int] | None = None  # (ROW_BLOCK, COLUMN_BLOCK): several blocks per rank
    exact_limit: int | None = None  # EXACT_MEDIAN_MAX_PARTICLES: the sampled median

    def inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All particles and scores (every rank draws the same ones and keeps its slice)."""
        g = torch.Generator().manual_seed(seed)
        n = sum(self.sizes)
        x = torch.randn(n, *self.event, generator=g, dtype=torch.float64) * 1.5 + self.offset
        score = torch.randn(n, *self.event, generator=g, dtype=torch.float64)
        return x.to(self.dtype), score.to(self.dtype)

    def local(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        start = sum(self.sizes[:rank])
        return t[start : start + self.sizes[rank]]


CASES = {
    "uneven_fp64_median": Case((5, 8), (7,), torch.float64, "median"),
    "uneven_fp64_fixed": Case((5, 8), (7,), torch.float64, 2.5),
    "uneven_fp32_median_far": Case((9, 4), (3, 4), torch.float32, "median", offset=1e3),
    "uneven_fp32_fixed": Case((9, 4), (3, 4), torch.float32, 4.0),
    "torch_backend": Case((6, 3), (5,), torch.float64, "median", backend="torch"),
    "first_rank_empty": Case((0, 6), (5,), torch.float64, "median"),
    "second_rank_empty": Case((6, 0), (5,), torch.float32, 3.0),
    "bfloat16": Case((6, 6), (16,), torch.bfloat16, "median"),
    "few_particles_huge_d": Case((2, 3), (20_000,), torch.float32, "median"),
    "blocked": Case((300, 213), (5,), torch.float64, "median", blocks=(64, 96)),
    # n^2 > 64 x 65,536 pairs: fewer particles get the exact median from method="sampled" on the CPU
    "sampled_median": Case((1100, 1000), (4,), torch.float64, "median", exact_limit=64),
    # a small given H: (2/H) xc is large, so each particle's own term must stay out of the folded sums
    "tiny_bandwidth_fp32": Case((3, 2), (8,), torch.float32, 1e-6),
    "tiny_bandwidth_fp64": Case((3, 2), (8,), torch.float64, 1e-9),
    # past fp32's range: fp32's largest value where fp32 arithmetic reads it (a cast's +inf had raised)
    "huge_bandwidth_fp32": Case((3, 2), (8,), torch.float32, 1e39),
    "huge_bandwidth_bf16": Case((3, 2), (8,), torch.bfloat16, 1e39),
}
SVGD_STEPS = 3
SVGD_CASE = Case((4, 3), (2, 5), torch.float64, "median")


def run_case(name: str, case: Case, rank: int) -> torch.Tensor:
    x, score = case.inputs(seed=len(name))
    saved = bd.ROW_BLOCK, bd.COLUMN_BLOCK, bd.EXACT_MEDIAN_MAX_PARTICLES
    if case.blocks:
        bd.ROW_BLOCK, bd.COLUMN_BLOCK = case.blocks
    if case.exact_limit:
        bd.EXACT_MEDIAN_MAX_PARTICLES = case.exact_limit
    try:
        return bmt_fast.svgd_step(
            case.local(x, rank),
            case.local(score, rank),
            case.bandwidth,
            backend=case.backend,
            group=torch.distributed.group.WORLD,
        )
    finally:
        bd.ROW_BLOCK, bd.COLUMN_BLOCK, bd.EXACT_MEDIAN_MAX_PARTICLES = saved


def run_svgd_optimizer(rank: int) -> torch.Tensor:
    """A few bmt_fast.SVGD steps on a Gaussian target, each rank moving its slice."""
    x, _ = SVGD_CASE.inputs(seed=1)
    particles = SVGD_CASE.local(x, rank).clone()
    optimizer = bmt_fast.SVGD(particles, torch.optim.Adam, lr=0.1, group=torch.distributed.group.WORLD)
    for _ in range(SVGD_STEPS):
        optimizer.step(lambda p: -p.detach())
    return particles.detach()


def unchecked(rank: int) -> dict[str, torch.Tensor]:
    """check_inputs=False with a NaN on rank 1 (rank 0 with rows, and with none): NaN phi on every rank, as the
    single-process op gives, where the ranks with rows had raised (and an empty rank 0 had not)."""
    world = torch.distributed.group.WORLD
    x = torch.ones(3, 2, dtype=torch.float64) * torch.arange(3.0, dtype=torch.float64)[:, None] + rank
    if rank == 1:
        x[1, 1] = float("nan")
    empty_first = x[:0] if rank == 0 else x
    # a subnormal fp32 H on the rank with rows and on the one without: NaN on both (the CPU's rbf_kernel had
    # refused it on rank 0 alone, whose error left rank 1 to hang in its next collective)
    few = torch.randn(4, 3) if rank == 0 else torch.randn(0, 3)
    return {
        "subnormal_bandwidth_unchecked": bmt_fast.svgd_step(
            few, few, torch.tensor(1e-40), group=world, check_inputs=False
        ),
        "nan_unchecked": bmt_fast.svgd_step(x, x, "median", group=world, check_inputs=False),
        "nan_unchecked_empty_rank": bmt_fast.svgd_step(empty_first, empty_first, "median", group=world,
                                                       check_inputs=False),  # fmt: skip
    }


def error_of(call) -> tuple[str, str]:
    try:
        call()
    except Exception as error:  # noqa: BLE001  the test checks type and message
        return type(error).__name__, str(error)
    return "", ""


def bad_inputs(rank: int) -> dict[str, tuple[str, str]]:
    """Inputs that do not fit together across ranks: every rank must raise (and none hang)."""
    world = torch.distributed.group.WORLD

    def step(x, score=None, bandwidth="median", **kwargs):
        return lambda: bmt_fast.svgd_step(x, x if score is None else score, bandwidth, group=world, **kwargs)

    nan = torch.ones(3, 2, dtype=torch.float64)
    if rank == 1:
        nan[1, 1] = float("nan")

    def median_failing_on_rank_0():
        import bmt_fast.distributed

        original = bmt_fast.distributed.median_of_all

        def failing(*args):
            raise torch.OutOfMemoryError("out of memory on purpose")

        if rank == 0:
            bmt_fast.distributed.median_of_all = failing
        try:
            return step(torch.randn(3, 4))()
        finally:
            bmt_fast.distributed.median_of_all = original

    return {
        "event_shape": error_of(step(torch.randn(3, 4, 5) if rank == 0 else torch.randn(3, 5, 4))),
        "dtype": error_of(step(torch.randn(3, 4, dtype=torch.float32 if rank == 0 else torch.float64))),
        "nan": error_of(step(nan)),
        "no_particles": error_of(step(torch.randn(0, 4))),
        "bandwidth_differs": error_of(step(torch.randn(3, 4), bandwidth=1.0 + rank)),
        "median_on_one_rank": error_of(step(torch.randn(3, 4), bandwidth="median" if rank == 0 else 1.0)),
        "group_type": error_of(lambda: bmt_fast.svgd_step(torch.randn(3, 4), torch.randn(3, 4), group="world")),
        "shape_of_score": error_of(step(torch.randn(3, 4), torch.randn(2, 4))),
        # seen by one rank's own checks only: that rank tells the others, and every rank raises its error
        "score_shape_on_rank_0": error_of(step(torch.randn(3, 2), torch.randn(3, 3 if rank == 0 else 2))),
        "bandwidth_value_on_rank_1": error_of(step(torch.randn(3, 2), bandwidth=-1.0 if rank == 1 else 1.0)),
        "backend_on_rank_0": error_of(step(torch.randn(3, 2), backend="nope" if rank == 0 else "auto")),
        "int_x_on_rank_1": error_of(step(torch.ones(3, 2, dtype=torch.int32 if rank == 1 else torch.float32))),
        "out_on_rank_0": error_of(step(torch.randn(3, 2), out=torch.empty(2 if rank == 0 else 3, 2))),
        "two_ranks_differ": error_of(step(torch.randn(3, 2), torch.randn(3, 3), bandwidth=-1.0 if rank else 1.0)),
        # compared whatever check_inputs says (it had been compared only with check_inputs=True)
        "bandwidth_differs_unchecked": error_of(step(torch.randn(3, 4), bandwidth=1.0 + rank, check_inputs=False)),
        # a given H so small that (2/H) * (x - centre) overflows fp32 in the folded sums (phi had been NaN)
        "fold_overflow": error_of(step(torch.arange(6.0).reshape(3, 2) * 10 + 100 * rank, bandwidth=1.2e-38)),
        # a score near fp32's largest value overflows the folded weights, not H's fault: phi as it comes, as the
        # single-process op returns it (it had been named a bandwidth too small)
        "score_overflow": error_of(step(torch.randn(3, 2), torch.full((3, 2), torch.finfo(torch.float32).max), 1.0)),
        # check_inputs on one rank only: no error (rank 0 had raised alone, rank 1 hung in the all-gather)
        "check_inputs_on_one_rank": error_of(step(torch.randn(3, 4), bandwidth=1.0, check_inputs=rank == 0)),
        # a NaN score on the rank that does not check, where the other checks: raised on every rank (the checking
        # rank had got a phi all NaN without an error)
        "nan_on_the_unchecked_rank": error_of(
            step(nan.new_ones(3, 4), nan[:, 1:].expand(3, 4) if rank else None, bandwidth=1.0, check_inputs=rank == 0)
        ),
        # ... but the fold's overflow where one rank checks: raised on every rank (rank 1 had returned NaN)
        "fold_overflow_checked_on_one_rank": error_of(
            step(torch.arange(6.0).reshape(3, 2) * 10 + 100 * rank, bandwidth=1.2e-38, check_inputs=rank == 0)
        ),
        # event shapes whose keys collide: told apart by their feature counts (the all-gather had aborted)
        "event_key_collision": error_of(step(torch.randn(2, 1, 1_000_004) if rank == 0 else torch.randn(3, 2, 1))),
        # vmap's sets each run their collectives: a rank with fewer sets had returned while the other hung
        "vmap_batch_differs": error_of(
            lambda: torch.func.vmap(lambda a, b: bmt_fast.svgd_step(a, b, group=world))(*[torch.randn(2 + rank, 3, 4)] * 2)
        ),
        # an SVGD with a group pickled (torch.save): refused with what to do (it had failed on the ProcessGroup)
        "pickle_with_group": error_of(lambda: torch.save(_optimizer_with_group(), io.BytesIO())),
        # SVGD.step's own errors, before svgd_step, on one rank: raised on every rank (the other had waited in
        # the step's all-gather until the group's timeout): no gradient (a rank that skipped its backward), a
        # score that is no tensor, the user's score callable failing
        "svgd_no_grad_on_rank_1": error_of(lambda: _optimizer_with_group().step(None if rank else -torch.ones(3, 2))),
        "svgd_score_type_on_rank_0": error_of(
            lambda: _optimizer_with_group().step((lambda p: [1.0]) if rank == 0 else (lambda p: -p.detach()))
        ),
        "svgd_score_fails_on_rank_1": error_of(
            lambda: _optimizer_with_group().step(lambda p: -p.detach() if rank == 0 else 1 / 0)
        ),
        # the same at lr 0 with no state yet (a warm-up's first step, where the ranks agree whether it is
        # torch.distributed.checkpoint's state initialisation): rank 0 had waited in that agreement, rank 1 in its
        # failure's all-gather, both until the timeout
        "svgd_no_grad_at_lr_0_on_rank_1": error_of(no_gradient_at_lr_0(rank)),
        # at lr 0 with no state, rank 0 stepping from its gradient (the first-step agreement) and rank 1 from a
        # score (the step's input agreement): raised on every rank (the two rows of one shape had been read as
        # each other's: rank 0 went on, rank 1 raised a wrong event-shape error alone)
        "svgd_first_step_forms_differ": error_of(first_step_forms_differ(rank)),
        # vmap over the group's step with a backend that rank 0 cannot run: raised on every rank (the result's
        # memory had been taken from that backend before the sets' steps, failing on rank 0 alone)
        "vmap_backend_on_rank_0": error_of(
            lambda: torch.func.vmap(lambda a, b: bmt_fast.svgd_step(a, b, group=world, backend="nope" if rank == 0 else "auto"))(
                *[torch.randn(2, 3, 4)] * 2
            )
        ),
        # a state dict saved with another slice size loaded on rank 1: raised on every rank before the step (it had
        # failed in rank 1's inner step alone, after the collectives, the other rank going on to the next step)
        "svgd_state_of_another_slice_on_rank_1": error_of(state_of_another_slice(rank)),
        # the median rule failing on the group's first rank (out of memory): raised on every rank (the others
        # had waited in the next collective until the group's timeout)
        "median_fails_on_rank_0": error_of(median_failing_on_rank_0),
    }


def no_gradient_at_lr_0(rank: int):
    particles = torch.randn(3, 2, requires_grad=True)
    optimizer = bmt_fast.SVGD(particles, torch.optim.SGD, lr=0.0, momentum=0.9, group=torch.distributed.group.WORLD)
    if rank == 0:
        (0.5 * particles.square().sum()).backward()
    return optimizer.step


def first_step_forms_differ(rank: int):
    particles = torch.randn(3, 2, requires_grad=True)
    optimizer = bmt_fast.SVGD(particles, torch.optim.SGD, lr=0.0, momentum=0.9, group=torch.distributed.group.WORLD)
    if rank == 0:
        (0 * particles.sum()).backward()
        return optimizer.step
    return lambda: optimizer.step(torch.zeros(3, 2))


def state_of_another_slice(rank: int):
    world = torch.distributed.group.WORLD
    optimizer = bmt_fast.SVGD(torch.randn(3, 2), torch.optim.Adam, lr=0.1, group=world)
    optimizer.step(lambda p: -p.detach())
    if rank == 1:  # the state of a 4-row slice (one process, as a checkpoint of another layout would hold)
        other = bmt_fast.SVGD(torch.randn(4, 2), torch.optim.Adam, lr=0.1)
        other.step(lambda p: -p.detach())
        optimizer.load_state_dict(other.state_dict())
    return lambda: optimizer.step(lambda p: -p.detach())


def _optimizer_with_group() -> bmt_fast.SVGD:
    return bmt_fast.SVGD(torch.randn(3, 2), torch.optim.Adam, lr=0.1, group=torch.distributed.group.WORLD)


def deepcopy_with_group(rank: int) -> torch.Tensor:
    """A deepcopy of an SVGD with a group shares the group and steps as the original: 0 where equal."""
    optimizer = bmt_fast.SVGD(torch.randn(3, 2, generator=torch.Generator().manual_seed(rank)), torch.optim.Adam,
                              lr=0.1, group=torch.distributed.group.WORLD)  # fmt: skip
    optimizer.step(lambda p: -p.detach())
    twin = copy.deepcopy(optimizer)
    assert twin.group is optimizer.group
    for each in (optimizer, twin):
        each.step(lambda p: -p.detach())
    return (optimizer.particles - twin.particles).detach().abs().max()


def main(out: Path) -> None:
    # The first torch.optim step (bmt_fast.SVGD below) imports torch._dynamo, and that import made with a live
    # gloo group kept ten references to it: destroy_process_group then left the group and its worker threads
    # alive until interpreter shutdown, where a thread releasing a finished all_gather took the GIL and the
    # process aborted ("terminate called without an active exception"; 6 of 176 runs on a 2-core VM, after
    # every result was saved; a core dump showed c10d::ProcessGroupGloo::runLoop in the abort). Imported
    # first, it takes no reference, and destroy_process_group frees the group and joins its threads.
    import torch._dynamo  # noqa: F401

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    results = {name: run_case(name, case, rank) for name, case in CASES.items()}
    results["svgd_optimizer"] = run_svgd_optimizer(rank)
    results["deepcopy_with_group"] = deepcopy_with_group(rank)
    results.update(unchecked(rank))
    errors = bad_inputs(rank)
    only_rank_1 = torch.distributed.new_group([1])  # (every rank takes part in new_group)
    errors["non_member"] = error_of(lambda: bmt_fast.svgd_step(torch.randn(3, 2), torch.randn(3, 2), group=only_rank_1))
    torch.distributed.barrier()  # a rank that skipped a collective would hang above instead
    torch.save({"phi": results, "errors": errors}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
