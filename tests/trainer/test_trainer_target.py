"""Aggregation, the target prompt (plain / MPT), the posterior-as-prior KDE, baselines and evaluation."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math

import pytest
import torch

from bmt_fast.transfer import Run
from bmt_fast.transfer.aggregate import aggregate, medoid_index
from bmt_fast.transfer.evaluate import evaluate_prompt, mean_nll
from bmt_fast.transfer.metrics_log import read_metrics
from bmt_fast.transfer.runner import read_prompt
from bmt_fast.transfer.target import KDEPrior, TargetPrompt
from conftest import make_config
from synthetic_tasks import TASKS


def test_aggregations():
    particles = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[10.0, 0.0]]])
    assert torch.equal(aggregate(particles, "mean"), torch.tensor([[11 / 3, 0.0]]))
    assert medoid_index(particles) == 1 and torch.equal(aggregate(particles, "medoid"), particles[1])
    assert torch.equal(aggregate(particles, "particle", index=2), particles[2])
    assert torch.equal(aggregate(particles, "best", target_loss=torch.tensor([3.0, 1.0, 2.0])), particles[1])
    # a loss that overflowed (NaN, or inf) is no best: argmin had taken the NaN
    assert torch.equal(aggregate(particles, "best", target_loss=torch.tensor([3.0, torch.nan, 2.0])), particles[2])
    assert torch.equal(aggregate(particles, "best", target_loss=torch.tensor([-torch.inf, 4.0, 5.0])), particles[1])
    with pytest.raises(ValueError, match="no particle has a finite target loss"):
        aggregate(particles, "best", target_loss=torch.tensor([torch.nan, torch.inf, torch.nan]))
    with pytest.raises(ValueError, match="out of range"):
        aggregate(particles, "particle", index=3)
    with pytest.raises(ValueError, match="needs target_loss"):
        aggregate(particles, "best")


def test_mpt_prompt_starts_at_its_init_and_trains_both_parts_at_their_rates():
    init = torch.randn(5, 8)
    prompt = TargetPrompt(init, "mpt", rank=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prompt(), init)  # u v^T starts as all ones, exactly
    assert prompt.u.shape == (5, 3) and prompt.v.shape == (8, 3)
    groups = prompt.param_groups(lr=0.1, lowrank_lr=0.02)
    assert [g["lr"] for g in groups] == [0.1, 0.02] and len(groups[1]["params"]) == 2
    optimizer = torch.optim.SGD(groups)
    target = torch.randn(5, 8)
    for _ in range(3):
        optimizer.zero_grad()
        (prompt() - target).square().sum().backward()
        optimizer.step()
    product = prompt.u @ prompt.v.T
    assert not torch.allclose(product, torch.ones_like(product))
    assert torch.linalg.matrix_rank(product - 1) > 1  # the extra columns are not stuck as copies
    plain = TargetPrompt(init)
    assert torch.equal(plain(), init) and len(plain.param_groups(0.1, 0.02)) == 1


def test_kde_prior_value_gradient_and_bandwidth():
    particles = torch.randn(4, 3, 2, dtype=torch.float64)
    kde = KDEPrior(particles, "median", backend="torch")
    flat = particles.reshape(4, -1)
    d2 = torch.cdist(flat, flat).square()
    expected_h = d2.flatten().sort().values[7:9].mean() / math.log(5)  # numpy median of 16 values
    assert kde.bandwidth == pytest.approx(float(expected_h))
    theta = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    value = kde(theta)
    manual = -torch.log(torch.exp(-(flat - theta.reshape(1, -1)).square().sum(1) / expected_h).mean())
    torch.testing.assert_close(value, manual)
    value.backward()
    with torch.no_grad():
        stepped = theta - 0.01 * theta.grad
    assert kde(stepped) < value  # gradient descent on the term moves theta towards the particles
    with pytest.raises(ValueError, match="at least 2 particles"):
        KDEPrior(particles[:1], "median")
    assert KDEPrior(particles[:1], 2.0).bandwidth == 2.0


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_kde_prior_far_from_every_particle_keeps_its_value_and_pull(backend):
    """Where every k underflows (theta ~ 30 bandwidths from all particles), the prior had been clamped to a
    constant 708.4 without gradient: the target prompt was no longer pulled back, silently. Checked against
    float64 log-sum-exp and a finite difference, on both sides of the switch between the two forms."""
    torch.manual_seed(3)
    particles = torch.randn(5, 4, 16, dtype=torch.float64)
    kde = KDEPrior(particles, 3.5, backend=backend)
    flat = particles.reshape(5, -1)
    direction = torch.randn(4, 16, dtype=torch.float64)
    sides = set()
    for drift in (0.0, 2.0, 7.0, 20.0):
        theta = (particles.mean(0) + drift * direction).requires_grad_(True)
        d2 = (flat - theta.detach().reshape(1, -1)).square().sum(1)
        sides.add(bool((-d2 / 3.5).max() < math.log(1e-280)))  # every k below the switch
        expected = math.log(5) - torch.logsumexp(-d2 / 3.5, 0)
        value = kde(theta)
        assert math.isfinite(float(value)) and float(value) == pytest.approx(float(expected), rel=1e-12)
        (grad,) = torch.autograd.grad(value, theta)
        step = 1e-6 * direction / direction.norm()
        numeric = (kde(theta.detach() + step) - kde(theta.detach() - step)) / 2
        assert float((grad * step).sum()) == pytest.approx(float(numeric), rel=1e-6)
        assert grad.norm() > 0
    assert sides == {False, True}


def test_kde_prior_checks_its_particles_and_bandwidth_once():
    particles = torch.randn(4, 6, dtype=torch.float64)
    bad = particles.clone()
    bad[2, 3] = float("nan")
    bad[0, 0] = float("inf")
    for bandwidth in ("median", 2.0):
        with pytest.raises(ValueError, match="particle tensor contains 2 NaN/Inf"):
            KDEPrior(bad, bandwidth)
    for bandwidth in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            KDEPrior(particles, bandwidth)
    kde = KDEPrior(particles, "median")
    # each call skips the particles' scan; a non-finite theta gives a NaN term (the target stage's gradient
    # check stops there) instead of an input error
    theta = torch.randn(6, dtype=torch.float64)
    theta[1] = float("nan")
    assert torch.isnan(kde(theta))
    flat = particles - torch.randn(6, dtype=torch.float64) * 0.1
    expected = -torch.log(torch.exp(-(particles - flat[0]).square().sum(1) / kde.bandwidth).mean())
    torch.testing.assert_close(kde(flat[0]), expected)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_target_stage_lowers_the_target_loss(backbones, model_dirs, tmp_path, kind):
    pm = backbones[kind]
    cfg = make_config(
        tmp_path, model_dirs[kind], target={"methods": ["prompt_tuning"], "steps": 12, "lr": 0.1, "prompt_type": "mpt"}
    )
    run = Run(cfg, "target", pm=pm)
    held_out = TASKS["product_sentiment"].examples["validation"]
    before = float(mean_nll(pm, run.initial_prompts(1), held_out, 16))
    metrics = run.target("prompt_tuning")
    assert metrics["loss"] < before - 0.5
    records = read_metrics(tmp_path / "target-prompt_tuning" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]


def test_transfer_runs_every_method_through_one_code_path(backbones, model_dirs, tmp_path):
    methods = ["bmtpt", "bmtpt_medoid", "bmtpt_particle", "spot_best", "spot_mean", "multitask", "prompt_tuning"]
    cfg = make_config(
        tmp_path,
        model_dirs["llama"],
        source={"steps": 3},
        target={
            "methods": methods,
            "steps": 2,
            "kde_weight": 0.1,
            "kde_bandwidth": 50.0,
            "eval_every": 1,
            "particle_index": 2,
        },
    )
    run = Run(cfg, "transfer", pm=backbones["llama"])
    results = {m: run.target(m) for m in methods}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"source-{m}" for m in ("bmtpt", "spot", "multitask")] + [f"target-{m}" for m in methods]
    )
    assert run.source("spot").shape[0] == 2 and run.source("multitask").shape[0] == 1
    for method, metrics in results.items():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
        assert (tmp_path / f"target-{method}" / "peft" / "adapter_config.json").is_file()
        records = read_metrics(tmp_path / f"target-{method}" / "metrics.jsonl")
        assert [r["step"] for r in records if "eval/accuracy" in r] == [1, 2]
        assert any("kde" in r for r in records) == (method != "prompt_tuning")


def test_initial_target_prompts_follow_the_method(backbones, model_dirs, tmp_path):
    pm = backbones["llama"]
    cfg = make_config(
        tmp_path, model_dirs["llama"], source={"steps": 2}, target={"particle_index": 1, "selection_examples": 8}
    )
    run = Run(cfg, "transfer", pm=pm)
    bmtpt, spot = run.source("bmtpt"), run.source("spot")
    train = TASKS["product_sentiment"].examples["train"]
    assert torch.equal(run.initial_target(bmtpt, "mean", train), bmtpt.mean(0))
    assert torch.equal(run.initial_target(bmtpt, "particle", train), bmtpt[1])
    losses = mean_nll(pm, spot, train[:8], 16)
    assert torch.equal(run.initial_target(spot, "best", train), spot[int(losses.argmin())])
    assert torch.equal(run.initial_target(None, "init", train), run.initial_prompts(1)[0])


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_rank_classification_picks_the_likeliest_label_word(backbones, kind):
    """Accuracy from the label word of least NLL; the loss, the gold word's NLL taken from the same ranking
    forwards, equals mean_nll's separate pass over the examples (and is that pass where a target is not a
    label word)."""
    pm = backbones[kind]
    task = TASKS["product_sentiment"]
    examples = task.examples["validation"][:6]
    prompt = torch.randn(4, pm.hidden_size)
    metrics = evaluate_prompt(pm, prompt, task, examples, batch_size=4)
    correct = 0
    for e in examples:
        scores = [
            float(pm.sequence_nll(prompt, pm.collate([pm.encode_pair(e.input_text, w)]))[0, 0])
            for w in task.label_words
        ]
        correct += task.label_words[scores.index(min(scores))] == e.target_text
    assert metrics["accuracy"] == pytest.approx(correct / len(examples))
    assert metrics["loss"] == pytest.approx(float(mean_nll(pm, prompt[None], examples, 4)), rel=1e-6)
    odd = [dataclasses.replace(examples[0], target_text="neither"), *examples[1:]]  # not a label word
    calls = []
    with patch_sequence_nll(pm, calls):
        odd_metrics = evaluate_prompt(pm, prompt, task, odd, batch_size=4)
    assert odd_metrics["loss"] == pytest.approx(float(mean_nll(pm, prompt[None], odd, 4)), rel=1e-6)
    ranked = len(odd) * len(task.label_words)
    assert sum(calls) == ranked + len(odd)  # the ranking's pairs, then one more pass for the loss
    calls.clear()
    with patch_sequence_nll(pm, calls):
        evaluate_prompt(pm, prompt, task, examples, batch_size=4)
    assert sum(calls) == ranked  # the loss from the ranking's own forwards


def test_a_non_finite_label_word_nll_gives_nan_metrics_not_a_ranking(backbones):
    """argmin takes NaN for the least NLL: an overflowed backbone scored RTE at accuracy 0.5 as if valid."""
    pm = backbones["llama"]
    task = TASKS["product_sentiment"]
    examples = task.examples["validation"][:6]
    prompt = torch.randn(4, pm.hidden_size)
    words = len(task.label_words)
    original = pm.sequence_nll

    def second_word_nan(prompts, batch):
        nll = original(prompts, batch).clone()
        nll[:, 1::words] = float("nan")  # the pairs are (example, word) in example-major order
        return nll

    pm.sequence_nll = second_word_nan
    try:
        metrics = evaluate_prompt(pm, prompt, task, examples, batch_size=4)
    finally:
        del pm.sequence_nll
    assert set(metrics) == {"loss", *task.metric_names}
    assert all(math.isnan(metrics[name]) for name in task.metric_names)


@contextlib.contextmanager
def patch_sequence_nll(pm, calls):
    """Counts the sequences pm.sequence_nll runs through the backbone."""
    original = pm.sequence_nll

    def counting(prompts, batch):
        calls.append(len(batch))
        return original(prompts, batch)

    pm.sequence_nll = counting
    try:
        yield
    finally:
        del pm.sequence_nll


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_generation_tasks_are_scored_on_greedy_output(backbones, kind):
    pm = backbones[kind]
    task = TASKS["echo"]
    examples = task.examples["validation"][:4]
    prompt = torch.randn(4, pm.hidden_size)
    metrics = evaluate_prompt(pm, prompt, task, examples, batch_size=3, max_new_tokens=4)
    assert set(metrics) == {"loss", "accuracy"}
    from bmt_fast.transfer.evaluate import generate

    texts = generate(pm, prompt, examples, batch_size=3, max_new_tokens=4)
    one_by_one = [generate(pm, prompt, [e], batch_size=1, max_new_tokens=4)[0] for e in examples]
    assert texts == one_by_one  # padding does not change what is generated
    assert metrics["accuracy"] == sum(t == e.target_text for t, e in zip(texts, examples)) / 4


def test_generation_is_plain_greedy_whatever_the_checkpoints_generation_config(backbones):
    """The backbone's generation_config (repetition_penalty, no_repeat_ngram_size, min_new_tokens, ...) does
    not change the evaluation's greedy output: transformers fills what a given config leaves unset from it,
    and it had."""
    from bmt_fast.transfer.evaluate import generate

    pm = backbones["llama"]
    examples = TASKS["echo"].examples["validation"][:3]
    prompt = torch.randn(4, pm.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.05
    plain = generate(pm, prompt, examples, batch_size=3, max_new_tokens=6)
    inputs = pm.prompted_inputs(prompt, pm.encode(examples))
    raw = pm.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pm.pad_id)
    settings = {"repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "min_new_tokens": 6, "bad_words_ids": [[7]]}
    saved = pm.model.generation_config
    pm.model.generation_config = copy.deepcopy(saved)
    try:
        for key, value in settings.items():
            setattr(pm.model.generation_config, key, value)
        changed = pm.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pm.pad_id)
        assert not torch.equal(raw, changed)  # (the settings do change transformers' own greedy output)
        assert generate(pm, prompt, examples, batch_size=3, max_new_tokens=6) == plain
    finally:
        pm.model.generation_config = saved


def test_generated_answers_lose_the_target_prefix_and_what_follows_eos(backbones, monkeypatch):
    """A decoder-only backbone learns model.target_prefix + answer: the prefix is taken off what it generates
    (" topic:good" had scored 0 against "good"). Where the pad id is an ordinary token (a tokenizer without a
    pad token, the config's pad_token_id), the pads transformers writes after a finished row's EOS are cut
    with it (a batch had generated "lamp good good" where the example alone gave "lamp")."""
    from bmt_fast.tasks import Example
    from bmt_fast.transfer.evaluate import generate

    pm = backbones["llama"]
    ordinary = pm.tokenizer("good", add_special_tokens=False)["input_ids"][-1]
    assert ordinary not in pm.tokenizer.all_special_ids
    monkeypatch.setattr(pm, "target_prefix", " topic:")
    monkeypatch.setattr(pm, "pad_id", ordinary)
    examples = [Example("repeat: lamp", "lamp lamp"), Example("x", ""), Example("repeat: book", "lamp lamp")]
    torch.manual_seed(0)
    prompt = (torch.randn(16, pm.hidden_size) * pm.embedding.weight.std()).requires_grad_()
    optimizer = torch.optim.Adam([prompt], lr=0.3)
    batch = pm.collate(pm.encode(examples))
    for _ in range(300):
        optimizer.zero_grad()
        pm.sequence_nll(prompt, batch).mean().backward()
        optimizer.step()
    prompt = prompt.detach()
    inputs = pm.prompted_inputs(prompt, pm.encode(examples))
    raw = pm.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=ordinary, eos_token_id=pm.eos_id)
    texts = pm.tokenizer.batch_decode(raw, skip_special_tokens=True)
    # (trained: transformers' own output holds the prefix, and the ordinary pads after the second row's EOS)
    assert texts[0].strip().startswith("topic:") and texts[1].strip().startswith("topic: good")
    alone = [generate(pm, prompt, [e], batch_size=1, max_new_tokens=8)[0] for e in examples]
    assert generate(pm, prompt, examples, batch_size=3, max_new_tokens=8) == alone == ["lamp lamp", "", "lamp lamp"]


def test_target_eval_json_and_results_table(backbones, model_dirs, tmp_path):
    cfg = make_config(tmp_path, model_dirs["llama"], target={"methods": ["prompt_tuning"], "steps": 1})
    run = Run(cfg, "target", pm=backbones["llama"])
    metrics = run.target("prompt_tuning")
    saved = json.loads((tmp_path / "target-prompt_tuning" / "eval.json").read_text())
    assert saved == metrics and saved["examples"] == 8 and saved["split"] == "validation"
    again = run.evaluate()
    assert again["prompt_tuning"]["accuracy"] == metrics["accuracy"]
    table = (tmp_path / "results.md").read_text()
    assert "| prompt_tuning |" in table and "accuracy" in table


def count_evaluations(monkeypatch) -> list:
    """The prompts Run's evaluators are called with from now on (a list that fills as they are)."""
    calls = []
    real = Run.evaluator

    def counting(self, task, split):
        evaluate = real(self, task, split)
        return lambda p: calls.append(p.clone()) or evaluate(p)

    monkeypatch.setattr(Run, "evaluator", counting)
    return calls


@pytest.mark.parametrize("eval_every, calls_expected", [(2, 2), (3, 2)])
def test_the_final_prompt_is_evaluated_once(backbones, model_dirs, tmp_path, monkeypatch, eval_every, calls_expected):
    """eval_every dividing target.steps: the last periodic evaluation is of the final prompt, and eval.json reuses
    it (the final prompt had been evaluated twice, a second full pass over the split); otherwise (4 steps,
    every 3) the final prompt gets its own evaluation."""
    calls = count_evaluations(monkeypatch)
    cfg = make_config(tmp_path, model_dirs["llama"], target={"methods": ["prompt_tuning"], "steps": 4,
                                                              "eval_every": eval_every})  # fmt: skip
    metrics = Run(cfg, "target", pm=backbones["llama"]).target("prompt_tuning")
    assert len(calls) == calls_expected
    final = read_prompt(tmp_path / "target-prompt_tuning" / "prompt.safetensors")
    assert torch.equal(calls[-1], final) and not torch.equal(calls[0], final)
    records = read_metrics(tmp_path / "target-prompt_tuning" / "metrics.jsonl")
    logged = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in logged] == list(range(eval_every, 5, eval_every))
    if eval_every == 2:
        assert logged[-1]["eval/loss"] == metrics["loss"] and logged[-1]["eval/accuracy"] == metrics["accuracy"]


