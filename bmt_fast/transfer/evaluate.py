"""Evaluation of a prompt on a task: rank classification over label words, or greedy generation, scored
by the task's own metrics; plus the mean NLL of the gold targets.

Every evaluation runs the backbone in eval mode (no dropout, as Hugging Face's Trainer evaluates), also
with `model.train_mode`, and puts each module back in its previous mode afterwards: results do not vary
from call to call, and evaluating draws no random numbers, so it does not change the training that
follows.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Sequence

import torch

from ..tasks import Example, Task
from .prompts import PromptedModel


@contextmanager
def eval_mode(model: torch.nn.Module):
    """`model` in eval mode inside the block; every module's previous mode restored after it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _in_eval_mode(fn):
    @functools.wraps(fn)
    def wrapper(pm: PromptedModel, *args, **kwargs):
        with eval_mode(pm.model):
            return fn(pm, *args, **kwargs)

    return wrapper


@torch.no_grad()
@_in_eval_mode
def evaluate_prompt(
    pm: PromptedModel,
    prompt: torch.Tensor,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
) -> dict[str, float]:
    """{"loss": mean gold NLL, **task.compute_metrics(predictions, examples)} for one (L, hidden) prompt.

    Classification: where every example's target is one of the label words (as in every registered task),
    the gold NLL is the ranking's own NLL of that word (the same encoded pair), so the examples go through
    the backbone once per label word, not once more for the loss."""
    if not examples:
        raise ValueError(f"no {task.name} examples to evaluate")
    if prompt.dim() != 2:  # ((M, L, hidden) had been scored as its first prompt on classification tasks)
        raise ValueError(f"evaluate_prompt takes one (L, hidden) prompt, got shape {tuple(prompt.shape)}")
    loss = None
    if task.is_classification:
        words = list(task.label_words)
        pm.check_label_words(task.name, words)
        nll = label_nll(pm, prompt, examples, words, batch_size)
        if all(e.target_text in words for e in examples):
            gold = torch.tensor([words.index(e.target_text) for e in examples], device=nll.device)
            loss = nll.double().gather(1, gold[:, None]).mean().item()
        if not bool(torch.isfinite(nll).all()):
            # argmin takes a NaN for the smallest NLL: the ranking, and every metric from it, would look
            # valid (RTE at accuracy 0.5) where the backbone overflowed. NaN metrics: null in eval.json and
            # the results table, with a warning (runner._warn_if_not_finite).
            return {"loss": float("nan") if loss is None else loss, **{m: float("nan") for m in task.metric_names}}
        predictions = [words[i] for i in nll.argmin(dim=1).tolist()]
    else:
        predictions = generate(pm, prompt, examples, batch_size, max_new_tokens, task.name)
    if loss is None:
        loss = mean_nll(pm, prompt[None], examples, batch_size).item()
    metrics = {"loss": loss}
    metrics.update(task.compute_metrics(predictions, examples))
    return metrics


@torch.no_grad()
@_in_eval_mode
def mean_nll(pm: PromptedModel, prompts: torch.Tensor, examples: Sequence[Example], batch_size: int) -> torch.Tensor:
    """Mean gold-target NLL of each of the (M, L, hidden) prompts, shape (M,)."""
    total = torch.zeros(prompts.shape[0], dtype=torch.float64, device=pm.device)
    for chunk in _chunks(pm.encode_reporting_cuts(examples, "evaluation examples"), batch_size):
        total += pm.sequence_nll(prompts, pm.collate(chunk)).double().sum(dim=1)
    return (total / len(examples)).cpu()


@torch.no_grad()
@_in_eval_mode
def label_nll(
    pm: PromptedModel, prompt: torch.Tensor, examples: Sequence[Example], label_words: Sequence[str], batch_size: int
) -> torch.Tensor:
    """-log p(word | prompt, input) of every label word after each example's input, (examples, words),
    float32 on the backbone's device; batch_size pairs (examples x words) per forward."""
    per_chunk = max(1, batch_size // len(label_words))
    rows = []
    for chunk in _chunks(examples, per_chunk):
        pairs = [pm.encode_pair(e.input_text, word) for e in chunk for word in label_words]
        rows.append(pm.sequence_nll(prompt, pm.collate(pairs))[0].view(len(chunk), len(label_words)))
    return torch.cat(rows)


@torch.no_grad()
@_in_eval_mode
def generate(
    pm: PromptedModel,
    prompt: torch.Tensor,
    examples: Sequence[Example],
    batch_size: int,
    max_new_tokens: int,
    task_name: str | None = None,
) -> list[str]:
    """Greedy decoding after the prompt, and nothing else: the backbone's generation_config.json is not read
    (its repetition_penalty, no_repeat_ngram_size, min_length, ... had changed the "greedy" output); each
    sequence ends before its first EOS (the pads after it are ordinary tokens where a tokenizer has no pad
    token and the config's pad_token_id names one), special tokens are removed, whitespace stripped, and a
    decoder-only backbone's model.target_prefix, which it learnt to write before each answer, taken off."""
    from transformers import GenerationConfig

    pm.check_generation(task_name)
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pm.pad_id,
        eos_token_id=pm.eos_id,
        decoder_start_token_id=pm.model.config.decoder_start_token_id if pm.model.config.is_encoder_decoder else None,
    )
    prefix = pm.target_prefix.strip()
    texts: list[str] = []
    for chunk in _chunks(examples, batch_size):
        inputs = pm.prompted_inputs(prompt, pm.encode(chunk))
        output = _generate_plain(pm.model, inputs, settings)
        for row in output.tolist():
            if pm.model.config.is_encoder_decoder and row and row[0] == settings.decoder_start_token_id:
                row = row[1:]  # (the decoder's start token, which may be an ordinary token such as pad)
            row = row[: row.index(pm.eos_id)] if pm.eos_id in row else row
            text = pm.tokenizer.decode(row, skip_special_tokens=True).strip()
            texts.append(text[len(prefix) :].strip() if prefix and text.startswith(prefix) else text)
    return texts


def _generate_plain(model: torch.nn.Module, inputs: dict[str, torch.Tensor], settings) -> torch.Tensor:
    """model.generate under `settings` alone: transformers fills what a given GenerationConfig leaves unset
    from model.generation_config (the checkpoint's generation_config.json), so that is set aside meanwhile."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        return model.generate(**inputs, generation_config=settings)
    finally:
        model.generation_config = saved


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
