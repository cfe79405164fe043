"""The target stage: one prompt adapted to the target task from an aggregated initialisation.

    plain   theta = P, an (L, hidden) prompt.
    mpt     theta = P * (u v^T) (MPT-style, Wang et al. 2023): P is the full-rank part (the initial
            prompt), u (L x r) and v (hidden x r) a low-rank multiplicative update, each part with its
            own learning rate. u v^T starts as all ones: u[:, 0] = v[:, 0] = 1; the other columns of u are
            random and those of v zero (the LoRA trick: the product starts exact, and the columns do not
            stay copies of each other as they would from a symmetric start).

Optional posterior-as-prior term (kde_weight = lambda > 0): loss += -lambda * log mean_m k(theta, theta_m),
a kernel density estimate over the source particles with the SVGD kernel (bandwidth: the median rule
over the particles, or a number), which keeps the target near the source posterior.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .. import median_bandwidth, rbf_kernel
from .._validation import check_bandwidth, check_finite
from .data import TaskData, TaskSampler, make_batches
from .loop import ensure_finite
from .prompts import PromptedModel
from .source import OPTIMIZER_CLASSES


class TargetPrompt(nn.Module):
    def __init__(
        self, init: torch.Tensor, prompt_type: str = "plain", rank: int = 1, generator: torch.Generator | None = None
    ):
        super().__init__()
        if init.dim() != 2:
            raise ValueError(f"the initial target prompt must have shape (L, hidden), got {tuple(init.shape)}")
        if prompt_type not in ("plain", "mpt"):
            raise ValueError(f"prompt_type must be plain or mpt, got {prompt_type!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.prompt_type = prompt_type
        self.full = nn.Parameter(init.detach().float().clone())
        if prompt_type == "mpt":
            length, hidden = init.shape
            u = torch.randn(length, rank, generator=generator) / rank**0.5
            v = torch.zeros(hidden, rank)
            u[:, 0], v[:, 0] = 1.0, 1.0
            self.u, self.v = nn.Parameter(u.to(init.device)), nn.Parameter(v.to(init.device))

    def forward(self) -> torch.Tensor:
        if self.prompt_type == "plain":
            return self.full
        return self.full * (self.u @ self.v.T)

    def param_groups(self, lr: float, lowrank_lr: float) -> list[dict[str, Any]]:
        groups = [{"params": [self.full], "lr": lr}]
        if self.prompt_type == "mpt":
            groups.append({"params": [self.u, self.v], "lr": lowrank_lr})
        return groups


# Below this largest kernel value the KDE prior takes its log-sum-exp form (k's underflow begins at 2.2e-308;
# from here on the particles that underflowed change the mean by less than 1e-27 of it).
_KDE_FAR = 1e-280


class KDEPrior:
    """-log mean_m k(theta, theta_m) over fixed source particles, differentiable in theta.

    Computed in float64 through bmt_fast.rbf_kernel while some k is well above float64's underflow (1e-280);
    where theta is farther from every particle (|theta - theta_m|^2 / H > ~645 for all m: a small bandwidth,
    or a prompt that drifted), as -(logsumexp_m(-|theta - theta_m|^2 / H) - log M) from the distances
    themselves, so the term and its pull back towards the particles stay exact (a clamp of the mean had made
    the term a constant 708.4 without gradient there, and the prior silently stopped acting).
    The particles and the bandwidth are checked once, here; each call then skips rbf_kernel's NaN/Inf scan
    of the particles (a pass over M x d doubles every target step), and a non-finite theta makes the term
    NaN, which the target stage's gradient check stops at (loop.Diverged, with its step and checkpoint).
    """

    def __init__(self, particles: torch.Tensor, bandwidth: str | float = "median", backend: str = "auto"):
        self.particles = particles.detach().double()
        check_finite("the KDE prior's particle tensor", self.particles)
        if bandwidth == "median":
            if particles.shape[0] < 2:
                raise ValueError("a median-rule KDE needs at least 2 particles; give a numeric bandwidth")
            bandwidth = float(median_bandwidth(self.particles, check_inputs=False))
        self.bandwidth = float(check_bandwidth(float(bandwidth), self.particles))  # the op's rule, once
        self.backend = backend

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        k = rbf_kernel(
            theta[None].double(), self.particles, self.bandwidth, backend=self.backend, check_inputs=False
        )
        if bool(k.max() >= _KDE_FAR):
            return -torch.log(k.mean())
        d2 = (theta.double().reshape(1, -1) - self.particles.reshape(self.particles.shape[0], -1)).square().sum(1)
        return math.log(d2.numel()) - torch.logsumexp(-d2 / self.bandwidth, 0)


class TargetTrainer:
    """A `loop.Trainable` for the target stage."""

    def __init__(
        self,
        pm: PromptedModel,
        prompt: TargetPrompt,
        data: TaskData,
        sampler: TaskSampler,
        optimizer: str,
        lr: float,
        lowrank_lr: float,
        kde: KDEPrior | None = None,
        kde_weight: float = 0.0,
        evaluate: Callable[[torch.Tensor], dict[str, float]] | None = None,
        eval_every: int = 0,
    ):
        self.pm = pm
        self.prompt = prompt
        self.data = data
        self.sampler = sampler
        self.optimizer = OPTIMIZER_CLASSES[optimizer](prompt.param_groups(lr, lowrank_lr))
        self.kde = kde if kde_weight > 0 else None
        self.kde_weight = kde_weight
        self.evaluate = evaluate
        self.eval_every = eval_every
        self._last_evaluation: tuple[torch.Tensor, dict[str, Any]] | None = None  # (prompt, its metrics)

    def train_step(self) -> dict[str, Any]:
        (indices,) = self.sampler.sample()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.backward(indices)
        self.check_gradients()
        self.optimizer.step()
        return metrics

    def check_gradients(self) -> None:
        """Diverged before a step from NaN/Inf gradients, which Adam would carry into the prompt and its state."""
        ensure_finite("the target prompt's gradients", [p.grad for p in self.prompt.parameters()])

    def backward(self, indices: list[int], weight: float = 1.0, prior_share: float = 1.0) -> dict[str, float]:
        """Backpropagate weight * (mean NLL of the examples `indices`) + prior_share * kde_weight * KDE term.

        weight = (examples here) / (whole batch) and prior_share = 1 / (processes) let processes that each
        hold part of a batch sum their gradients into those of the whole batch. Returns the unweighted
        mean NLL and KDE term.
        """
        (batch,) = make_batches(self.pm, [self.data], [indices])
        theta = self.prompt()
        nll = self.pm.sequence_nll(theta, batch).mean()
        loss = weight * nll
        metrics = {"loss": nll.item()}
        if self.kde is not None:
            kde = self.kde(theta)
            loss = loss + prior_share * self.kde_weight * kde.to(loss.dtype)
            metrics["kde"] = kde.item()
        loss.backward()
        return metrics

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def after_step(self, step: int) -> dict[str, Any] | None:
        if self.evaluate is None or not self.eval_every or step % self.eval_every:
            return None
        prompt = self.current_prompt()
        metrics = self.evaluate(prompt)
        self._last_evaluation = (prompt, metrics)
        return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}

    def final_evaluation(self, prompt: torch.Tensor) -> dict[str, Any]:
        """evaluate(prompt), reusing the last periodic evaluation where it was of this very prompt (eval_every
        dividing the steps: the final prompt had been evaluated twice, a second full pass over the split)."""
        if self._last_evaluation is not None and torch.equal(self._last_evaluation[0], prompt):
            return self._last_evaluation[1]
        return self.evaluate(prompt)

    def current_prompt(self) -> torch.Tensor:
        with torch.no_grad():
            return self.prompt().detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompt": dict(self.prompt.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompt.load_state_dict(state["prompt"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