def test_a_finished_target_is_evaluated_again_only_under_other_evaluation_settings(
    backbones, model_dirs, tmp_path, monkeypatch
):
    pm = backbones["llama"]
    target = {"methods": ["prompt_tuning", "bmtpt"], "steps": 1}
    first = make_config(tmp_path, model_dirs["llama"], source={"steps": 1}, target=target)
    run = Run(first, "transfer", pm=pm)
    run.target("prompt_tuning")
    run.target("bmtpt")
    eval_json = tmp_path / "target-prompt_tuning" / "eval.json"
    stored = json.loads(eval_json.read_text())
    assert stored["examples"] == 8 and stored["eval_settings"]["max_eval_examples"] == 8
    prompt_file = tmp_path / "target-prompt_tuning" / "prompt.safetensors"
    prompt = read_prompt(prompt_file)

    calls = count_evaluations(monkeypatch)
    same = make_config(tmp_path, model_dirs["llama"], source={"steps": 1}, target={**target, "eval_batch_size": 3})
    assert Run(same, "transfer", pm=pm, resume=True).target("prompt_tuning") == stored and not calls

    fewer = make_config(tmp_path, model_dirs["llama"], source={"steps": 1}, target=target, data={"max_eval_examples": 5})
    run = Run(fewer, "transfer", pm=pm, resume=True)
    again = run.target("prompt_tuning")
    assert len(calls) == 1 and torch.equal(calls[0], prompt)  # the stored prompt, not trained again
    assert again["examples"] == 5 and again["eval_settings"]["max_eval_examples"] == 5
    assert json.loads(eval_json.read_text()) == again and read_prompt(prompt_file).equal(prompt)
    # The table of the run folder leaves out bmtpt, still evaluated on 8 examples, until it is evaluated again.
    assert list(run.with_other_methods({"prompt_tuning": again})) == ["prompt_tuning"]
    run.target("bmtpt")
    assert list(run.with_other_methods({"prompt_tuning": again})) == ["prompt_tuning", "bmtpt"]

    del stored["eval_settings"]  # an eval.json written before the settings were recorded
    eval_json.write_text(json.dumps(stored))
    assert run.target("prompt_tuning") == again and len(calls) == 3


