"""The source stage: prompt particles trained on K source tasks.

One trainer covers the paper's method and the two source-side baselines:

    bmtpt      M particles, every particle sees every task, moved by SVGD: samples of the posterior
               p(theta | D_1..D_K) over prompts.
    multitask  one prompt, every task, plain gradient steps (prompt tuning on the task mixture).
    spot       one prompt per task (particle k sees task k only), plain gradient steps (SPoT).

Score of particle m (what SVGD or the gradient rule ascends):
    s_m = grad[ log N(theta_m; 0, prior_std^2 I) - sum_k c_k * mean_{i in batch_k} nll_i(theta_m) ]
where nll_i is the summed token NLL of example i and c_k (the likelihood scale) is
    "dataset"  N_k: the batch estimate of the full-data log-likelihood, i.e. the exact posterior;
    "mean"     N_k / sum_j N_j (the default): the full-data log-likelihood divided by the number of
               examples, i.e. the exact posterior tempered by the data size, whatever the sampling
               (which sets only how many examples of each task a step reads);
    "batch"    B_k / sum_j B_j: the mean NLL over the mixed batch as drawn (with uniform sampling every
               task weighs the same; with proportional sampling "mean" up to the batch sizes' rounding,
               at least one example per task: until 2026-12-06 what "mean" was);
    s (float)  s * N_k / sum_j N_j.
(Sums over the tasks the particle trains on: all of them, or its own for spot.)
With "dataset" the likelihood gradient grows with N (10^4-10^5 examples per GLUE task) while SVGD's
repulsive term (2/H) sum_j k_ij (x_i - x_j) / M does not, so the particles collapse into M independent
MAP estimates; "mean" keeps driving force and repulsion on the same scale, and makes M=1 exactly prompt
tuning on the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import SVGD, median_bandwidth
from .._validation import non_finite_count
from .data import TaskData, TaskSampler, make_batches
from .loop import Diverged, ensure_finite
from .prompts import PromptedModel

OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}


@dataclass(frozen=True)
class SourceLayout:
    """Which particles each task trains, and how particles move (svgd or independent gradient steps)."""

    num_particles: int
    task_particles: tuple[slice, ...]
    rule: str


def source_layout(method: str, num_tasks: int, num_particles: int) -> SourceLayout:
    if method == "bmtpt":
        return SourceLayout(num_particles, (slice(None),) * num_tasks, "svgd")
    if method == "multitask":
        return SourceLayout(1, (slice(None),) * num_tasks, "gradient")
    if method == "spot":
        return SourceLayout(num_tasks, tuple(slice(k, k + 1) for k in range(num_tasks)), "gradient")
    raise ValueError(f"source method must be bmtpt, multitask or spot, got {method!r}")


def likelihood_coefficients(
    batch_sizes: Sequence[int], dataset_sizes: Sequence[int], scale: str | float, layout: SourceLayout
) -> list[float]:
    """c_k of the score (see the module docstring): shares of the data ("mean", a float) or of the mixed
    batch ("batch") among the tasks a particle trains on (all tasks, or its own task for spot)."""
    if scale == "dataset":
        return [float(n) for n in dataset_sizes]
    factor = 1.0 if scale in ("mean", "batch") else float(scale)
    weights = batch_sizes if scale == "batch" else dataset_sizes
    groups = layout.task_particles
    totals = [sum(w for w, g in zip(weights, groups) if g == group) for group in groups]
    return [factor * w / total for w, total in zip(weights, totals)]


class ParticleUpdate:
    """Moves particles along their scores: SVGD (kernelised, interacting) or independent gradient ascent.

    Both use the same inner torch optimizer; with one particle the two are the same update (SVGD's
    kernel is 1 and its repulsion 0).
    """

    def __init__(
        self, particles: torch.Tensor, rule: str, optimizer: str, lr: float, bandwidth: str | float, backend: str
    ):
        cls = OPTIMIZER_CLASSES[optimizer]
        self.rule = rule
        self.particles = particles
        if rule == "svgd":
            # (step checks the particles and scores itself: the op's own scan of both would be a second one)
            self.optimizer = SVGD(particles, cls, lr=lr, bandwidth=bandwidth, backend=backend, check_inputs=False)
        elif rule == "gradient":
            self.optimizer = cls([particles], lr=lr)
        else:
            raise ValueError(f"rule must be svgd or gradient, got {rule!r}")

    @torch.no_grad()
    def step(self, score: torch.Tensor) -> None:
        ensure_finite("the particles' scores", [score])  # (SVGD's input check raised without context)
        if self.rule == "svgd":  # (the particles: finite from their init, and checked after every step below)
            self.optimizer.step(score)
        else:
            self.particles.grad = -score
            self.optimizer.step()
        bad = non_finite_count(self.particles)
        if bad:  # finite scores, but a step so large that the particles overflowed
            raise Diverged(
                f"the particles hold {bad} NaN/Inf value(s) after this step: the learning rate is too high "
                "(the particles were not checkpointed)"
            )

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class ParticleTrainer:
    """A `loop.Trainable` for the source stage."""

    def __init__(
        self,
        pm: PromptedModel,
        particles: torch.Tensor,
        tasks: Sequence[TaskData],
        layout: SourceLayout,
        sampler: TaskSampler,
        update: ParticleUpdate,
        coefficients: Sequence[float],
        prior_std: float | None,
        bandwidth: str | float = "median",
    ):
        if particles.shape[0] != layout.num_particles:
            raise ValueError(f"{layout.num_particles} particles expected, got shape {tuple(particles.shape)}")
        self.pm = pm
        self.particles = particles
        self.tasks = list(tasks)
        self.layout = layout
        self.sampler = sampler
        self.update = update
        self.coefficients = list(coefficients)
        self.prior_std = prior_std
        self.bandwidth = bandwidth

    def score(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (M, L, H) of the particles, and the mean NLL per (task, particle) (NaN where unassigned)."""
        grad, losses = self.likelihood_gradient(batches)
        return self.add_prior(-grad), losses

    def likelihood_gradient(
        self, batches, weights: Sequence[float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient in the particles of sum_k c_k w_k mean_nll_k, and w_k * mean NLL per (task, particle).

        weights (default 1): w_k = (examples of task k here) / (task k's batch), so that processes that each
        hold part of every task's batch sum their results into those of the whole batch.
        """
        weights = [1.0] * len(batches) if weights is None else weights
        particles = self.particles.detach().requires_grad_(True)
        losses = torch.full((len(self.tasks), particles.shape[0]), float("nan"), dtype=torch.float64)
        for k, (batch, rows, w) in enumerate(zip(batches, self.layout.task_particles, weights)):
            # One backward per task: the graph of one task's batch is freed before the next is built.
            mean_nll = self.pm.sequence_nll(particles[rows], batch).mean(dim=1)
            (self.coefficients[k] * w * mean_nll.sum()).backward()
            losses[k, rows] = w * mean_nll.detach().double().cpu()
        return particles.grad, losses

    def add_prior(self, score: torch.Tensor) -> torch.Tensor:
        if self.prior_std is None:
            return score
        return score - self.particles.detach() / self.prior_std**2

    def train_step(self) -> dict[str, Any]:
        batches = make_batches(self.pm, self.tasks, self.sampler.sample())
        score, losses = self.score(batches)
        self.update.step(score)
        return self.metrics(losses)

    def metrics(self, losses: torch.Tensor) -> dict[str, Any]:
        metrics = {f"loss/{t.name}": float(losses[k].nanmean()) for k, t in enumerate(self.tasks)}
        metrics["particle_objective"] = _weighted(losses, self.coefficients).tolist()
        return metrics

    def diagnostics(self) -> dict[str, Any]:
        return particle_spread(self.particles.detach(), self.bandwidth)

    def after_step(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "particles": self.particles.detach(),
            "optimizer": self.update.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.particles.copy_(state["particles"])
        self.update.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])


def _weighted(losses: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """Objective per particle: sum_k c_k * loss_k over the tasks the particle trains on."""
    weights = torch.tensor(coefficients, dtype=torch.float64)[:, None]
    return torch.nansum(weights * losses, dim=0)


def particle_spread(particles: torch.Tensor, bandwidth: str | float = "median") -> dict[str, float]:
    """Mean pairwise Euclidean distance of the particles and the SVGD bandwidth H they get."""
    flat = particles.reshape(particles.shape[0], -1).double()
    spread = float(torch.pdist(flat).mean()) if flat.shape[0] > 1 else 0.0
    h = float(median_bandwidth(flat)) if bandwidth == "median" else float(bandwidth)
    return {"spread": spread, "bandwidth": h}
