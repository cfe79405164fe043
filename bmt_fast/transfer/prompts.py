"""Soft prompts on a frozen Hugging Face backbone: initialisation and the particle-batched forward.

Prompts are float32 tensors of shape (M, L, hidden): M particles (prompts), L tokens each. One backbone
pass runs all M particles on a batch of B examples as M*B sequences, each with its own prompt, and
returns the per-particle, per-example negative log-likelihood of the targets.

Layouts (the prompt is always prepended to the embedded input, as in Lester et al. and PEFT):
    encoder-decoder (T5):   encoder  [prompt | input tokens | pad]     decoder  [start | target[:-1]]
    decoder-only (Llama):   [prompt | pad | input tokens | target tokens]
The decoder-only layout pads between prompt and input, so every target ends the sequence: the logits
of the last T_target + 1 positions are all that is computed (`logits_to_keep`), and position ids are
taken from the attention mask, so padding does not move a token's position.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from ..tasks import Example

logger = logging.getLogger(__name__)
_CUT_WARNINGS: set[str] = set()  # (each said once: evaluations repeat every eval_every steps)

IGNORE = -100
ENCODER_DECODER = "encoder-decoder"
DECODER_ONLY = "decoder-only"


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example (input with the tokenizer's special tokens, target ending in EOS unless
    max_target_length cut it)."""

    input_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T_target), IGNORE where there is no target token
    decoder_input_ids: torch.Tensor | None = None  # encoder-decoder only

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if v is not None else None for k, v in moved.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class PromptedModel:
    """A frozen backbone and its tokenizer; everything the trainer computes with prompts goes through here.

    The backbone's weights may be partitioned by DeepSpeed ZeRO-3 (each process holds a shard, and a
    parameter's local tensor is empty): nothing here reads weight values outside the model's forward, whose
    hooks gather them; shapes come from the parameter's full shape (`ds_shape`), the device from `device`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_source_length: int = 256,
        max_target_length: int = 16,
        target_prefix: str = " ",
        train_mode: bool = False,
        device: torch.device | None = None,
    ):
        self.model = model
        self._device = device
        self.tokenizer = tokenizer
        self.kind = ENCODER_DECODER if model.config.is_encoder_decoder else DECODER_ONLY
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.target_prefix = target_prefix_of(self.kind, target_prefix)
        self.pad_id = _pad_id(model, tokenizer)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; targets need one to end")
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._id_branch_scale: float | None = None  # (input_scale: found at the first forward)
        model.requires_grad_(False)
        model.train(train_mode)

    # -- properties of the backbone ----------------------------------------------------------------

    @property
    def embedding(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return full_shape(self.embedding.weight)[1]

    @property
    def device(self) -> torch.device:
        """Where inputs and prompts go (default: where the embedding is)."""
        return self._device if self._device is not None else self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    # -- text -> ids -> batches ---------------------------------------------------------------------

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        return [self.encode_pair(e.input_text, e.target_text) for e in examples]

    def encode_reporting_cuts(self, examples: Sequence[Example], where: str) -> list[Encoded]:
        """encode(examples), with a warning (once per distinct one in this process) where max_target_length
        cuts targets: how many, and the length that keeps them whole. where: which examples, for the message."""
        encoded, cut, longest = [], 0, 0
        for e in examples:
            pair, count = self._encode_pair(e.input_text, e.target_text)
            encoded.append(pair)
            cut += count > self.max_target_length
            longest = max(longest, count)
        if cut:  # (answers of generation tasks: label words that do not fit are a ConfigError, check_label_words)
            message = (
                f"{where}: model.max_target_length={self.max_target_length} cuts {cut} of {len(examples)} targets "
                f"(the longest has {longest} tokens with its EOS): they are trained on, and their loss is taken, as "
                f"their first {self.max_target_length} tokens (generated answers are still compared with the whole "
                f"ones); set model.max_target_length to {longest} to keep them whole"
            )
            if message not in _CUT_WARNINGS:
                _CUT_WARNINGS.add(message)
                logger.warning("%s", message)
        return encoded

    def encode_pair(self, input_text: str, target_text: str) -> Encoded:
        return self._encode_pair(input_text, target_text)[0]

    def _encode_pair(self, input_text: str, target_text: str) -> tuple[Encoded, int]:
        """The pair's ids and the target's own token count with its EOS. A target longer than
        max_target_length keeps its first max_target_length tokens and no EOS: it is the start of a longer
        answer (an EOS after the cut had taught the prompt to stop there)."""
        # the tokenizer truncates: it keeps the special tokens it adds (T5's closing </s>, which a slice had cut
        # from every input longer than max_source_length)
        source = self.tokenizer(input_text, add_special_tokens=True, truncation=True, max_length=self.max_source_length)
        source = source["input_ids"]
        target = self.tokenizer(self.target_prefix + target_text, add_special_tokens=False)["input_ids"]
        count = len(target) + 1
        target = target[: self.max_target_length] if count > self.max_target_length else target + [self.eos_id]
        return Encoded(tuple(source), tuple(target)), count

    def check_label_words(self, task_name: str, label_words: Sequence[str] | None) -> None:
        """ConfigError where a label word's target ids (with EOS) pass max_target_length (check_label_words)."""
        check_label_words(self.tokenizer, self.target_prefix, self.max_target_length, [(task_name, label_words)])

    def collate(self, encoded: Sequence[Encoded]) -> Batch:
        if not encoded:
            raise ValueError("cannot build a batch from no examples")
        build = _collate_encoder_decoder if self.kind == ENCODER_DECODER else _collate_decoder_only
        return build(encoded, self.pad_id, self._decoder_start_id()).to(self.device)

    def _decoder_start_id(self) -> int | None:
        if self.kind != ENCODER_DECODER:
            return None
        start = self.model.config.decoder_start_token_id
        if start is None:
            raise ValueError("the encoder-decoder config has no decoder_start_token_id")
        return start

    # -- the particle-batched forward ---------------------------------------------------------------

    def sequence_nll(self, prompts: torch.Tensor, batch: Batch) -> torch.Tensor:
        """-log p(target | prompt_m, input) summed over target tokens, shape (M, B), float32.

        prompts: (M, L, hidden) (or (L, hidden) for one prompt, giving shape (1, B)); any float dtype,
        cast to the backbone's dtype. Differentiable in prompts; the backbone gets no gradients.
        """
        prompts = _as_particles(prompts, self.hidden_size)
        m, b = prompts.shape[0], len(batch)
        embeds, mask = self._prompted(prompts, batch.input_ids, batch.attention_mask)
        labels = _repeat(batch.labels, m)
        if self.kind == ENCODER_DECODER:
            logits = self.model(
                inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=_repeat(batch.decoder_input_ids, m)
            ).logits
        else:
            logits = self._decoder_only_target_logits(embeds, mask, labels.shape[1])
        return _token_nll(logits, labels).view(m, b)

    def _prompted(
        self, prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds (M*B, L+T, hidden), times input_scale, and their attention mask: particle m's prompt
        with each of the B embedded inputs, the prompt first (encoder-decoder) or after the inputs' left
        padding (decoder-only: _pads_before_prompt)."""
        m, length, hidden = prompts.shape
        tokens = self.embedding(input_ids)  # (B, T, hidden)
        b, t, _ = tokens.shape
        prompts = prompts.to(tokens.dtype)[:, None].expand(m, b, length, hidden)
        embeds = torch.cat([prompts, tokens[None].expand(m, b, t, hidden)], dim=2).reshape(m * b, length + t, hidden)
        scale = self.input_scale()
        embeds = embeds if scale == 1.0 else embeds * scale
        mask = _repeat(_prefix_ones(attention_mask, length), m)
        if self.kind != ENCODER_DECODER:
            embeds, mask = _pads_before_prompt(embeds, mask, length)
        return embeds, mask

    def input_scale(self) -> float:
        """The factor a backbone applies to its embedding's output when given input_ids but not when given
        inputs_embeds: the encoders of Marian, Pegasus, BlenderbotSmall and MVP with scale_embedding multiply
        embed_tokens(input_ids) by embed_scale (sqrt(d_model)) only then, and the tokens here went in 1/sqrt(d)
        of their size. The prompt and the tokens are fed as the model's id branch would have them (prompts
        live where the embedding's outputs do). Found once, at the first forward, by comparing the receiving
        module's outputs for a few ids both ways, and only where that module has an `embed_scale` its embedding
        lacks (others: 1, no forward); neither 1 nor embed_scale reproducing the ids' outputs is a ValueError."""
        if self._id_branch_scale is None:
            scale = self._find_input_scale()
            if self.kind == DECODER_ONLY:
                self._check_positions(scale)
            self._id_branch_scale = scale
        return self._id_branch_scale

    @property
    def known_input_scale(self) -> float | None:
        """input_scale where a forward has found it already, else None (finding it runs forwards)."""
        return self._id_branch_scale

    def _find_input_scale(self) -> float:
        encoder_decoder = self.kind == ENCODER_DECODER
        try:  # (transformers' lookups are best-effort: a model they cannot place keeps the factor 1)
            receiver = self.model.get_encoder() if encoder_decoder else self.model.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            return 1.0
        scale = getattr(receiver, "embed_scale", None)
        if receiver is None or scale is None or hasattr(self.embedding, "embed_scale") or float(scale) == 1.0:
            return 1.0
        ids = torch.arange(4, device=self.device)[None] % full_shape(self.embedding.weight)[0]
        mask = torch.ones_like(ids)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                want = receiver(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                tokens = self.embedding(ids)
                for factor in (1.0, float(scale)):
                    got = receiver(inputs_embeds=tokens * factor, attention_mask=mask).last_hidden_state.float()
                    if torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
                        return factor
        finally:
            self.model.train(training)
        raise ValueError(
            f"{type(receiver).__name__} gives other outputs for inputs_embeds = its embedding of input_ids than for "
            f"the input_ids (also times its embed_scale {float(scale)}): prompts cannot be placed before its inputs"
        )

    def check_generation(self, task_name: str | None = None) -> None:
        """ConfigError where the backbone cannot generate from inputs_embeds, as the evaluation of a task scored by
        its generated answers (SQuAD, ReCoRD, ...) does: transformers refuses a decoder-only class whose
        prepare_inputs_for_generation takes no inputs_embeds (Gemma 3's multimodal checkpoints load as
        Gemma3ForConditionalGeneration), which had stopped a run at its first evaluation, after training."""
        if self.kind == ENCODER_DECODER:
            return
        prepare = getattr(self.model, "prepare_inputs_for_generation", None)
        if prepare is not None and "inputs_embeds" in inspect.signature(prepare).parameters:
            return
        from .config import ConfigError

        scored = "" if task_name is None else f"task {task_name!r} is scored by generated answers, and "
        raise ConfigError(
            f"{scored}{type(self.model).__name__} cannot generate "
            f"from inputs_embeds (its prepare_inputs_for_generation takes none), which prompts need; use a task "
            f"scored by label words, or another backbone (for Gemma 3, a text-only checkpoint: Gemma3ForCausalLM)"
        )

    def _check_positions(self, scale: float) -> None:
        """ConfigError unless a decoder-only backbone numbers a sequence's positions from the attention mask and
        position_ids as passed here: a few tokens after three left pads must give the last token's logits of
        the same tokens alone, numbered by the model itself. Decoders whose forward takes no position_ids
        (BartForCausalLM, MarianForCausalLM, TrOCR, ...) count the pads, so an example's loss and generated
        answer had depended on the batch it was in; RoBERTa-style decoders number from padding_idx + 1, so every
        token had had the position embedding of the one before (an NLL of 12.57 for 10.82). Run once, at the
        first forward (in eval mode), as input_scale is found."""
        vocab = full_shape(self.embedding.weight)[0]
        ids = (torch.arange(1, 6, device=self.device) % vocab)[None]
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], device=self.device)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                tokens = self.embedding(ids) * scale
                padded = torch.cat([tokens[:, :3], tokens], dim=1)  # (any vectors under the masked pads)
                keep = {"logits_to_keep": 1} if self._keeps_logits else {}
                own = self.model(inputs_embeds=tokens, attention_mask=torch.ones_like(ids), **keep).logits[0, -1]
                got = self.model(inputs_embeds=padded, attention_mask=mask, position_ids=_positions(mask), **keep)
                got = got.logits[0, -1]
        finally:
            self.model.train(training)
        own, got = own.float(), got.float()
        # (fp32 products in full precision: 1e-3; TF32 or bf16 products, a 16-bit backbone: 5e-2. The defects
        # it finds are far larger: logits 1.9 - 5 apart on tiny models)
        full = torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
        tolerance = 1e-3 if self.dtype == torch.float64 or (self.dtype == torch.float32 and full) else 5e-2
        if not torch.allclose(got, own, rtol=tolerance, atol=tolerance * float(own.abs().max())):
            from .config import ConfigError  # (a backbone the trainer cannot serve: exit 2, one line)

            raise ConfigError(
                f"{type(self.model).__name__} does not number positions as given by position_ids from the attention "
                f"mask (its logits after left pads differ from those of the same tokens alone: "
                f"{float((got - own).abs().max()):.3g} apart): a prompt-tuned example's loss would depend on the "
                f"padding of its batch; use a decoder-only backbone whose forward takes position_ids counted from 0 "
                f"(Llama, SmolLM, GPT-2, Qwen, Mistral, Gemma, ...) or an encoder-decoder one"
            )

    def _decoder_only_target_logits(self, embeds: torch.Tensor, mask: torch.Tensor, target_len: int) -> torch.Tensor:
        """Logits that predict the last target_len tokens (targets end every sequence)."""
        keep = {"logits_to_keep": target_len + 1} if self._keeps_logits else {}
        logits = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), **keep).logits
        return logits[:, -(target_len + 1) : -1]

    # -- prompts for generation ---------------------------------------------------------------------

    def prompted_inputs(self, prompt: torch.Tensor, encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """inputs_embeds and attention_mask of (prompt, inputs) for `model.generate`; decoder-only inputs are
        left-padded (before the prompt) so that generation continues from every last input token, or from the
        prompt's last vector for an empty input."""
        ids = [e.input_ids for e in encoded]
        width = max(len(x) for x in ids)
        if self.kind == ENCODER_DECODER:
            rows = [list(x) + [self.pad_id] * (width - len(x)) for x in ids]
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
        else:
            rows = [[self.pad_id] * (width - len(x)) + list(x) for x in ids]
            mask = [[0] * (width - len(x)) + [1] * len(x) for x in ids]
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)  # (long also when all are empty)
        embeds, attention = self._prompted(
            _as_particles(prompt, self.hidden_size), input_ids, torch.tensor(mask, dtype=torch.long, device=self.device)
        )
        return {"inputs_embeds": embeds, "attention_mask": attention}