def test_evaluation_runs_the_backbone_in_eval_mode_and_restores_its_mode(model_dirs, tmp_path):
    from bmt_fast.transfer import load_backbone

    # model.train_mode: dropout (the tiny T5 has 0.1) while training, never while evaluating
    pm = load_backbone(make_config(tmp_path, model_dirs["t5"], model={"train_mode": True}))
    assert pm.model.training
    prompt = torch.randn(4, pm.hidden_size, generator=torch.Generator().manual_seed(0))
    for name in ("echo", "product_sentiment"):  # generation, rank classification
        task = TASKS[name]
        examples = task.examples["validation"][:6]
        rng = torch.get_rng_state()
        first = evaluate_prompt(pm, prompt, task, examples, batch_size=4, max_new_tokens=4)
        assert torch.equal(torch.get_rng_state(), rng)  # no dropout masks drawn: training is unchanged
        assert evaluate_prompt(pm, prompt, task, examples, batch_size=4, max_new_tokens=4) == first
        assert torch.equal(mean_nll(pm, prompt[None], examples, 4), mean_nll(pm, prompt[None], examples, 4))
        assert all(module.training for module in pm.model.modules())


def test_a_prompt_file_longer_than_the_positions_is_a_config_error(backbones, model_dirs, tmp_path):
    """`eval --prompt` of a file whose prompt, with the inputs, passes a learned-position limit (tiny Marian:
    64): checked against prompt.length only, it had raised an IndexError inside the forward."""
    from bmt_fast.transfer.checkpoint import atomic_save_tensors
    from bmt_fast.transfer.config import ConfigError

    pm = backbones["marian"]
    path = tmp_path / "long.safetensors"
    atomic_save_tensors(path, {"prompt": torch.randn(70, pm.hidden_size)})
    run = Run(make_config(tmp_path / "run", model_dirs["marian"]), "eval", pm=pm)
    with pytest.raises(ConfigError, match=r"prompt long.safetensors of 70 rows \(as prompt.length\): prompt.length "
                                          r"\+ model.max_source_length = 102 \(the encoder's\) positions"):
        run.evaluate(str(path))


def test_evaluate_prompt_takes_one_prompt(backbones):
    """(M, L, hidden) prompts had been scored as the first one on classification tasks, silently."""
    pm = backbones["llama"]
    task = TASKS["movie_sentiment"]
    examples = task.load("validation")[:4]
    with pytest.raises(ValueError, match=r"evaluate_prompt takes one \(L, hidden\) prompt, got shape \(3, 4, "):
        evaluate_prompt(pm, torch.zeros(3, 4, pm.hidden_size), task, examples)
