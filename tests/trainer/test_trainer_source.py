"""The source stage: SVGD over prompt particles, the likelihood scale, the shared loop's outputs."""

from __future__ import annotations

import json

import pytest
import torch

import bmt_fast
from bmt_fast.transfer import Run
from bmt_fast.transfer.data import DataError, TaskSampler, load_task_data, make_batches, task_batch_sizes
from bmt_fast.transfer.evaluate import mean_nll
from bmt_fast.transfer.metrics_log import read_metrics
from bmt_fast.transfer.runner import load_particles
from bmt_fast.transfer.source import (
    ParticleTrainer,
    ParticleUpdate,
    likelihood_coefficients,
    particle_spread,
    source_layout,
)
from conftest import make_config
from synthetic_tasks import TASKS


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_source_stage_lowers_the_loss_on_held_out_examples(backbones, model_dirs, tmp_path, kind):
    pm = backbones[kind]
    cfg = make_config(tmp_path, model_dirs[kind], source={"steps": 12, "lr": 0.1})
    run = Run(cfg, "source", pm=pm)
    held_out = TASKS["movie_sentiment"].examples["validation"] + TASKS["topic"].examples["validation"]
    before = mean_nll(pm, run.initial_prompts(3), held_out, 16)
    after = mean_nll(pm, run.source("bmtpt"), held_out, 16)
    assert torch.all(after < before - 0.5), (before, after)