# ---------------------------------------------------------------------------------------------------
# Initialisation


def init_prompts(
    embedding_weight: torch.Tensor,
    num_prompts: int,
    length: int,
    *,
    method: str = "vocab",
    generator: torch.Generator | None = None,
    init_std: float | None = None,
    vocab_top_k: int | None = None,
    exclude_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    scale: float = 1.0,
    distinct: bool = True,
) -> torch.Tensor:
    """(num_prompts, length, hidden) float32 prompts.

    vocab: each prompt token is the embedding of a token id drawn uniformly (independently per particle,
        so the particles start apart) from the first `vocab_top_k` ids of the tokenizer's vocabulary,
        special tokens excluded. normal: N(0, init_std^2), init_std defaulting to the embeddings' std.
    scale: what the embedding module multiplies its weight rows by (embedding_scale): the embeddings are
        the rows times it.
    distinct: the vocab init's prompts must differ (SVGD particles: identical ones never separate); a
        ConfigError where the candidate tokens cannot make them differ, or this generator's draw did not.
    """
    if num_prompts < 1 or length < 1:
        raise ValueError(f"need num_prompts >= 1 and length >= 1, got {num_prompts}, {length}")
    weight = embedding_weight.detach()
    if method == "normal":
        std = init_std if init_std is not None else float(weight.cpu().float().std()) * scale
        return torch.randn(num_prompts, length, weight.shape[1], generator=generator) * std
    if method != "vocab":
        raise ValueError(f"prompt init must be 'vocab' or 'normal', got {method!r}")
    candidates = _candidate_ids(min(vocab_size or weight.shape[0], weight.shape[0]), vocab_top_k, exclude_ids)
    picks = torch.randint(len(candidates), (num_prompts, length), generator=generator)
    if distinct:
        _check_distinct(picks, len(candidates), vocab_top_k)
    # Only the picked rows leave the device (a large vocabulary's float32 copy would be GBs).
    return weight[candidates[picks].to(weight.device)].float().cpu() * scale


