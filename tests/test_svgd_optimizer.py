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


def _density_loss(particles):
    """-log N(x; 1, 1) summed over the particles: its gradient is -score."""
    return 0.5 * ((particles - 1.0) ** 2).sum()


def test_step_from_a_backward_or_a_closure_as_torch_optimizers_take_one():
    """`loss.backward(); opt.step()` and `opt.step(closure)` with the negative log density as the loss take
    the score from its gradient: the same steps as `step(score)`. (`step(closure=None)`, as torch tools
    call it, had been a TypeError; so had `step(closure)` with the closure passed positionally, as torch
    optimizers take it: it was called as a score, with the particles.)"""

    def run(how):
        torch.manual_seed(1)
        particles = torch.randn(10, 3, requires_grad=True)
        opt = bmt_fast.SVGD(particles, torch.optim.Adam, lr=0.05)
        returned = []
        for _ in range(5):
            if how == "score":
                returned.append(opt.step(1.0 - particles.detach()))
            elif how == "backward":
                opt.zero_grad()
                _density_loss(particles).backward()
                returned.append(opt.step())
            else:

                def closure():
                    opt.zero_grad()
                    loss = _density_loss(particles)
                    loss.backward()
                    return loss

                returned.append(opt.step(closure) if how == "positional closure" else opt.step(closure=closure))
        return particles.detach(), returned

    by_score, phis = run("score")
    by_backward, phis_backward = run("backward")
    by_closure, losses = run("closure")
    by_positional, positional_losses = run("positional closure")
    torch.testing.assert_close(by_backward, by_score)
    torch.testing.assert_close(by_closure, by_score)
    torch.testing.assert_close(by_positional, by_score)
    torch.testing.assert_close(torch.stack(positional_losses), torch.stack(losses))
    for phi, phi_backward in zip(phis, phis_backward):
        torch.testing.assert_close(phi_backward, phi)
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for loss in losses)  # the closure's loss

    opt = bmt_fast.SVGD(torch.randn(4, 2), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="SVGD.step needs a score"):
        opt.step(closure=None)
    with pytest.raises(TypeError, match="a score or a closure, not both"):
        opt.step(torch.zeros(4, 2), closure=lambda: None)
    # a callable that takes the particles stays a score (also with defaults after its first argument)
    before = opt.particles.detach().clone()
    phi = opt.step(lambda x, scale=1.0: -scale * x)
    torch.testing.assert_close(phi, bmt_fast.svgd_step(before, -before))
    # a callable that can take the particles or nothing is a score, as documented; where it returns a loss the
    # error says to pass it as closure= (it had failed on the loss's shape)
    with pytest.raises(TypeError, match=r"returned a 0-dim tensor, a loss.*step\(closure=fn\)"):
        opt.step(lambda *args: (opt.particles.detach() ** 2).sum())
    with pytest.raises(TypeError, match="LBFGS"):
        bmt_fast.SVGD(torch.randn(4, 2), torch.optim.LBFGS)
    # the inner rule descends -phi: maximize=True had moved the particles away from the target, silently
    with pytest.raises(ValueError, match="maximize=True: SVGD already moves the particles up log p"):
        bmt_fast.SVGD(torch.randn(4, 2), torch.optim.Adam, lr=0.1, maximize=True)
    bmt_fast.SVGD(torch.randn(4, 2), torch.optim.Adam, lr=0.1, maximize=False)
    # nor through a state dict of an optimizer that had it (load_state_dict had set it, silently)
    particles = torch.randn(4, 2)
    adam = torch.optim.Adam([particles.clone().requires_grad_(True)], lr=0.1, maximize=True)
    svgd = bmt_fast.SVGD(particles, torch.optim.Adam, lr=0.1)
    with pytest.raises(ValueError, match="the state dict has maximize=True"):
        svgd.load_state_dict(adam.state_dict())
    assert svgd.param_groups[0]["maximize"] is False
    # nor from an optimizer class's own defaults, or param groups set since (only the keyword had been looked at:
    # a subclass with maximize=True had moved the particles away from N(1, I), silently)

    class MaxAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            super().__init__(params, maximize=True, **kwargs)

    with pytest.raises(ValueError, match="maximize=True in its param groups"):
        bmt_fast.SVGD(torch.randn(4, 2), MaxAdam, lr=0.1)
    svgd.param_groups[0]["maximize"] = True
    before = svgd.particles.detach().clone()
    with pytest.raises(ValueError, match="maximize=True in its param groups"):
        svgd.step(-svgd.particles.detach())
    assert torch.equal(svgd.particles.detach(), before) and svgd.particles.grad is None  # nothing changed


