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


def test_an_empty_input_scores_and_generates_alike_alone_and_in_a_batch(backbones):
    """Decoder-only, an input with no tokens (a tokenizer without BOS, as SmolLM2's or GPT-2's, and empty text):
    its first target token follows the prompt's last vector. The pads of a batch sat between the prompt and
    the input, so beside a longer example it was predicted from a pad (another NLL than alone), and a
    generation chunk of empty inputs failed (a float tensor of ids)."""
    from bmt_fast.transfer.prompts import Encoded

    pm = backbones["llama"]
    torch.manual_seed(0)
    prompt = torch.randn(4, pm.hidden_size)
    longer = pm.encode(examples())[3]
    empty = Encoded((), longer.target_ids)
    alone = pm.sequence_nll(prompt, pm.collate([empty]))[0, 0]
    beside = pm.sequence_nll(prompt, pm.collate([empty, longer]))[0]
    torch.testing.assert_close(beside[0], alone, rtol=1e-5, atol=1e-5)
    target = torch.tensor([empty.target_ids])
    embeds = torch.cat([prompt[None], pm.embedding(target)], dim=1)
    labels = torch.full((1, embeds.shape[1]), IGNORE)
    labels[0, -target.shape[1] :] = target
    expected = pm.model(inputs_embeds=embeds, labels=labels).loss * target.shape[1]
    torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(beside[1], pm.sequence_nll(prompt, pm.collate([longer]))[0, 0], rtol=1e-5, atol=1e-5)

    def greedy(encoded):
        inputs = pm.prompted_inputs(prompt, encoded)
        return pm.model.generate(
            **inputs, max_new_tokens=4, do_sample=False, num_beams=1, pad_token_id=pm.pad_id, eos_token_id=-1
        )

    plain = pm.model.generate(
        inputs_embeds=prompt[None], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4,
        do_sample=False, num_beams=1, pad_token_id=pm.pad_id, eos_token_id=-1,
    )  # fmt: skip
    assert greedy([empty]).tolist() == plain.tolist()
    assert greedy([empty, longer])[0].tolist() == plain[0].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_long_inputs_are_truncated_as_the_tokenizer_does(backbones, kind):
    """Inputs past max_source_length keep the special tokens the tokenizer adds: T5's closing </s> (a slice
    of the ids had cut it from every long input, so long and short inputs ended differently) and Llama's <s>."""
    pm = backbones[kind]
    text = " ".join(["a great movie with a plot"] * 40)
    ids = pm.encode_pair(text, "positive").input_ids
    assert len(ids) == pm.max_source_length
    expected = pm.tokenizer(text, truncation=True, max_length=pm.max_source_length)["input_ids"]
    assert list(ids) == expected
    if kind == "t5":
        assert ids[-1] == pm.tokenizer.eos_token_id
    else:
        assert ids[0] == pm.tokenizer.bos_token_id


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


@pytest.mark.parametrize("scale_embedding", [True, False])
def test_a_backbone_that_scales_token_embeddings_only_for_input_ids(backbones, scale_embedding):
    """Marian's encoder (Pegasus', BlenderbotSmall's, MVP's too) with scale_embedding multiplies
    embed_tokens(input_ids) by sqrt(d_model) only when given input_ids: the tokens fed as inputs_embeds had
    gone in at 1/sqrt(d_model) of their size, silently. A hard prompt (the embeddings of some tokens) now
    gives the model's own loss of those tokens before the input."""
    from transformers import MarianMTModel

    from bmt_fast.transfer.prompts import PromptedModel
    from tiny import marian_config

    tokenizer = backbones["t5"].tokenizer
    torch.manual_seed(0)
    config = marian_config(len(tokenizer), scale_embedding)
    pm = PromptedModel(MarianMTModel(config).eval(), tokenizer, max_source_length=32, max_target_length=8)
    assert pm.input_scale() == (4.0 if scale_embedding else 1.0)
    prompt_ids = torch.tensor([[5, 9, 12]])
    with torch.no_grad():
        prompt = pm.embedding(prompt_ids)[0]
    encoded = pm.encode(examples(3))
    ours = pm.sequence_nll(prompt, pm.collate(encoded))[0]
    for i, e in enumerate(encoded):
        source = torch.cat([prompt_ids, torch.tensor([e.input_ids])], dim=1)
        with torch.no_grad():
            loss = pm.model(input_ids=source, labels=torch.tensor([e.target_ids])).loss * len(e.target_ids)
        torch.testing.assert_close(ours[i], loss, rtol=1e-5, atol=1e-5)