def target_prefix_of(kind: str, target_prefix: str) -> str:
    """The text between input and answer: model.target_prefix for decoder-only backbones (their answer follows
    the input in one sequence), none for encoder-decoder ones (the answer is the decoder's own sequence)."""
    return target_prefix if kind == DECODER_ONLY else ""


def check_label_words(
    tokenizer, target_prefix: str, max_target_length: int, tasks: Sequence[tuple[str, Sequence[str] | None]]
) -> None:
    """ConfigError where a label word's target ids (with EOS) pass max_target_length: encode_pair would cut
    them, and ranking scored (and training taught) the cut words (at 1, every class only its EOS: the same NLL
    for all, argmin class 0). The length asked for is that of the longest word of all `tasks` (task name,
    label words), so that one change serves them all (the first word's count had been too short for others)."""
    longest = None
    for task_name, words in tasks:
        for word in words or ():
            count = len(tokenizer(target_prefix + word, add_special_tokens=False)["input_ids"]) + 1
            if count > max_target_length and (longest is None or count > longest[0]):
                longest = (count, task_name, word)
    if longest is not None:
        from .config import ConfigError  # (a setting this tokenizer cannot serve: exit 2, one line)

        count, task_name, word = longest
        raise ConfigError(
            f"model.max_target_length={max_target_length} cuts label words (the longest: task {task_name!r}'s "
            f"{word!r}, {count} target tokens with EOS); raise it to at least {count}"
        )


