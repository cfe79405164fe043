"""bmt_fast.SVGD: a torch optimizer over a particle tensor."""

import pytest
import torch

import bmt_fast


def gaussian_score(mu, sigma):
    return lambda x: -(x.detach() - mu) / sigma**2


@pytest.mark.parametrize(
    "optimizer, kwargs, steps",
    [(torch.optim.Adagrad, {"lr": 0.5}, 600), (torch.optim.Adam, {"lr": 0.05}, 600), (torch.optim.SGD, {"lr": 0.1}, 800)],
)
def test_converges_to_a_gaussian(cpu_backend, optimizer, kwargs, steps):
    mu, sigma = torch.tensor([1.0, -2.0, 0.5]), 0.7
    particles = torch.randn(100, 3) * 0.1 + 4.0
    opt = bmt_fast.SVGD(particles, optimizer, backend=cpu_backend, **kwargs)
    for _ in range(steps):
        opt.step(gaussian_score(mu, sigma))
    assert (particles.detach().mean(0) - mu).abs().max() < 0.15
    assert ((particles.detach().std(0) - sigma).abs() < 0.3 * sigma).all()


def test_step_sets_grad_to_minus_phi_and_returns_phi():
    particles = torch.randn(10, 2)
    start = particles.detach().clone()
    opt = bmt_fast.SVGD(particles, torch.optim.SGD, lr=0.1)
    score = torch.randn(10, 2)
    phi = opt.step(score)
    torch.testing.assert_close(phi, bmt_fast.svgd_step(start, score))
    torch.testing.assert_close(particles.grad, -phi)
    torch.testing.assert_close(particles.detach(), start + 0.1 * phi)


def test_later_steps_write_minus_phi_into_the_existing_gradient():
    """From the second step on, -phi goes into particles.grad in place (no fresh tensor); the returned phi
    is its own tensor; after zero_grad (no gradient) a new one is made."""
    particles = torch.randn(10, 3, dtype=torch.float64)
    opt = bmt_fast.SVGD(particles, torch.optim.SGD, lr=0.05)
    opt.step(torch.randn(10, 3, dtype=torch.float64))
    grad = particles.grad
    for _ in range(3):
        before = particles.detach().clone()
        score = torch.randn(10, 3, dtype=torch.float64)
        phi = opt.step(score)
        assert particles.grad is grad and phi.data_ptr() != grad.data_ptr()
        torch.testing.assert_close(grad, -phi, rtol=0, atol=0)
        torch.testing.assert_close(phi, bmt_fast.svgd_step(before, score), rtol=0, atol=0)
        torch.testing.assert_close(particles.detach(), before + 0.05 * phi)
    opt.zero_grad()
    assert particles.grad is None
    opt.step(torch.randn(10, 3, dtype=torch.float64))
    assert particles.grad is not None and particles.grad is not grad


def test_lr_scheduler_reaches_the_inner_optimizer():
    particles = torch.randn(10, 2)
    opt = bmt_fast.SVGD(particles, torch.optim.SGD, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(torch.zeros(10, 2))
    scheduler.step()
    assert opt.inner.param_groups[0]["lr"] == 0.5


def test_state_dict_round_trip_continues_identically():
    def run(resume_at=None, total=20):
        torch.manual_seed(0)
        particles = torch.randn(12, 3)
        opt = bmt_fast.SVGD(particles, torch.optim.Adam, lr=0.1)
        for step in range(total):
            if step == resume_at:
                state, values = opt.state_dict(), particles.detach().clone()
                particles = values.clone()
                opt = bmt_fast.SVGD(particles, torch.optim.Adam, lr=0.1)
                opt.load_state_dict(state)
            opt.step(-particles.detach())
        return particles.detach()

    assert torch.equal(run(), run(resume_at=7))


def test_bad_construction():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer class"):
        bmt_fast.SVGD(torch.randn(3, 2), "adam")
    with pytest.raises(TypeError, match="leaf tensor"):
        bmt_fast.SVGD(torch.randn(3, 2, requires_grad=True) * 2)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        bmt_fast.SVGD(torch.randn(3, 2), bandwidth=-1.0)
    with pytest.raises(TypeError, match="particles must be one torch.Tensor of shape .n, .event., got list"):
        bmt_fast.SVGD([torch.randn(3, 2)])
    with pytest.raises(ValueError, match="unknown backend 'nope'"):  # at construction, as the bandwidth
        bmt_fast.SVGD(torch.randn(3, 2), torch.optim.SGD, backend="nope", lr=0.1)
    opt = bmt_fast.SVGD(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="one particle tensor"):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)]})
    with pytest.raises(TypeError, match="score must be a tensor or a callable"):
        opt.step([1.0, 2.0])