def test_prompts_start_where_a_scaled_embeddings_tokens_are():
    """Gemma's input embedding multiplies its rows by sqrt(hidden) (transformers' ScaledWordEmbedding, as BART
    and others with scale_embedding): the vocab init is embedding(ids), and the normal init's std that of the
    embeddings; bare rows had put the prompt at 1/sqrt(hidden) of a token's size."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from bmt_fast.transfer.prompts import embedding_scale

    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)  # fmt: skip
    embedding = GemmaForCausalLM(config).get_input_embeddings()
    assert embedding_scale(embedding) == pytest.approx(8.0)
    prompts = init_prompts(embedding.weight, 2, 5, generator=torch.Generator().manual_seed(0),
                           scale=embedding_scale(embedding))  # fmt: skip
    with torch.no_grad():
        tokens = embedding(torch.arange(64)).float()
    found = torch.cdist(prompts.reshape(-1, 64), tokens, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert float(found.max()) <= 1e-5 * float(tokens.norm(dim=1).max())  # each prompt vector is a token's
    normal = init_prompts(embedding.weight, 4, 50, method="normal", generator=torch.Generator().manual_seed(0),
                          scale=embedding_scale(embedding))  # fmt: skip
    assert float(normal.std()) == pytest.approx(float(tokens.std()), rel=0.1)


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


@pytest.mark.parametrize("family", ["bart", "roberta", "gpt2", "bloom"])
def test_a_decoder_that_does_not_number_positions_from_the_mask_is_refused(backbones, family):
    """Decoders whose forward takes no position_ids (BartForCausalLM, Marian's, TrOCR, ...) count a batch's left
    pads as positions, and RoBERTa-style ones number from padding_idx + 1: an example's NLL had depended on its
    batch (BART: 7.65 alone, 8.66 in a batch) or been off in every batch. Refused at the first forward, in one
    line; GPT-2's learned positions and Bloom's ALiBi (from the mask, no position_ids) serve as Llama's do."""
    import transformers as tf

    from bmt_fast.transfer.config import ConfigError
    from bmt_fast.transfer.prompts import PromptedModel

    tokenizer = backbones["llama"].tokenizer
    common = {"vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    torch.manual_seed(0)
    model = {
        "bart": lambda: tf.BartForCausalLM(tf.BartConfig(d_model=16, decoder_layers=1, decoder_attention_heads=2,
                                                         decoder_ffn_dim=32, max_position_embeddings=64, init_std=0.3,
                                                         is_decoder=True, is_encoder_decoder=False, **common)),
        "roberta": lambda: tf.RobertaForCausalLM(tf.RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                                  intermediate_size=32, is_decoder=True, initializer_range=0.3,
                                                                  **common)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, **common)),
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=16, n_layer=1, n_head=2, **common)),
    }[family]()
    pm = PromptedModel(model.eval(), tokenizer, max_source_length=32, max_target_length=8)
    batch = pm.collate(pm.encode(examples(3)))
    prompt = torch.randn(2, pm.hidden_size)
    if family in ("bart", "roberta"):
        with pytest.raises(ConfigError, match=f"{type(model).__name__} does not number positions as given by "
                           "position_ids from the attention mask .*: a prompt-tuned example's loss would depend"):  # fmt: skip
            pm.sequence_nll(prompt, batch)
        return
    together = pm.sequence_nll(prompt, batch)[0]
    for i, encoded in enumerate(pm.encode(examples(3))):
        torch.testing.assert_close(pm.sequence_nll(prompt, pm.collate([encoded]))[0, 0], together[i], rtol=1e-5, atol=1e-5)