def embedding_scale(embedding: torch.nn.Module) -> float:
    """The factor an input-embedding module's forward applies to its weight rows: `embed_scale` of Hugging
    Face's *ScaledWordEmbedding modules (sqrt(hidden) for Gemma's; BART's and others' with scale_embedding),
    1 for a plain nn.Embedding. Prompts live where embedding(ids) does (the vocab init had copied bare rows:
    1/sqrt(hidden) of a token's size on Gemma)."""
    return float(getattr(embedding, "embed_scale", 1.0))


def check_vocab_top_k(
    vocab: int,
    top_k: int | None,
    exclude: Sequence[int],
    num_prompts: int = 1,
    length: int = 1,
    seed: int | None = None,
) -> None:
    """ConfigError where prompt.vocab_top_k leaves the vocab init no token, or (num_prompts > 1 SVGD particles
    of `length` tokens) too few tokens for distinct particles, or where the draw init_prompts makes with
    `seed` gives two particles the same tokens: init_prompts' own checks, for a caller that has the tokenizer
    but no loaded weights (vocab: the number of embedding rows)."""
    candidates = _candidate_ids(vocab, top_k, exclude)
    if num_prompts > 1:  # (init_prompts' draw, where the seed says which)
        picks = None if seed is None else torch.randint(
            len(candidates), (num_prompts, length), generator=torch.Generator().manual_seed(seed)
        )
        _check_distinct(picks, len(candidates), top_k, num_prompts, length)