def test_construction_checks_what_the_step_would_refuse():
    """A sparse or 0-dim particle tensor and an unknown backend with no particles yet are refused when the
    optimizer is built (the first step or the inner optimizer had failed on them, with torch's message)."""
    with pytest.raises(TypeError, match="particles must be a dense .strided. tensor"):
        bmt_fast.SVGD(torch.randn(4, 2).to_sparse())
    with pytest.raises(ValueError, match="particles must have shape .n, .event., got a 0-dim tensor"):
        bmt_fast.SVGD(torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        bmt_fast.SVGD(torch.randn(0, 3), torch.optim.SGD, backend="nope", lr=0.1)
    bmt_fast.SVGD(torch.randn(0, 3), torch.optim.SGD, lr=0.1)  # (no rows: fine on a rank that holds none)


def test_a_sparse_gradient_is_taken_as_its_dense_score():
    """`loss.backward(); opt.step()` with a sparse .grad (e.g. nn.Embedding(sparse=True)): the score is the dense
    -grad (it had been refused as a sparse `score`, which the caller never passed)."""
    embedding = torch.nn.Embedding(6, 3, sparse=True)
    opt = bmt_fast.SVGD(embedding.weight, torch.optim.SGD, lr=0.1)
    before = embedding.weight.detach().clone()
    embedding(torch.tensor([0, 2, 2, 5])).pow(2).sum().backward()
    assert embedding.weight.grad.layout == torch.sparse_coo
    score = -embedding.weight.grad.to_dense()
    phi = opt.step()
    torch.testing.assert_close(phi, bmt_fast.svgd_step(before, score))
    torch.testing.assert_close(embedding.weight.detach(), before + 0.1 * phi)


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor is newer than this torch")
def test_optimizers_that_mix_elements_are_refused_over_slices():
    """With group= each rank steps its own slice: Adafactor (and Muon), whose updates read other elements of the
    tensor, had moved the particles 0.1 - 0.2 away from one process's in 5 steps, silently. Refused there (the
    group is not touched before); without a group they are the optimizer's own rule, as any other."""
    with pytest.raises(TypeError, match="Adafactor's update mixes elements across the tensor"):
        bmt_fast.SVGD(torch.randn(4, 2), torch.optim.Adafactor, group=object(), lr=0.1)
    bmt_fast.SVGD(torch.randn(4, 2), torch.optim.Adafactor, lr=0.1).step(-torch.randn(4, 2))


def test_which_callables_are_closures():
    """step(fn): a closure where fn can be called with no arguments only; a score where it can take the
    particles (also with defaults, *args, a decorator, a partial, a module), read from the code object for
    plain functions and cached per callable otherwise (inspect.signature had cost 20-40 us per step)."""
    import functools

    from bmt_fast.optim import _takes_no_arguments

    class Module(torch.nn.Module):
        def forward(self, x):
            return -x

    class Holder:
        def closure(self):
            return None

        def score(self, x):
            return -x

    @torch.no_grad()
    def decorated_score(x):
        return -x

    def closure():
        return None

    def keyword_only(*, a=1):
        return a

    closures = [closure, keyword_only, Holder().closure, functools.partial(lambda x: x, 1), torch.enable_grad()(closure)]
    scores = [lambda x: -x, lambda *a: a, lambda x, scale=1.0: x, Holder().score, decorated_score, Module(),
              functools.partial(lambda a, x: x, 1), torch.neg, lambda b=1: b]  # fmt: skip
    assert [_takes_no_arguments(f) for f in closures] == [True] * len(closures)
    assert [_takes_no_arguments(f) for f in scores] == [False] * len(scores)


def test_distributed_checkpoint_state_dict_of_a_fresh_svgd():
    """torch.distributed.checkpoint initialises a fresh optimizer's state with step(closure=None)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Module()
    model.particles = torch.nn.Parameter(torch.randn(6, 2))
    opt = bmt_fast.SVGD(model.particles, torch.optim.Adam, lr=0.1)
    before = model.particles.detach().clone()
    state = get_optimizer_state_dict(model, opt)
    assert set(state["state"]["particles"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(model.particles.detach(), before)  # its step ran at lr 0


def test_a_distributed_checkpoint_of_a_fresh_svgd_leaves_its_training_alone():
    """The state that initialisation (a zero gradient at lr 0) sets up is the inner optimizer's own for a zero
    gradient: the zero gradient had been read as a zero score, whose phi, the kernel's repulsion, went into the
    momentum or the moments (SGD momentum 0.9: particles 0.04 away from an unsaved run's after 3 steps; for
    SGD a zero momentum buffer changes nothing that follows). A first step at lr 0 with a gradient (a warm-up
    from 0) is a step as before: its phi enters the state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def run(inner, checkpoint_first: bool, warm_up_from_zero: bool = False, **options):
        model = torch.nn.Module()
        model.particles = torch.nn.Parameter(torch.randn(6, 2, generator=torch.Generator().manual_seed(3)))
        opt = bmt_fast.SVGD(model.particles, inner, lr=0.0 if warm_up_from_zero else 0.1, bandwidth=1.5, **options)
        if checkpoint_first:
            get_optimizer_state_dict(model, opt)
            moment = "momentum_buffer" if inner is torch.optim.SGD else "exp_avg"
            assert not opt.state[model.particles][moment].any()  # the zero gradient's state
        for step in range(3):
            if warm_up_from_zero and step == 1:
                opt.param_groups[0]["lr"] = 0.1
            model.zero_grad()
            (model.particles**2 / 2).sum().backward()
            opt.step()
        return model.particles.detach(), opt.state[model.particles]

    momentum = {"momentum": 0.9}
    assert torch.equal(run(torch.optim.SGD, True, **momentum)[0], run(torch.optim.SGD, False, **momentum)[0])
    run(torch.optim.Adam, True)  # (its zero moments checked in run; its step count is Adam's own matter)
    warmed, state = run(torch.optim.SGD, False, warm_up_from_zero=True, **momentum)
    unwarmed = run(torch.optim.SGD, False, **momentum)[0]
    assert state["momentum_buffer"].any() and not torch.equal(warmed, unwarmed)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_a_copied_svgd_steps_as_the_original(copy_with):
    """copy.deepcopy / pickle of an SVGD gave one without its inner optimizer or particles."""
    import copy
    import io

    torch.manual_seed(2)
    particles = torch.randn(8, 3)
    opt = bmt_fast.SVGD(particles, torch.optim.Adam, lr=0.1, bandwidth=2.0)
    for _ in range(3):
        opt.step(-particles.detach())
    if copy_with == "deepcopy":
        other = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    assert other.particles is other.inner.param_groups[0]["params"][0] and other.particles is not particles
    assert other.state is other.inner.state and other.param_groups is other.inner.param_groups
    for _ in range(3):
        opt.step(-particles.detach())
        other.step(-other.particles.detach())
    assert torch.equal(other.particles.detach(), particles.detach())
    assert other.bandwidth == 2.0 and torch.equal(other.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_optimizer_hooks_run_once_as_for_torch_optimizers():
    """The state-dict and load hooks registered on an SVGD had never run (the calls went to the inner
    optimizer), and a global step hook ran twice a step (for SVGD, then for the inner optimizer)."""
    calls = []
    opt = bmt_fast.SVGD(torch.randn(5, 2), torch.optim.Adam, lr=0.1)
    opt.register_state_dict_pre_hook(lambda o: calls.append("state_dict pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step pre"))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(
        lambda o, args, kwargs: calls.append(f"global post {type(o).__name__}")
    )
    try:
        opt.step(torch.zeros(5, 2))
    finally:
        handle.remove()
    state = opt.state_dict()
    assert state["extra"] == 1 and state["state"][0]["exp_avg"].shape == (5, 2)
    del state["extra"]
    opt.load_state_dict(state)
    assert calls == ["step pre", "global post SVGD", "state_dict pre", "load pre", "load post"]
