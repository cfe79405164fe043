"""The particle-batched forward: equal to separate forwards and to the backbone's own loss."""

from __future__ import annotations

import pytest
import torch

from bmt_fast.transfer.prompts import IGNORE, init_prompts
from synthetic_tasks import TASKS

KINDS = ("t5", "llama")


def examples(count: int = 5):
    """Examples of different input and target lengths, so every batch is padded."""
    return TASKS["movie_sentiment"].examples["train"][:3] + TASKS["topic"].examples["train"][: count - 3]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_forward_equals_separate_forwards(backbones, kind):
    pm = backbones[kind]
    prompts = torch.randn(3, 4, pm.hidden_size)
    batch = pm.collate(pm.encode(examples()))
    batched = pm.sequence_nll(prompts, batch)
    separate = torch.cat([pm.sequence_nll(prompts[m], batch) for m in range(3)])
    assert batched.shape == (3, len(batch))
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # each particle really gets its own prompt


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_hf_loss_of_each_example_alone(backbones, kind):
    """The padded layout and the prompt placement reproduce the backbone's own loss (labels API)."""
    pm = backbones[kind]
    prompt = torch.randn(4, pm.hidden_size)
    encoded = pm.encode(examples())
    batched = pm.sequence_nll(prompt, pm.collate(encoded))[0]
    for i, e in enumerate(encoded):
        expected = hf_summed_loss(pm, prompt, e)
        torch.testing.assert_close(batched[i], expected, rtol=1e-5, atol=1e-5)


def hf_summed_loss(pm, prompt, encoded):
    """Summed target NLL of one unpadded example from the model's own loss (mean over label tokens)."""
    source = torch.tensor([encoded.input_ids])
    target = torch.tensor([encoded.target_ids])
    if pm.kind == "encoder-decoder":
        embeds = torch.cat([prompt[None], pm.embedding(source)], dim=1)
        loss = pm.model(inputs_embeds=embeds, labels=target).loss
    else:
        ids = torch.cat([source, target], dim=1)
        embeds = torch.cat([prompt[None], pm.embedding(ids)], dim=1)
        labels = torch.full((1, embeds.shape[1]), IGNORE)
        labels[0, -target.shape[1] :] = target
        loss = pm.model(inputs_embeds=embeds, labels=labels).loss
    return loss * target.shape[1]


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_prompts_only(backbones, kind):
    pm = backbones[kind]
    prompts = torch.randn(2, 4, pm.hidden_size, requires_grad=True)
    pm.sequence_nll(prompts, pm.collate(pm.encode(examples(4)))).sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in pm.model.parameters())
    assert not pm.model.training


def test_bfloat16_backbone_gives_float32_nll_close_to_float32(backbones, model_dirs):
    from conftest import make_config

    from bmt_fast.transfer import load_backbone

    pm32 = backbones["llama"]
    pm16 = load_backbone(make_config("unused", model_dirs["llama"], model={"dtype": "bfloat16"}))
    assert pm16.dtype == torch.bfloat16
    prompts = torch.randn(2, 4, pm32.hidden_size, requires_grad=True)
    batch = pm32.collate(pm32.encode(examples(4)))
    low = pm16.sequence_nll(prompts, batch)
    low.sum().backward()
    assert low.dtype == torch.float32 and prompts.grad.dtype == torch.float32
    torch.testing.assert_close(low, pm32.sequence_nll(prompts, batch), rtol=0.05, atol=0.1)


def test_vocab_init_draws_embeddings_of_ordinary_tokens(backbones):
    pm = backbones["t5"]
    weight = pm.embedding.weight
    special = pm.tokenizer.all_special_ids
    prompts = init_prompts(
        weight, 3, 6, generator=torch.Generator().manual_seed(0), exclude_ids=special, vocab_top_k=40
    )
    assert prompts.shape == (3, 6, pm.hidden_size) and prompts.dtype == torch.float32
    tokens = prompts.reshape(-1, pm.hidden_size)
    rows = torch.cdist(tokens, weight.float(), compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    assert torch.equal(tokens, weight.float()[rows])  # every prompt token is an embedding row
    assert set(rows.tolist()).isdisjoint(special) and rows.max() < 40
    assert not torch.equal(prompts[0], prompts[1])  # particles start apart


def test_normal_init_uses_embedding_scale_by_default(backbones):
    weight = backbones["llama"].embedding.weight
    prompts = init_prompts(weight, 4, 50, method="normal", generator=torch.Generator().manual_seed(0))
    assert abs(float(prompts.std()) / float(weight.std()) - 1) < 0.1
    fixed = init_prompts(weight, 4, 50, method="normal", init_std=3.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(fixed.std()) - 3.0) < 0.3


def test_prompt_shape_is_checked(backbones):
    pm = backbones["llama"]
    batch = pm.collate(pm.encode(examples(2)))
    with pytest.raises(ValueError, match="prompts must have shape"):
        pm.sequence_nll(torch.randn(2, 4, pm.hidden_size + 1), batch)