def _check_distinct(
    picks: torch.Tensor | None, candidates: int, top_k: int | None, num_prompts: int = 0, length: int = 0
) -> None:
    """ConfigError where the token ids drawn for several prompts (picks: (M, L)) cannot all differ (fewer
    than M distinct sequences of L among `candidates` tokens), or do not (picks None: only the first). A
    vocab_top_k that left one token had made every particle the same prompt, which SVGD never separates:
    M particles trained as one, silently."""
    if picks is not None:
        num_prompts, length = picks.shape
    if num_prompts < 2:
        return
    from .config import ConfigError  # (a setting that this tokenizer cannot serve: exit 2, one line)

    name = f"prompt.vocab_top_k={top_k}" if top_k else "prompt.init=vocab"
    fix = "raise it, or use prompt.init=normal" if top_k else "use prompt.init=normal"
    if candidates ** min(length, 64) < num_prompts:  # (2 ** 64 exceeds any particle count)
        raise ConfigError(
            f"{name}: {candidates} token(s) to initialise prompts from (special tokens left out) cannot make "
            f"{num_prompts} distinct particles of {length} token(s), and identical particles never separate "
            f"under SVGD; {fix}"
        )
    if picks is not None and torch.unique(picks, dim=0).shape[0] < num_prompts:
        raise ConfigError(
            f"{name}: the {num_prompts} particles drawn from {candidates} tokens with this seed include identical "
            f"ones, which never separate under SVGD; {fix}, or change the seed"
        )


