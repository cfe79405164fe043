"""From source particles to one initial target prompt."""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "medoid", "particle", "best")


def aggregate(
    particles: torch.Tensor, how: str, *, index: int = 0, target_loss: torch.Tensor | None = None
) -> torch.Tensor:
    """One (L, hidden) prompt from (M, L, hidden) particles.

    mean      the average particle (the paper's target initialisation)
    medoid    the particle with the smallest summed distance to the others
    particle  particles[index]
    best      the particle with the lowest finite `target_loss` (SPoT's choice of source prompt)
    """
    if particles.dim() != 3:
        raise ValueError(f"particles must have shape (M, L, hidden), got {tuple(particles.shape)}")
    if how == "mean":
        return particles.mean(dim=0)
    if how == "medoid":
        return particles[medoid_index(particles)]
    if how == "particle":
        if not 0 <= index < particles.shape[0]:
            raise ValueError(f"particle index {index} out of range for {particles.shape[0]} particles")
        return particles[index]
    if how == "best":
        if target_loss is None or target_loss.shape != (particles.shape[0],):
            raise ValueError("aggregation 'best' needs target_loss, one value per particle")
        finite = torch.isfinite(target_loss)
        if not bool(finite.any()):
            raise ValueError(
                f"aggregation 'best': no particle has a finite target loss ({target_loss.tolist()}); the backbone "
                "overflows with every source prompt (a 16-bit dtype? try float32)"
            )
        # argmin takes a NaN for the smallest: a particle whose loss overflowed had been chosen as the best
        return particles[int(torch.where(finite, target_loss, torch.inf).argmin())]
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


def medoid_index(particles: torch.Tensor) -> int:
    flat = particles.reshape(particles.shape[0], -1).double()
    return int(torch.cdist(flat, flat).sum(dim=1).argmin())
