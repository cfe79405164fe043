"""Tiny T5, Llama and Marian backbones built from configs, with a BPE tokenizer trained offline (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0, 1, 2, 3


def train_tokenizer(texts: list[str], style: str):
    """A PreTrainedTokenizerFast: Llama style prepends <s> to inputs, the others (T5, Marian) append </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts * 2, trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIAL, show_progress=False))
    template = "<s> $A" if style == "llama" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 1), ("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def marian_config(vocab_size: int, scale_embedding: bool = True):
    """Marian's encoder with scale_embedding multiplies embed_tokens(input_ids) by sqrt(d_model) = 4 only when
    given input_ids (PromptedModel.input_scale); init_std 0.3 (the default 0.02 leaves the loss nearly blind
    to the encoder)."""
    from transformers import MarianConfig

    return MarianConfig(vocab_size=vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_position_embeddings=64, scale_embedding=scale_embedding,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None,
                        init_std=0.3)  # fmt: skip


def build_model(kind: str, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, MarianMTModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    if kind == "marian":
        return MarianMTModel(marian_config(vocab_size)).eval()
    if kind == "t5":
        config = T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.1,
        )
        return T5ForConditionalGeneration(config).eval()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # 10x the default: with 0.02 the logits are too small for a prompt to move
    )
    return LlamaForCausalLM(config).eval()


def save_tiny(kind: str, folder: Path, texts: list[str]) -> Path:
    tokenizer = train_tokenizer(texts, kind)
    model = build_model(kind, len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_untied_t5(tied: Path, folder: Path, seed: int = 1) -> Path:
    """A T5 v1.1-style checkpoint from the tiny T5 in `tied`: its own lm_head.weight beside the shared
    embedding and tie_word_embeddings false in its config (as google/t5-v1_1-* and Flan-T5 ship them).
    transformers 5 builds T5 tied whatever the config says; a plain from_pretrained unties it again."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tied, folder)
    weights = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    weights["lm_head.weight"] = torch.randn(weights["shared.weight"].shape, generator=generator) * 0.2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False), indent=2))
    return folder