def _candidate_ids(vocab: int, top_k: int | None, exclude: Sequence[int]) -> torch.Tensor:
    ids = torch.arange(min(vocab, top_k) if top_k else vocab)
    keep = ~torch.isin(ids, torch.tensor(sorted(set(exclude)), dtype=torch.long))
    if not bool(keep.any()):
        from .config import ConfigError  # (a setting that this tokenizer cannot serve: exit 2, one line)

        raise ConfigError(
            f"prompt.vocab_top_k={top_k}: no token left to initialise prompts from among the first {len(ids)} "
            f"ids once the tokenizer's {len(set(exclude))} special tokens are left out; raise it (or use "
            f"prompt.init=normal)"
        )
    return ids[keep]


# ---------------------------------------------------------------------------------------------------
# Helpers


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(parameter, "ds_shape", parameter.shape)


def _as_particles(prompts: torch.Tensor, hidden: int) -> torch.Tensor:
    if prompts.dim() == 2:
        prompts = prompts[None]
    if prompts.dim() != 3 or prompts.shape[-1] != hidden or prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must have shape (M, L, {hidden}) or (L, {hidden}), got {tuple(prompts.shape)}")
    return prompts


def _pad_id(model: torch.nn.Module, tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, model.config.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("neither the tokenizer nor the model defines a pad or EOS token")


def _repeat(t: torch.Tensor, m: int) -> torch.Tensor:
    """(B, ...) -> (M*B, ...), particle-major, matching _prompted."""
    return t.repeat(m, *([1] * (t.dim() - 1)))


def _prefix_ones(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)


def _pads_before_prompt(
    embeds: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-only rows [prompt | pads | tokens] (mask 1, 0, 1) as [pads | prompt | tokens]: the position
    before a row's first token is then its own last token or, for an empty input, the prompt's last vector;
    with the pads after the prompt, an empty input's first target token had been predicted from a pad (its
    score then depended on the longer rows batched with it). Positions come from the mask either way. One
    gather, also where no row has pads (no host synchronisation to find out)."""
    pads = (mask[:, length:] == 0).sum(dim=1, keepdim=True)  # (R, 1): contiguous, right after the prompt
    j = torch.arange(mask.shape[1], device=mask.device)[None]
    source = torch.where(j < pads, j + length, torch.where(j < pads + length, j - pads, j))
    moved = embeds.gather(1, source[..., None].expand(-1, -1, embeds.shape[-1]))
    return moved, (j >= pads).to(mask.dtype)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask: each token's count of tokens before it, pads at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token NLL per sequence, computed in float32 whatever the backbone dtype."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(dim=1)


def _collate_encoder_decoder(encoded: Sequence[Encoded], pad: int, start: int | None) -> Batch:
    source_width = max(len(e.input_ids) for e in encoded)
    target_width = max(len(e.target_ids) for e in encoded)
    input_ids, mask, labels, decoder = [], [], [], []
    for e in encoded:
        n, t = len(e.input_ids), len(e.target_ids)
        input_ids.append(list(e.input_ids) + [pad] * (source_width - n))
        mask.append([1] * n + [0] * (source_width - n))
        labels.append(list(e.target_ids) + [IGNORE] * (target_width - t))
        decoder.append([start] + list(e.target_ids[:-1]) + [pad] * (target_width - t))
    return Batch(torch.tensor(input_ids), torch.tensor(mask), torch.tensor(labels), torch.tensor(decoder))


def _collate_decoder_only(encoded: Sequence[Encoded], pad: int, start: int | None) -> Batch:
    width = max(len(e.input_ids) + len(e.target_ids) for e in encoded)
    target_width = max(len(e.target_ids) for e in encoded)
    input_ids, mask, labels = [], [], []
    for e in encoded:
        sequence = list(e.input_ids) + list(e.target_ids)
        gap, t = width - len(sequence), len(e.target_ids)
        input_ids.append([pad] * gap + sequence)
        mask.append([0] * gap + [1] * len(sequence))
        labels.append([IGNORE] * (target_width - t) + list(e.target_ids))
    return Batch(torch.tensor(input_ids), torch.tensor(mask), torch.tensor(labels))