@pytest.mark.parametrize("scale", ["mean", "batch"])
def test_svgd_with_one_particle_is_prompt_tuning_on_the_task_mixture(backbones, model_dirs, tmp_path, scale):
    """M=1: the kernel is 1 and the repulsion 0, so SVGD is plain Adam on the mixture's loss: each task's
    batch mean weighed by its share of the data ("mean"), or the mean over the mixed batch ("batch")."""
    pm = backbones["llama"]
    flat = {"prior_std": None, "steps": 5, "num_particles": 1, "likelihood_scale": scale}
    bmtpt = Run(make_config(tmp_path / "a", model_dirs["llama"], source=flat), "source", pm=pm).source("bmtpt")
    run = Run(make_config(tmp_path / "b", model_dirs["llama"], source=flat), "source", pm=pm)
    multitask = run.source("multitask")

    tasks = [load_task_data(pm, TASKS[n], "train") for n in ("movie_sentiment", "topic")]
    sizes = [len(t) for t in tasks]
    sampler = TaskSampler(sizes, task_batch_sizes(sizes, 4, "proportional"), seed=1)
    prompt = run.initial_prompts(1)[0].clone().requires_grad_(True)
    adam = torch.optim.Adam([prompt], lr=0.05)
    for _ in range(5):
        indices = sampler.sample()
        adam.zero_grad()
        if scale == "batch":
            mixed = pm.collate([t.encoded[i] for t, idx in zip(tasks, indices) for i in idx])
            loss = pm.sequence_nll(prompt, mixed).mean()
        else:
            loss = sum(size / sum(sizes) * pm.sequence_nll(prompt, pm.collate([t.encoded[i] for i in idx])).mean()
                       for t, idx, size in zip(tasks, indices, sizes))  # fmt: skip
        loss.backward()
        adam.step()

    torch.testing.assert_close(bmtpt[0], prompt.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(bmtpt, multitask)  # the same update, bit for bit
    assert not torch.equal(prompt.detach(), run.initial_prompts(1)[0])


@pytest.mark.parametrize("rule", ["svgd", "gradient"])
def test_an_update_that_overflows_the_particles_is_divergence(rule):
    """Finite scores, but a step so large that the particles overflow: reported as divergence (the loop adds
    the step and the latest checkpoint). It had gone on to the checkpoint, where DeepSpeed's comparison of
    the processes' particles (NaN != NaN) reported processes that differ, or to a raw error of the op."""
    from bmt_fast.transfer.loop import Diverged

    particles = torch.full((4, 3, 5), 3.39e38)  # finite, a step of 3e37 from fp32's largest number
    update = ParticleUpdate(particles, rule, "adam", 3e37, 1.0, "torch")
    with pytest.raises(Diverged, match="the particles hold 60 NaN/Inf value.s. after this step"):
        update.step(torch.ones(4, 3, 5))


def test_svgd_update_is_the_inner_optimizer_applied_to_minus_phi():
    particles = torch.randn(4, 3, 5)
    score = torch.randn(4, 3, 5)
    update = ParticleUpdate(particles.clone(), "svgd", "adagrad", 0.1, "median", "torch")
    update.step(score)
    reference = particles.clone().requires_grad_(True)
    reference.grad = -bmt_fast.svgd_step(particles, score, backend="torch")
    torch.optim.Adagrad([reference], lr=0.1).step()
    torch.testing.assert_close(update.particles.detach(), reference.detach())


def test_svgd_particles_repel_where_independent_ones_would_not(backbones, model_dirs, tmp_path):
    pm = backbones["llama"]
    cfg = make_config(tmp_path, model_dirs["llama"], source={"steps": 0})
    run = Run(cfg, "source", pm=pm)
    tasks = [load_task_data(pm, TASKS["movie_sentiment"], "train")]
    start = run.initial_prompts(3)
    start[1] = start[0] + 1e-3  # two particles almost on top of each other
    moved = {}
    for rule in ("svgd", "gradient"):
        particles = start.clone()
        layout = source_layout("bmtpt", 1, 3)
        update = ParticleUpdate(particles, rule, "adam", 0.01, "median", "torch")
        sampler = TaskSampler([len(tasks[0])], [4], seed=0)
        ParticleTrainer(pm, particles, tasks, layout, sampler, update, [1.0], None).train_step()
        moved[rule] = (particles[0] - particles[1]).norm() - (start[0] - start[1]).norm()
    assert moved["svgd"] > moved["gradient"] + 1e-3


def test_score_adds_the_gaussian_prior(backbones, model_dirs, tmp_path):
    pm = backbones["t5"]
    tasks = [load_task_data(pm, TASKS[n], "train") for n in ("movie_sentiment", "topic")]
    particles = torch.randn(2, 4, pm.hidden_size)
    layout = source_layout("bmtpt", 2, 2)
    batches = make_batches(pm, tasks, TaskSampler([48, 24], [4, 2], seed=0).sample())
    scores = {}
    for prior in (None, 2.0):
        update = ParticleUpdate(particles, "gradient", "adam", 0.01, "median", "torch")
        trainer = ParticleTrainer(pm, particles, tasks, layout, None, update, [0.5, 0.5], prior)
        scores[prior], losses = trainer.score(batches)
    torch.testing.assert_close(scores[2.0] - scores[None], -particles / 4.0)
    assert losses.shape == (2, 2) and torch.isfinite(losses).all()


def test_likelihood_coefficients():
    bmtpt = source_layout("bmtpt", 2, 4)
    assert likelihood_coefficients([6, 2], [300, 100], "mean", bmtpt) == [0.75, 0.25]
    assert likelihood_coefficients([6, 2], [300, 100], "dataset", bmtpt) == [300.0, 100.0]
    assert likelihood_coefficients([6, 2], [300, 100], 2.0, bmtpt) == [1.5, 0.5]
    # "mean" is the data's shares whatever the batches: uniform sampling, or a small task's batch rounded up
    # to one example (GLUE-like sizes: it had weighed 8x its share); "batch" the batch's
    assert likelihood_coefficients([4, 4], [300, 100], "mean", bmtpt) == [0.75, 0.25]
    assert likelihood_coefficients([4, 4], [300, 100], "batch", bmtpt) == [0.5, 0.5]
    assert likelihood_coefficients([47, 1], [99_000, 1_000], "mean", bmtpt) == [0.99, 0.01]
    assert likelihood_coefficients([47, 1], [99_000, 1_000], 2.0, bmtpt) == [1.98, 0.02]
    spot = source_layout("spot", 2, 4)
    assert spot.num_particles == 2 and spot.rule == "gradient"
    assert likelihood_coefficients([4, 4], [300, 100], "mean", spot) == [1.0, 1.0]
    assert source_layout("multitask", 3, 7).num_particles == 1


def test_task_batch_sizes():
    assert task_batch_sizes([300, 100], 4, "uniform") == [4, 4]
    assert task_batch_sizes([300, 100], 4, "proportional") == [6, 2]
    assert task_batch_sizes([10_000, 1], 4, "proportional") == [8, 1]  # every task is drawn from


def test_sampler_reads_epochs_and_resumes_identically():
    sampler = TaskSampler([5, 3], [2, 3], seed=0)
    first_epoch = [i for _ in range(5) for i in sampler.sample()[0]][:10]
    assert sorted(first_epoch[:5]) == list(range(5)) and sorted(first_epoch[5:]) == list(range(5))
    state = sampler.state_dict()
    ahead = [sampler.sample() for _ in range(4)]
    again = TaskSampler([5, 3], [2, 3], seed=123)
    again.load_state_dict(state)
    assert [again.sample() for _ in range(4)] == ahead
    # a checkpoint's state of other data (a split edited in place, same path and settings): a clear error, where
    # a larger split had been drawn from the old order (its new rows never) and a smaller one raised IndexError
    for sizes in ([6, 3], [4, 3]):
        with pytest.raises(DataError, match=r"the training data changed since this checkpoint: its tasks had \[5, 3\] "
                           rf"examples, they have \[{sizes[0]}, 3\] now"):  # fmt: skip
            TaskSampler(sizes, [2, 3], seed=0).load_state_dict(state)


def test_stage_writes_particles_metrics_and_spread(backbones, model_dirs, tmp_path):
    cfg = make_config(tmp_path, model_dirs["llama"], source={"steps": 4, "log_every": 2})
    particles = Run(cfg, "source", pm=backbones["llama"]).source("bmtpt")
    stage = tmp_path / "source-bmtpt"
    assert torch.equal(load_particles(stage), particles)
    records = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert {"loss/movie_sentiment", "loss/topic", "spread", "bandwidth"} <= set(record)
        assert len(record["particle_objective"]) == 3
    spread = particle_spread(particles)
    assert records[-1]["spread"] == pytest.approx(spread["spread"])
    assert spread["spread"] == pytest.approx(float(torch.pdist(particles.reshape(3, -1).double()).mean()))
    assert spread["bandwidth"] == pytest.approx(float(bmt_fast.median_bandwidth(particles.double())))
    summary = json.loads((stage / "source.json").read_text())
    assert summary["batch_sizes"] == [5, 3] and summary["rule"] == "svgd"


def test_dropout_follows_the_runs_seed(model_dirs, tmp_path):
    """model.train_mode (the tiny T5's dropout 0.1): the same run twice gives the same particles, whatever the
    process drew before (torch's global generator is seeded from `seed` at each stage; it was not, so
    identical runs differed from the first step), and another seed gives other ones."""
    from bmt_fast.transfer import load_backbone

    pm = load_backbone(make_config(tmp_path / "m", model_dirs["t5"], model={"train_mode": True}))
    assert pm.model.training

    def particles(folder: str, seed: int = 0) -> torch.Tensor:
        torch.rand(17)  # the process's generator somewhere else each time
        cfg = make_config(tmp_path / folder, model_dirs["t5"], seed=seed, model={"train_mode": True},
                          source={"steps": 3, "lr": 0.1})  # fmt: skip
        return Run(cfg, "source", pm=pm).source("bmtpt")

    first = particles("a")
    assert torch.equal(particles("b"), first)
    assert not torch.equal(particles("c", seed=1), first)