def test_a_backbone_that_cannot_generate_from_embeddings_is_refused_for_generated_answers(backbones):
    """Gemma 3's multimodal checkpoints load as Gemma3ForConditionalGeneration, whose generate refuses
    inputs_embeds: a task scored by generated answers (SQuAD, ReCoRD) had failed at its first evaluation, after
    training; now a one-line error naming the task, the class and what to use (checked where the evaluation
    is set up, before training). Label-word scoring needs no generation and stays available."""
    import transformers as tf

    from bmt_fast.transfer.config import ConfigError
    from bmt_fast.transfer.evaluate import generate
    from bmt_fast.transfer.prompts import PromptedModel

    tokenizer = backbones["llama"].tokenizer
    text = tf.Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                               eos_token_id=1, bos_token_id=2)  # fmt: skip
    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=len(tokenizer) - 1,
        boi_token_index=len(tokenizer) - 3, eoi_token_index=len(tokenizer) - 2, pad_token_id=0, eos_token_id=1,
        bos_token_id=2))  # fmt: skip
    pm = PromptedModel(model.eval(), tokenizer, max_source_length=32, max_target_length=8)
    prompt = torch.randn(2, pm.hidden_size)
    assert torch.isfinite(pm.sequence_nll(prompt, pm.collate(pm.encode(examples(2))))).all()
    with pytest.raises(ConfigError, match="task 'squad' is scored by generated answers, and Gemma3ForConditionalGeneration "
                       r"cannot generate from inputs_embeds .*Gemma3ForCausalLM"):  # fmt: skip
        generate(pm, prompt, examples(2), 2, 4, "squad")
    backbones["llama"].check_generation("squad")  # (decoder-only classes that can: no error)


@pytest.mark.parametrize("kind", KINDS)
def test_a_target_past_max_target_length_keeps_its_start_without_eos_and_is_reported(backbones, kind, caplog):
    """A generated answer longer than model.max_target_length (SQuAD's, ReCoRD's) keeps its first tokens and
    no EOS (an EOS after the cut had taught the prompt to stop there), and loading such a split warns with how
    many targets were cut and the length that keeps them whole (nothing had said so), as the evaluation's loss does
(once); short ones end in EOS."""
    from pathlib import Path

    from bmt_fast.tasks import get_task
    from bmt_fast.transfer.data import load_task_data
    from bmt_fast.transfer.evaluate import mean_nll
    from bmt_fast.transfer.prompts import _CUT_WARNINGS

    pm = backbones[kind]
    answer = " ".join(["three newspapers and a radio station"] * 3)
    whole = pm.tokenizer(pm.target_prefix + answer, add_special_tokens=False)["input_ids"]
    assert len(whole) > pm.max_target_length
    assert list(pm.encode_pair("question", answer).target_ids) == whole[: pm.max_target_length]
    short = pm.encode_pair("question", "yes").target_ids
    assert short[-1] == pm.eos_id and len(short) <= pm.max_target_length

    data = Path(__file__).resolve().parents[1] / "fixtures" / "data"
    task = get_task("squad")
    counts = [len(pm.tokenizer(pm.target_prefix + e.target_text, add_special_tokens=False)["input_ids"]) + 1
              for e in task.load("validation", str(data))]  # fmt: skip
    limit = sorted(counts)[len(counts) // 2]  # about half the answers cut
    cut = sum(count > limit for count in counts)
    assert 0 < cut < len(counts)
    kept, pm.max_target_length = pm.max_target_length, limit
    _CUT_WARNINGS.clear()
    try:
        with caplog.at_level("WARNING", logger="bmt_fast.transfer.prompts"):
            loaded = load_task_data(pm, task, "validation", str(data))
            said = caplog.text
            caplog.clear()
            for _ in range(2):  # the evaluation's loss: said too, once however often it runs
                mean_nll(pm, torch.zeros(1, 2, pm.hidden_size), loaded.examples, 3)
    finally:
        pm.max_target_length = kept
    assert max(len(e.target_ids) for e in loaded.encoded) == limit
    assert (f"task squad, split validation: model.max_target_length={limit} cuts {cut} of {len(counts)} targets "
            f"(the longest has {max(counts)} tokens") in said  # fmt: skip
    assert f"set model.max_target_length to {max(counts)}" in said
    assert caplog.text.count(f"evaluation examples: model.max_target_length={limit} cuts {cut} of") == 1
