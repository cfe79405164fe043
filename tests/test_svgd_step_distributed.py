"""svgd_step(..., group=) on 2 processes (torchrun, gloo, CPU) against the single-process op on the
concatenated particles; bad inputs raise the same error on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import FP32_FLOOR, relative_error

import bmt_fast
from bmt_fast import reference

HERE = Path(__file__).resolve().parent
WORLD = 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def run_torchrun(script: Path, out: Path, *args: str, nproc: int = WORLD, timeout: int = 300):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*command, str(script), str(out), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank of the worker computed (one torchrun for every case)."""
    out = tmp_path_factory.mktemp("svgd_distributed")
    done = run_torchrun(HERE / "svgd_distributed_worker.py", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def worker():
    import svgd_distributed_worker

    return svgd_distributed_worker


CASE_NAMES = [
    "uneven_fp64_median",
    "uneven_fp64_fixed",
    "uneven_fp32_median_far",
    "uneven_fp32_fixed",
    "torch_backend",
    "first_rank_empty",
    "second_rank_empty",
    "bfloat16",
    "few_particles_huge_d",
    "blocked",
    "sampled_median",
    "tiny_bandwidth_fp32",
    "tiny_bandwidth_fp64",
    "huge_bandwidth_fp32",
    "huge_bandwidth_bf16",
]


def test_every_case_is_checked():
    assert sorted(CASE_NAMES) == sorted(worker().CASES)


def expected_bandwidth(case, x: torch.Tensor):
    if case.exact_limit is None or case.bandwidth != "median":
        return case.bandwidth
    generator = torch.Generator().manual_seed(0)
    sampled = bmt_fast.median_bandwidth(x, method="sampled", generator=generator)
    assert float(sampled) != float(bmt_fast.median_bandwidth(x))  # the case does exercise the sampled rule
    return sampled


@pytest.mark.parametrize("name", CASE_NAMES)
def test_distributed_step_equals_single_process_on_the_concatenation(ranks, name):
    case = worker().CASES[name]
    x, score = case.inputs(seed=len(name))
    pieces = [r["phi"][name] for r in ranks]
    assert [p.shape[0] for p in pieces] == list(case.sizes)
    phi = torch.cat(pieces)
    assert phi.dtype == x.dtype and phi.shape == x.shape

    bandwidth = expected_bandwidth(case, x)
    single = bmt_fast.svgd_step(x, score, bandwidth, backend=case.backend)
    h64 = None if bandwidth == "median" else torch.as_tensor(float(bandwidth), dtype=torch.float64)
    exact = reference.svgd_step(x.double().flatten(1), score.double().flatten(1), h64).reshape(x.shape)
    if x.dtype == torch.float64:
        assert relative_error(phi, single) < 1e-12
    elif x.dtype == torch.float32:  # no worse than twice the single-process op's own fp32 error
        assert relative_error(phi, exact) <= max(2 * relative_error(single, exact), FP32_FLOOR)
    else:  # only the final rounding to bf16 may remain
        assert relative_error(phi, exact) <= 2 * 2.0**-7


def test_svgd_optimizer_over_slices_moves_particles_as_one_process(ranks):
    w = worker()
    x, _ = w.SVGD_CASE.inputs(seed=1)
    particles = x.clone()
    optimizer = bmt_fast.SVGD(particles, torch.optim.Adam, lr=0.1)
    for _ in range(w.SVGD_STEPS):
        optimizer.step(lambda p: -p.detach())
    moved = torch.cat([r["phi"]["svgd_optimizer"] for r in ranks])
    assert not torch.equal(particles.detach(), x)
    assert relative_error(moved, particles.detach()) < 1e-12


BAD_INPUTS = {
    "event_shape": ("ValueError", "same event shape on every rank"),
    "dtype": ("TypeError", "rank 0: torch.float32, rank 1: torch.float64"),
    "nan": ("ValueError", "NaN/Inf values on rank(s) [1]"),
    "no_particles": ("ValueError", "no particles on any rank"),
    "bandwidth_differs": ("ValueError", "rank 0: 1.0, rank 1: 2.0"),
    "median_on_one_rank": ("ValueError", '"median" on every rank or on none'),
    "group_type": ("TypeError", "group must be a torch.distributed.ProcessGroup"),
    "shape_of_score": ("ValueError", "score must have the shape of x"),
    # found by one rank's own checks (before any collective): the others raised nothing and waited in the
    # next collective until its timeout (30 min for gloo) until 2026-12-06
    "score_shape_on_rank_0": ("ValueError", "score must have the shape of x (3, 2), got (3, 3) (svgd_step(group=...): rank 0 of the group)"),
    "bandwidth_value_on_rank_1": ("ValueError", "bandwidth must be positive and finite, got -1.0 (svgd_step(group=...): rank 1"),
    "backend_on_rank_0": ("ValueError", "unknown backend 'nope'"),
    "int_x_on_rank_1": ("TypeError", "x must be float32, float64, bfloat16 or float16, got torch.int32"),
    "out_on_rank_0": ("ValueError", "out must have the shape of x (3, 2), got (2, 2) (svgd_step(group=...): rank 0"),
    "two_ranks_differ": ("ValueError", "score must have the shape of x (3, 2), got (3, 3) (svgd_step(group=...): rank 0"),
    "bandwidth_differs_unchecked": ("ValueError", "rank 0: 1.0, rank 1: 2.0"),
    "check_inputs_on_one_rank": ("", ""),
    "fold_overflow": ("ValueError", "bandwidth 1.2e-38 is too small for these torch.float32 particles"),
    "score_overflow": ("", ""),
    "nan_on_the_unchecked_rank": ("ValueError", "NaN/Inf values on rank(s) [1] of the group"),
    "fold_overflow_checked_on_one_rank": ("ValueError", "bandwidth 1.2e-38 is too small for these torch.float32 particles"),
    "event_key_collision": ("ValueError", "same event shape on every rank"),
    "vmap_batch_differs": ("ValueError", "same batch size on every rank, got rank 0: 2, rank 1: 3"),
    "pickle_with_group": ("TypeError", "an SVGD with group= cannot be pickled (torch.save)"),
    "svgd_no_grad_on_rank_1": ("RuntimeError", "SVGD.step needs a score"),
    "svgd_score_type_on_rank_0": ("TypeError", "score must be a tensor or a callable returning one, got list"),
    "svgd_score_fails_on_rank_1": ("RuntimeError", "division by zero (svgd_step(group=...): rank 1 of the group)"),
    "svgd_no_grad_at_lr_0_on_rank_1": ("RuntimeError", "SVGD.step needs a score"),
    "svgd_first_step_forms_differ": ("RuntimeError", "the ranks of the group called SVGD.step differently: rank(s) [0]"),
    "vmap_backend_on_rank_0": ("ValueError", "unknown backend 'nope'"),
    "svgd_state_of_another_slice_on_rank_1": ("ValueError", "the optimizer's state 'exp_avg' has shape (4, 2)"),
    "median_fails_on_rank_0": ("RuntimeError", "out of memory on purpose (svgd_step(group=...): rank 0 of the group)"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_raise_the_same_error_on_every_rank(ranks, name):
    kind, fragment = BAD_INPUTS[name]
    for rank in ranks:
        raised, message = rank["errors"][name]
        assert raised == kind and fragment in message, (raised, message)
    assert sorted(set(ranks[0]["errors"]) - {"non_member"}) == sorted(BAD_INPUTS)


def test_a_deepcopy_of_an_svgd_with_a_group_shares_it(ranks):
    """copy.deepcopy of an SVGD(group=...) (it had raised: a ProcessGroup cannot be pickled) shares the group
    and steps as the original."""
    for rank in ranks:
        assert float(rank["phi"]["deepcopy_with_group"]) == 0.0


def test_unchecked_nan_gives_nan_on_every_rank(ranks):
    """check_inputs=False and a NaN particle on rank 1: the median is NaN, so phi is NaN on every rank (the
    single-process op's answer); the ranks with rows had raised in rbf_kernel, an empty rank 0 had not."""
    for name in ("nan_unchecked", "nan_unchecked_empty_rank", "subnormal_bandwidth_unchecked"):
        pieces = [r["phi"][name] for r in ranks]
        assert [p.shape[0] for p in pieces] == {"nan_unchecked": [3, 3], "nan_unchecked_empty_rank": [0, 3]}.get(name, [4, 0])
        assert all(bool(torch.isnan(p).all()) for p in pieces), name


def test_a_process_outside_the_group_is_told_so(ranks):
    """new_group([1]) gives rank 0 a non-member marker (an int in torch 2.13): a ValueError saying so, not a
    TypeError about the group's type; rank 1, the group's one member, steps alone."""
    assert ranks[0]["errors"]["non_member"][0] == "ValueError"
    assert "not a member of `group`" in ranks[0]["errors"]["non_member"][1]
    assert ranks[1]["errors"]["non_member"] == ("", "")


def test_group_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("this pytest process has a process group")
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        bmt_fast.svgd_step(x, x, group=object())


def test_without_a_group_zero_particles_stay_an_error():
    with pytest.raises(ValueError, match="at least 1 particle"):
        bmt_fast.svgd_step(torch.randn(0, 3), torch.randn(0, 3))
