"""Stages of a run, wired from a RunConfig: source (per method), target (per method), evaluation.

Run folder:
    config.yaml                 the resolved configuration of the last command (its --config file left alone where unchanged)
    source-<method>/            metrics.jsonl, checkpoint-*/, particles.safetensors, source.json
    target-<method>/            metrics.jsonl, checkpoint-*/, prompt.safetensors, eval.json, peft/
    results.json, results.md    final target metrics per method (the side-by-side table)

A stage is finished when its final file is there (particles.safetensors; prompt.safetensors and
eval.json) and its last checkpoint is at the configured number of steps; a stage that trains (further)
removes its final files first, which then come from its last checkpoint alone. Every checkpoint records the
configuration it was trained with: a stage is reused or resumed only under the same configuration, up
to RESUMABLE_CHANGES (checked before anything is written: `check_outputs`). A stage without checkpoints
(0 steps, or copied without them) is taken as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace as dataclass_replace

import functools
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..tasks import get_task
from .aggregate import aggregate
from .checkpoint import CheckpointError, atomic_save_tensors, atomic_write_text, load_latest_checkpoint
from .config import (
    TARGET_METHODS,
    ConfigError,
    ModelConfig,
    RunConfig,
    check_config,
    dump_config,
    load_config,
    model_device,
    particles_of,
    source_methods_for,
    to_dict,
)
from .data import TaskSampler, load_examples, load_task_data, task_batch_sizes
from .evaluate import evaluate_prompt, mean_nll
from .loop import SINGLE_PROCESS, CheckpointHook, LoopSettings, World, run_loop
from .metrics_log import plain, to_json
from .peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft_prompt
from .prompts import (
    DECODER_ONLY,
    ENCODER_DECODER,
    PromptedModel,
    check_label_words,
    check_vocab_top_k,
    embedding_scale,
    full_shape,
    init_prompts,
    target_prefix_of,
)
from .source import ParticleTrainer, ParticleUpdate, likelihood_coefficients, source_layout
from .target import KDEPrior, TargetPrompt, TargetTrainer

CONFIG_FILE = "config.yaml"
PARTICLES_FILE = "particles.safetensors"
PROMPT_FILE = "prompt.safetensors"
EVAL_FILE = "eval.json"
FINAL_FILES = {"source": (PARTICLES_FILE,), "target": (PROMPT_FILE, EVAL_FILE)}
logger = logging.getLogger(__name__)
# Keys that may change between a run and its resumption: they do not change the trajectory (evaluation
# settings, bookkeeping, the device a run continues on), or they only extend it (steps: a finished stage
# resumed with more steps trains on from its last checkpoint; fewer steps than it has is an error).
RESUMABLE_CHANGES = (
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "eval_batch_size",
    "max_new_tokens",
    "max_eval_examples",
    "eval_split",
    "task_modules",
    "progress",
    "device",
    "method",
    "methods",
    "export_peft",
)


def load_backbone(cfg: RunConfig) -> PromptedModel:
    """The frozen model and tokenizer of `cfg.model` (local folder or GGUF file), on its device and dtype."""
    model, tokenizer = load_pretrained(cfg.model, longest_sequence(cfg))
    device = model_device(cfg.model.device)
    model.to(device)
    return prompted_model(model, tokenizer, cfg.model, device)


@dataclass(frozen=True)
class SequenceLengths:
    """What a run's sequences hold at most: the prompt, an input, and the longer of a training target and a
    generated answer (longest_sequence)."""

    prompt: int
    source: int
    target: int

    def over_limit(self, encoder_decoder: bool, limit: int) -> str | None:
        """What passes a model's `limit` positions, in the settings' words, or None. Decoder-only: the whole
        sequence; encoder-decoder: the encoder's prompt and input, the decoder's target."""
        answer = "max(model.max_target_length, target.max_new_tokens)"
        if not encoder_decoder:
            total = self.prompt + self.source + self.target
            return f"prompt.length + model.max_source_length + {answer} = {total}" if total > limit else None
        if self.prompt + self.source > limit:
            return f"prompt.length + model.max_source_length = {self.prompt + self.source} (the encoder's)"
        return f"{answer} = {self.target} (the decoder's)" if self.target > limit else None


def longest_sequence(cfg: RunConfig) -> SequenceLengths:
    return SequenceLengths(
        cfg.prompt.length, cfg.model.max_source_length, max(cfg.model.max_target_length, cfg.target.max_new_tokens)
    )


def load_pretrained(mc: ModelConfig, longest: SequenceLengths | None = None):
    """(model, tokenizer) as `from_pretrained` gives them (under a live DeepSpeed ZeRO-3 config, with the
    weights partitioned as they load: see deepspeed_support). longest: the sequence lengths the run needs
    (longest_sequence), checked against the model's position limit before the weights load (learned position
    embeddings, GPT-2's or BART's, raised an IndexError inside the forward; T5's relative ones have none)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config, tokenizer = config_and_tokenizer(mc)
    check_positions(config, longest, mc.name_or_path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    gguf = {"gguf_file": mc.gguf_file} if mc.gguf_file else {}
    try:
        model = cls.from_pretrained(mc.name_or_path, dtype=getattr(torch, mc.dtype), **gguf)
    except (OSError, ValueError) as error:  # (a folder with a config but no weights, a class without LM head)
        raise _not_loadable("model.name_or_path", mc.name_or_path, cls.__name__, error) from error
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def _config_and_tokenizer(name_or_path: str, gguf_file: str | None, tokenizer_name: str | None, stamp: tuple):
    from transformers import AutoConfig, AutoTokenizer

    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **gguf)
    except (OSError, ValueError) as error:
        raise _not_loadable("model.name_or_path", name_or_path, "a model", error) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or name_or_path, **({} if tokenizer_name else gguf))
    except (OSError, ValueError) as error:
        key = "model.tokenizer" if tokenizer_name else "model.name_or_path"
        raise _not_loadable(key, tokenizer_name or name_or_path, "a tokenizer", error) from error
    return config, tokenizer


# Files one of which a tokenizer folder holds (fast, sentencepiece, BPE and WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "sentencepiece.bpe.model", "source.spm")  # fmt: skip


def _not_loadable(key: str, name: str, what: str, error: Exception) -> ConfigError:
    """A folder (or hub id) that transformers cannot load as `what`, in one line that names the setting and
    the first line of transformers' message (a folder without config.json, a YAML file given as the model, an
    empty tokenizer folder, a hub id without network: each had been a traceback, exit 1, or for the
    tokenizer a message about sentencepiece)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    if reason.endswith(":") and len(lines) > 1:  # (a list follows: one line says there is more)
        reason = reason[:-1] + " ..."
    folder = Path(os.path.expanduser(name))
    if what == "a tokenizer" and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        reason = f"the folder holds no tokenizer files ({reason})"
    return ConfigError(f"{key}: cannot load {name} as {what}: {reason}")


def config_and_tokenizer(mc: ModelConfig):
    """The backbone's transformers config and its tokenizer, read once per process (check_backbone_fits reads
    them before anything is written, load_pretrained again when the weights load: a GGUF file's take seconds)."""
    stamp = tuple(_files_stamp(path) for path in (mc.name_or_path, mc.tokenizer))
    return _config_and_tokenizer(mc.name_or_path, mc.gguf_file or None, mc.tokenizer or None, stamp)


def _files_stamp(path: str | None) -> tuple:
    """The names, sizes and modification times of a local folder's files (a folder written again in place
    is read again); () for a hub name."""
    folder = Path(os.path.expanduser(path)) if path else None
    if folder is None or not folder.is_dir():
        return ()
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))


# What from_pretrained loads weights from, one of which a local backbone folder holds (sharded: an index)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pth")


def check_weights_present(mc: ModelConfig) -> None:
    """ConfigError where model.name_or_path is a local folder without weights (a config and tokenizer alone):
    found before --overwrite removes anything (the load had failed after it). A hub id is left to the load."""
    folder = Path(os.path.expanduser(mc.name_or_path))
    if mc.gguf_file or not folder.is_dir():
        return
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(
            f"model.name_or_path: {mc.name_or_path} holds no weights ({', '.join(WEIGHT_PATTERNS)}; a GGUF file "
            f"goes in model.gguf_file)"
        )


def check_positions(config, longest: SequenceLengths | None, name: str) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    over = longest.over_limit(config.is_encoder_decoder, limit) if longest and isinstance(limit, int) else None
    if over:
        raise ConfigError(f"{over} positions, but {name} takes at most {limit}: shorten them")


def check_backbone_fits(cfg: RunConfig, command: str, pm: PromptedModel | None = None) -> None:
    """What the backbone's config and tokenizer can tell before a stage trains or a file is written: the
    sequence lengths against its position limit, and that model.max_target_length holds the label words of
    every task the command reads (a target task's had been checked only after `transfer` trained its source
    stages, which the fix, a longer max_target_length, then refused to resume). `pm`: a loaded backbone."""
    if pm is not None:
        config, tokenizer, prefix = pm.model.config, pm.tokenizer, pm.target_prefix
    else:
        config, tokenizer = config_and_tokenizer(cfg.model)
        kind = ENCODER_DECODER if config.is_encoder_decoder else DECODER_ONLY
        prefix = target_prefix_of(kind, cfg.model.target_prefix)
    check_positions(config, longest_sequence(cfg), cfg.model.name_or_path)
    check_special_tokens(config, tokenizer, cfg.model)
    if pm is None:
        check_weights_present(cfg.model)
    # (an SVGD source stage draws its M particles at once: they must differ)
    trained = source_methods_for(cfg, command) if command in ("source", "transfer") else []
    particles = particles_of(cfg, "bmtpt") if "bmtpt" in trained else 1
    if command != "eval" and cfg.prompt.init == "vocab" and (cfg.prompt.vocab_top_k or particles > 1):  # (every
        # stage starts from initial prompts, a source's or prompt_tuning's: checked before --overwrite removes
        # anything)
        rows = full_shape(pm.embedding.weight)[0] if pm is not None else _vocab_rows(config)
        vocab = min(len(tokenizer), rows) if rows else len(tokenizer)
        check_vocab_top_k(vocab, cfg.prompt.vocab_top_k, tokenizer.all_special_ids, particles, cfg.prompt.length,
                          cfg.seed)  # fmt: skip
    names = []
    if command in ("source", "transfer") and source_methods_for(cfg, command):
        names += cfg.data.source_tasks
    if command != "source":
        names.append(cfg.data.target_task)
    tasks = [(name, get_task(name).label_words) for name in names]
    check_label_words(tokenizer, prefix, cfg.model.max_target_length, tasks)


def _vocab_rows(config) -> int | None:
    """The input embedding's rows as the backbone's config gives them (None: it does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    return rows if isinstance(rows, int) and rows > 0 else None


def check_special_tokens(config, tokenizer, mc: ModelConfig) -> None:
    """The tokens PromptedModel needs, from the backbone's config and tokenizer, before anything is written
    (they had been a ValueError's traceback once the weights loaded, after --overwrite removed the stages)."""
    name = mc.tokenizer or mc.name_or_path
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {name} has no EOS token; targets need one to end")
    if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
        raise ConfigError(f"{mc.name_or_path}: the encoder-decoder config has no decoder_start_token_id")


def prompted_model(model, tokenizer, mc: ModelConfig, device: torch.device) -> PromptedModel:
    return PromptedModel(
        model,
        tokenizer,
        max_source_length=mc.max_source_length,
        max_target_length=mc.max_target_length,
        target_prefix=mc.target_prefix,
        train_mode=mc.train_mode,
        device=device,
    )


def given_config_file(cfg: RunConfig, config_file: str | Path | None) -> bool:
    """Whether <output_dir>/config.yaml, which a command writes, is `config_file`, the --config file it was
    given, holding this configuration: then it is not written (a run had rewritten the user's file, its
    comments gone, where nothing changed). Where the overrides change the configuration it is rewritten, the
    run's record of its last command (`--config RUN/config.yaml --resume target.steps=2000` continues a run),
    with a warning that names it."""
    if config_file is None:
        return False
    written = Path(cfg.output_dir) / CONFIG_FILE
    try:
        if not os.path.samefile(config_file, written):
            return False
    except OSError:  # (one of them does not exist)
        return False
    try:
        differences = _differences(to_dict(load_config(config_file)), to_dict(cfg))
    except ConfigError as error:  # (the file alone does not load: the overrides mended it)
        differences = [str(error)]
    if not differences:
        return True
    logger.warning(
        "%s, the --config file, is rewritten with this command's configuration (%s), as the run's record; its "
        "comments and layout are not kept (keep a config file outside output_dir to keep them)",
        written, ", ".join(differences),
    )  # fmt: skip
    return False


class Run:
    """One run folder: validates up front, loads the backbone once, runs stages on demand.

    With several processes (`world`, see deepspeed_support.DeepSpeedRun) every process runs the same
    stages in step; only `world.is_main` writes files.
    """

    def __init__(
        self,
        cfg: RunConfig,
        command: str,
        *,
        resume: bool = False,
        overwrite: bool = False,
        pm: PromptedModel | None = None,
        world: World = SINGLE_PROCESS,
        config_file: str | Path | None = None,
        prompt_path: str | None = None,
    ):
        """config_file: the --config file the command was given (write_config leaves it alone where it is
        <output_dir>/config.yaml: given_config_file). prompt_path: `eval --prompt`'s file (the command then
        reads no source stage, so it needs no data.source_tasks)."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        check_config(cfg, command, prompt_path=prompt_path)
        check_backbone_fits(cfg, command, pm)
        self.cfg = cfg
        self.command = command
        self.resume = resume
        self.world = world
        self.dir = Path(cfg.output_dir)
        world.check_shared_folder(self.dir)
        check_outputs(self, command, overwrite)
        self._config_file_given = command != "eval" and given_config_file(cfg, config_file)
        world.barrier()  # every process has looked at the folder before any writes to it
        # `source` keeps the table of the last target / transfer / eval, less the rows gone stale: those rows
        # as they are now, pruned again when it finishes (rewrite_results)
        self._results_before = _read_results(self.dir) if command == "source" and world.is_main else None
        self._pm = pm
        if overwrite and world.is_main:
            for stage in stages_of(cfg, command):
                shutil.rmtree(self.dir / stage, ignore_errors=True)
            if command == "source":  # (targets trained from the removed particles: their rows are stale)
                self.rewrite_results()
            else:
                # the table may hold rows of what was just removed: `target` / `transfer` write it again when
                # they finish (a run that fails after the removal leaves no row of a removed method)
                for name in RESULTS_FILES:
                    (self.dir / name).unlink(missing_ok=True)
        world.barrier()

    @property
    def pm(self) -> PromptedModel:
        if self._pm is None:
            self._pm = self._load_backbone()
        return self._pm

    def _load_backbone(self) -> PromptedModel:
        return load_backbone(self.cfg)

    def source_dir(self, method: str) -> Path:
        return self.dir / f"source-{method}"

    def target_dir(self, method: str) -> Path:
        return self.dir / f"target-{method}"

    def write_config(self) -> None:
        """<output_dir>/config.yaml: the resolved configuration, unless that file is the --config file given,
        holding this configuration (given_config_file): then it stays as it is, comments included."""
        if self.world.is_main and not self._config_file_given:
            self.dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.dir / CONFIG_FILE)
        self.world.barrier()

    # -- source ---------------------------------------------------------------------------------------

    def source(self, method: str, on_checkpoint: Sequence[CheckpointHook] = ()) -> torch.Tensor:
        """Train (or, when finished earlier, load) the particles of a source method: (M, L, hidden)."""
        stage_dir = self.source_dir(method)
        if self.finished("source", method):
            return load_particles(stage_dir)
        trainer, summary = self.source_trainer(method)
        self._train(stage_dir, trainer, self.cfg.source, "source", method, on_checkpoint)
        particles = trainer.particles.detach()
        if self.world.is_main:
            summary = {**summary, "shape": list(particles.shape)}
            atomic_write_text(stage_dir / "source.json", json.dumps(summary, indent=1))
            atomic_save_tensors(stage_dir / PARTICLES_FILE, {"particles": particles.float()}, {"method": method})
        self.world.barrier()
        return particles

    def source_trainer(self, method: str) -> tuple[ParticleTrainer, dict[str, Any]]:
        cfg, sc, pm = self.cfg, self.cfg.source, self.pm
        tasks = [self._train_data(name) for name in cfg.data.source_tasks]
        layout = source_layout(method, len(tasks), sc.num_particles)
        particles = self.initial_prompts(layout.num_particles, distinct=layout.rule == "svgd").to(pm.device)
        sizes = [len(t) for t in tasks]
        batch_sizes = task_batch_sizes(sizes, sc.batch_size, "uniform" if method == "spot" else sc.sampling)
        coefficients = likelihood_coefficients(batch_sizes, sizes, sc.likelihood_scale, layout)
        update = ParticleUpdate(particles, layout.rule, sc.optimizer, sc.lr, sc.bandwidth, sc.backend)
        sampler = TaskSampler(sizes, batch_sizes, seed=cfg.seed + 1)
        trainer = ParticleTrainer(
            pm, particles, tasks, layout, sampler, update, coefficients, sc.prior_std, sc.bandwidth
        )
        summary = {
            "method": method,
            "tasks": cfg.data.source_tasks,
            "task_sizes": sizes,
            "batch_sizes": batch_sizes,
            "likelihood_coefficients": coefficients,
            "rule": layout.rule,
            "steps": sc.steps,
        }
        return trainer, summary

    def initial_prompts(self, count: int, distinct: bool = True) -> torch.Tensor:
        """`count` prompts of the prompt.init; distinct: the vocab init's must differ (init_prompts)."""
        p, pm = self.cfg.prompt, self.pm
        return init_prompts(
            pm.embedding.weight,
            count,
            p.length,
            method=p.init,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            init_std=p.init_std,
            vocab_top_k=p.vocab_top_k,
            exclude_ids=pm.tokenizer.all_special_ids,
            vocab_size=len(pm.tokenizer),
            scale=embedding_scale(pm.embedding),
            distinct=distinct,
        )

    # -- target ---------------------------------------------------------------------------------------

    def target(self, method: str, on_checkpoint: Sequence[CheckpointHook] = ()) -> dict[str, float]:
        """Adapt a target prompt initialised by `method`; returns its final evaluation."""
        stage_dir = self.target_dir(method)
        if self.finished("target", method):
            if self.cfg.target.export_peft:  # (turned on since it trained: export_peft is a resumable change)
                if self.world.is_main and not _adapter_holds(stage_dir / "peft", stage_dir / PROMPT_FILE):
                    logger.info("target %s: finished; exporting its prompt as a PEFT adapter", method)
                    self.export_peft(read_prompt(stage_dir / PROMPT_FILE), stage_dir / "peft")
                self.world.barrier()
            stored = _read_json(stage_dir / EVAL_FILE)
            if isinstance(stored, dict) and stored.get("eval_settings") == self.eval_settings():
                return stored
            # Trained, but evaluated under other settings (or eval.json is unreadable): evaluate it again.
            logger.info("target %s: finished; evaluating its prompt under the current evaluation settings", method)
            evaluate = self.evaluator(get_task(self.cfg.data.target_task), self.cfg.data.eval_split)
            return self._write_eval(stage_dir, method, evaluate(read_prompt(stage_dir / PROMPT_FILE)))
        trainer = self.target_trainer(method)
        self._train(stage_dir, trainer, self.cfg.target, "target", method, on_checkpoint)
        final = trainer.current_prompt()
        if self.world.is_main:
            atomic_save_tensors(stage_dir / PROMPT_FILE, {"prompt": final}, {"method": method})
            if self.cfg.target.export_peft:
                self.export_peft(final, stage_dir / "peft")
            elif (stage_dir / "peft").exists():  # (a finished target's, trained further since: not this prompt)
                logger.info("target %s: removing its PEFT adapter of an earlier prompt (target.export_peft is off)", method)
                shutil.rmtree(stage_dir / "peft")
        return self._write_eval(stage_dir, method, trainer.final_evaluation(final))

    def eval_settings(self) -> dict[str, Any]:
        """What a target's final evaluation depends on besides its prompt: the settings eval.json records, and
        under which alone a finished target's eval.json is reused (others may change across a resume)."""
        data = self.cfg.data
        return {
            "split": data.eval_split,
            "max_eval_examples": data.max_eval_examples,
            "max_new_tokens": self.cfg.target.max_new_tokens,
        }

    def _write_eval(self, stage_dir: Path, method: str, evaluation: dict[str, Any]) -> dict[str, Any]:
        # JSON has no NaN or Inf: a non-finite metric is null in eval.json, and None here.
        # (the target task too: a run folder of another target task has the same method folders; eval.json files
        # written before it was recorded have no "task" and are read as they are)
        data = self.cfg.data
        metrics = plain(
            {"method": method, "task": data.target_task, "split": data.eval_split, **evaluation,
             "eval_settings": self.eval_settings()}
        )  # fmt: skip
        if self.world.is_main:
            _warn_if_not_finite(f"target {method}", metrics)
            atomic_write_text(stage_dir / EVAL_FILE, to_json(metrics, indent=1))
        self.world.barrier()
        return metrics

    def target_trainer(self, method: str) -> TargetTrainer:
        cfg, tc, pm = self.cfg, self.cfg.target, self.pm
        train = self._train_data(cfg.data.target_task)
        source_method, how = TARGET_METHODS[method]
        particles = self.source(source_method).to(pm.device) if source_method else None
        init = self.initial_target(particles, how, train.examples)
        prompt = TargetPrompt(init.to(pm.device), tc.prompt_type, tc.rank, torch.Generator().manual_seed(cfg.seed + 2))
        kde = None
        if particles is not None and tc.kde_weight > 0:
            kde = KDEPrior(particles, tc.kde_bandwidth, cfg.source.backend)
        sampler = TaskSampler([len(train)], [tc.batch_size], seed=cfg.seed + 3)
        evaluate = self.evaluator(train.task, cfg.data.eval_split)
        return TargetTrainer(
            pm, prompt, train, sampler, tc.optimizer, tc.lr, tc.lowrank_lr, kde, tc.kde_weight, evaluate, tc.eval_every
        )

    def evaluator(self, task, split: str, examples=None):
        """prompt -> {"examples": n, "loss": ..., **task metrics} on `split` of `task` (its examples, if
        loaded already)."""
        cfg, tc, pm = self.cfg, self.cfg.target, self.pm
        if not task.is_classification:  # (before training: a backbone that cannot generate had failed after it)
            pm.check_generation(task.name)
        if examples is None:
            examples = load_examples(task, split, cfg.data.data_dir, limit=cfg.data.max_eval_examples)

        def evaluate(prompt: torch.Tensor) -> dict[str, float]:
            metrics = evaluate_prompt(
                pm,
                prompt.to(pm.device),
                task,
                examples,
                batch_size=tc.eval_batch_size,
                max_new_tokens=tc.max_new_tokens,
            )
            return {"examples": len(examples), **metrics}

        return evaluate

    def _train_data(self, task_name: str):
        data = self.cfg.data
        return load_task_data(self.pm, get_task(task_name), "train", data.data_dir, data.max_train_examples)

    def _remove_final_files(self, stage_dir: Path, stage: str) -> None:
        """Before a stage trains (its checkpoint restored, steps left: run_loop's before_training): its final
        files, where there are any, are an earlier state's (a finished stage continued with more steps), which
        this run replaces once its last checkpoint is saved. Left in place, a continuation killed between that
        checkpoint and their rewriting had left the stage looking finished with the earlier particles or prompt
        (or the new prompt with the earlier eval.json), taken as they were by every later command; a target's
        peft/ adapter of the earlier prompt had stayed beside no prompt at all. (Removed
        only once the restore succeeded: a resume refused there, e.g. for changed data, keeps them.)"""
        if self.world.is_main:
            for name in (*FINAL_FILES[stage], *(["source.json"] if stage == "source" else [])):
                (stage_dir / name).unlink(missing_ok=True)
            if stage == "target" and (stage_dir / "peft").exists():  # (the earlier prompt's adapter, too)
                shutil.rmtree(stage_dir / "peft")
        self.world.barrier()

    def _train(self, stage_dir: Path, trainer, stage_cfg, stage: str, method: str, on_checkpoint) -> None:
        settings = LoopSettings(
            stage_cfg.steps,
            stage_cfg.log_every,
            stage_cfg.checkpoint_every,
            stage_cfg.keep_checkpoints,
            self.cfg.progress,
            f"{stage} {method}",
        )
        config = to_dict(self.cfg)
        meta = {"stage": stage, "method": method, "config": config, "places": local_places(config)}
        source_method = TARGET_METHODS[method][0] if stage == "target" else None
        if source_method:  # (the particles it starts from: a source trained again makes it stale)
            meta["source_particles"] = particles_digest(self.source_dir(source_method))
        # torch's global generator (dropout under model.train_mode) from the run's seed, apart per process (a
        # resumed stage restores its checkpoint's states instead): the same run twice trains the same; it was
        # never seeded, so dropout followed whatever the process had drawn before
        torch.manual_seed(self.cfg.seed + getattr(self.world, "rank", 0))
        if self.resume:
            self.check_stage(stage, method)  # again here for callers of Run that skip check_outputs (the demo)
        run_loop(stage_dir, trainer, settings, meta, resume=self.resume, on_checkpoint=on_checkpoint, world=self.world,
                 before_training=lambda: self._remove_final_files(stage_dir, stage))  # fmt: skip

    def initial_target(self, particles: torch.Tensor | None, how: str, train_examples) -> torch.Tensor:
        if particles is None:
            return self.initial_prompts(1)[0]
        loss = None
        if how == "best":
            chosen = train_examples[: self.cfg.target.selection_examples]
            loss = mean_nll(self.pm, particles.to(self.pm.device), chosen, self.cfg.target.eval_batch_size)
        return aggregate(particles, how, index=self.cfg.target.particle_index, target_loss=loss)

    def export_peft(self, prompt: torch.Tensor, out_dir: Path) -> Path:
        # (the backbone's config: a finished target's export loads no weights for it)
        config = self._pm.model.config if self._pm is not None else config_and_tokenizer(self.cfg.model)[0]
        # (Marian, Pegasus, BlenderbotSmall, MVP: PeftModel had given label NLLs up to 1.0 apart, silently.) The
        # scale found at the backbone's first forward where there was one; else the config's flag makes it
        # "may" (finding it takes forwards, which under ZeRO-3 every process must run, and this is the first's)
        known = self._pm.known_input_scale if self._pm is not None else None
        scaled = known != 1.0 if known is not None else bool(getattr(config, "scale_embedding", 0))
        if scaled:
            logger.warning(
                "target.export_peft: this backbone scales its input embeddings only when given input_ids "
                "(scale_embedding); PEFT feeds the prompt and the inputs' embeddings unscaled, so the adapter in %s "
                "%s reproduce the trainer's results in PeftModel (bmt-fast eval --prompt reads it as the trainer does)",
                out_dir,
                "does not" if known is not None else "may not",
            )
        return export_peft_prompt(
            prompt,
            out_dir,
            base_model_name_or_path=peft_base_name(self.cfg.model.name_or_path),
            is_encoder_decoder=config.is_encoder_decoder,
            num_layers=getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None),
            num_attention_heads=getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None),
        )

    # -- evaluation -----------------------------------------------------------------------------------

    def evaluate(self, prompt_path: str | None = None, split: str | None = None) -> dict[str, dict[str, Any]]:
        """Metrics of each target method's prompt (or of the prompt file given) on the evaluation split.

        Without `prompt_path`, results.json / results.md are replaced by these results (on `split`)."""
        split = split or self.cfg.data.eval_split
        task = get_task(self.cfg.data.target_task)
        try:  # before the prompts are read and the model is loaded: the split, its rows and their labels
            task.check_split(split, self.cfg.data.data_dir)
            examples = load_examples(task, split, self.cfg.data.data_dir, limit=self.cfg.data.max_eval_examples)
        except (ValueError, OSError) as error:
            raise ConfigError(f"--split {split}: {error}") from error
        if not prompt_path:  # the run's prompts, trained under this configuration (a backbone, prompt length,
            for method in self.cfg.target.methods:  # ... of another run took them silently)
                self.check_stage("target", method, as_input=True)
        prompts = (
            {Path(prompt_path).name: read_prompt(prompt_path)}
            if prompt_path
            else {m: read_prompt(self.target_dir(m) / PROMPT_FILE) for m in self.cfg.target.methods}
        )
        for name, prompt in prompts.items():
            if prompt.dim() != 2 or prompt.shape[1] != self.pm.hidden_size:
                raise ConfigError(
                    f"prompt {name}: shape {tuple(prompt.shape)}, but {self.cfg.model.name_or_path} takes "
                    f"(L, {self.pm.hidden_size}) prompts"
                )
            try:  # its own length, not prompt.length: a longer file had raised an IndexError in the forward
                lengths = dataclass_replace(longest_sequence(self.cfg), prompt=prompt.shape[0])
                check_positions(self.pm.model.config, lengths, self.cfg.model.name_or_path)
            except ConfigError as error:
                raise ConfigError(f"prompt {name} of {prompt.shape[0]} rows (as prompt.length): {error}") from None
        evaluate = self.evaluator(task, split, examples)
        settings = {**self.eval_settings(), "split": split}  # (the rows' keys as target's eval.json has them)
        results = {
            name: plain(
                {"method": name, "task": task.name, "split": split, **evaluate(prompt), "eval_settings": settings}
            )
            for name, prompt in prompts.items()
        }
        if not prompt_path and self.world.is_main:
            write_results(self.dir, results)
        self.world.barrier()
        return results

    def rewrite_results(self) -> None:
        """`source`, after it removed its stage (--overwrite) and when it finishes: the table as the command
        found it, less the rows gone stale (row_problem); no row left, no table. A command that trains no
        target judges each row by what that target's own checkpoint records, not by its own target settings
        (it had removed the table for data.target_task=null, and left out every row whose target section or
        steps differed from its own: settings the source stage never reads)."""
        before = self._results_before
        if self.command != "source" or not self.world.is_main or before is None:
            return
        kept = {}
        for method, row in before.items():
            problem = self.row_problem(method)
            if problem:
                logger.info("results: leaving out %s: %s", method, problem)
            else:
                kept[method] = row
        if kept == _read_results(self.dir):
            return
        if kept:
            write_results(self.dir, kept)
        else:
            for name in RESULTS_FILES:
                (self.dir / name).unlink(missing_ok=True)

    def row_problem(self, method: str) -> str | None:
        """Why the table's row of target `method` is stale for a command that trains no target (None: it is
        not): the target is no finished stage by its own record (final files, the steps its checkpoint was
        trained for), or its inputs changed since it trained: the source particles it started from (the digest
        its checkpoint recorded), or the backbone and data settings (model.*, data.data_dir,
        data.max_train_examples; folders as their real paths). Its own settings (the target section, the
        target task, the seed, the prompt init) are its record, whatever this command's configuration says."""
        if method not in TARGET_METHODS:
            return "no target method"
        stage_dir = self.target_dir(method)
        if not all((stage_dir / name).exists() for name in FINAL_FILES["target"]):
            return f"{stage_dir} holds no finished prompt"
        try:
            checkpoint = load_latest_checkpoint(stage_dir, tensors=False)
        except CheckpointError as error:
            return str(error)
        if checkpoint is None:  # (a stage without checkpoints is taken as it is)
            return None
        recorded = checkpoint.meta.get("config") or {}
        steps = (recorded.get("target") or {}).get("steps")
        if steps is not None and checkpoint.step != steps:
            return f"it is unfinished (step {checkpoint.step} of {steps})"
        source_method = TARGET_METHODS[method][0]
        started_from = checkpoint.meta.get("source_particles")
        if source_method and started_from is not None:
            now = particles_digest(self.source_dir(source_method))
            if now != started_from:
                particles = self.source_dir(source_method) / PARTICLES_FILE
                return f"{particles} is gone" if now is None else f"{particles} changed since it trained"
        places = checkpoint.meta.get("places")
        config = to_dict(self.cfg)
        saved = _input_settings(recorded, method, places)
        current = _input_settings(config, method, None if places is None else local_places(config))
        if saved != current:
            return f"its backbone or data changed ({', '.join(_differences(saved, current))})"
        return None

    def with_other_methods(self, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """`results` followed by the eval.json of every other target method finished in the run folder under
        this configuration (checkpoints trained with the same settings) on the same split: the table of
        `target` / `transfer` covers the whole run folder, not only the methods of the last command."""
        out = dict(results)
        for folder in sorted(self.dir.glob("target-*")):
            method = folder.name[len("target-") :]
            if method in out or method not in TARGET_METHODS or not self.finished("target", method):
                continue
            problem = self.stage_mismatch("target", method, as_input=True)
            if problem:
                logger.info("results: leaving out %s: %s", folder.name, problem[0])
                continue
            row = _read_json(folder / EVAL_FILE)
            if not isinstance(row, dict):
                logger.warning("results: leaving out %s: %s is not a JSON object", folder.name, EVAL_FILE)
            elif row.get("eval_settings") != self.eval_settings():
                logger.info("results: leaving out %s: evaluated under other evaluation settings", folder.name)
            else:
                out[method] = row
        return out

    # -- resume bookkeeping ---------------------------------------------------------------------------

    def finished(self, stage: str, method: str) -> bool:
        """Whether the stage's final files are there and its last checkpoint (if any) is at `steps`."""
        stage_dir = self.dir / f"{stage}-{method}"
        if not all((stage_dir / name).exists() for name in FINAL_FILES[stage]):
            return False
        checkpoint = load_latest_checkpoint(stage_dir, tensors=False)
        return checkpoint is None or checkpoint.step == getattr(self.cfg, stage).steps

    def check_stage(self, stage: str, method: str, *, as_input: bool = False) -> None:
        """ConfigError unless the stage's last checkpoint was trained under this run's configuration (up to
        RESUMABLE_CHANGES) and is at most at `steps`. as_input: the stage is used as it is (the source
        stages of `target`), so it must also be finished at exactly `steps`."""
        problem = self.stage_mismatch(stage, method, as_input=as_input)
        if problem:
            reason, hint = problem
            verb = "use" if as_input else "resume"
            raise ConfigError(f"cannot {verb} {self.dir / f'{stage}-{method}'}: {reason}; {hint}")

    def stage_mismatch(self, stage: str, method: str, *, as_input: bool = False) -> tuple[str, str] | None:
        """(what is wrong, what to do) when `check_stage` would refuse the stage; None when it accepts it."""
        stage_dir = self.dir / f"{stage}-{method}"
        try:
            checkpoint = load_latest_checkpoint(stage_dir, tensors=False)
        except CheckpointError as error:
            return str(error), "pass --overwrite to train it again"
        if checkpoint is None:
            return None
        steps = getattr(self.cfg, stage).steps
        # Folders compared as their real paths at training time and now (checkpoints without them: as written)
        places = checkpoint.meta.get("places")
        config = to_dict(self.cfg)
        saved = _trajectory_config(checkpoint.meta.get("config", {}), stage, method, with_steps=as_input, places=places)
        now = None if places is None else local_places(config)
        current = _trajectory_config(config, stage, method, with_steps=as_input, places=now)
        again = "pass --overwrite to train it again"
        if as_input:
            again = f"train it again with `bmt-fast {stage} --overwrite`"
        if saved != current:
            changes = ", ".join(_differences(saved, current))
            return f"the configuration changed ({changes})", f"use the configuration it was trained with, or {again}"
        source_method = TARGET_METHODS.get(method, (None,))[0] if stage == "target" else None
        started_from = checkpoint.meta.get("source_particles")
        if source_method and started_from is not None:
            if particles_digest(self.source_dir(source_method)) != started_from:
                particles = self.source_dir(source_method) / PARTICLES_FILE
                return f"{particles} changed since it trained (its source stage was trained again)", again
        if checkpoint.step > steps:
            return f"it has trained {checkpoint.step} steps, more than {stage}.steps={steps}", again
        if as_input and checkpoint.step < steps:
            return f"it is unfinished (step {checkpoint.step} of {steps})", f"run `bmt-fast {stage} --resume` first"
        return None


def stages_of(cfg: RunConfig, command: str) -> list[str]:
    return [f"{stage}-{method}" for stage, method in _stages(cfg, command)]


def _stages(cfg: RunConfig, command: str) -> list[tuple[str, str]]:
    """(stage, method) of every stage `command` runs."""
    stages = [("source", m) for m in source_methods_for(cfg, command)] if command in ("source", "transfer") else []
    if command in ("target", "transfer"):
        stages += [("target", m) for m in cfg.target.methods]
    return stages


def check_outputs(run: Run, command: str, overwrite: bool) -> None:
    """Refuse to silently reuse or clobber results: the inputs from earlier stages must exist and match the
    configuration; with --resume, so must the command's own stages (finished or not); without it, their
    folders must be empty."""
    if command == "target":
        for method in source_methods_for(run.cfg, "target"):
            if not (run.source_dir(method) / PARTICLES_FILE).exists():
                raise ConfigError(
                    f"target needs the {method} source particles: {run.source_dir(method) / PARTICLES_FILE} "
                    f"is missing (run `bmt-fast source` with source.method={method}, or `bmt-fast transfer`)"
                )
            run.check_stage("source", method, as_input=True)
    if command == "eval" or overwrite:
        return
    for stage, method in _stages(run.cfg, command):
        folder = run.dir / f"{stage}-{method}"
        if run.resume:
            run.check_stage(stage, method)
        elif folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"{folder} already has results: pass --resume to continue it, or --overwrite")


def peft_base_name(name_or_path: str) -> str:
    """model.name_or_path as an exported adapter records it (base_model_name_or_path, which
    AutoPeftModel*.from_pretrained loads): a local folder as its real path, so that the adapter loads from
    any directory (a relative path had named a folder relative to the training run's directory only); a hub
    id as it is."""
    folder = os.path.expanduser(name_or_path)
    return os.path.realpath(folder) if os.path.isdir(folder) else name_or_path


def load_particles(stage_dir: str | Path) -> torch.Tensor:
    """A finished source stage's (M, L, hidden) particles; ConfigError naming the file where it is damaged (a
    full disk's cut-short file had been a traceback of safetensors' that named no file)."""
    path = Path(stage_dir) / PARTICLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no particles at {path}")
    try:
        particles = load_file(str(path)).get("particles")
    except (OSError, SafetensorError) as error:
        particles, problem = None, f"is not a safetensors file ({error})"
    else:
        problem = "holds no (M, L, hidden) tensor 'particles'"
    if particles is None or particles.dim() != 3:
        raise ConfigError(
            f"{path} {problem}: remove it, and `bmt-fast source --resume` with the run's configuration writes it "
            f"again from the stage's last checkpoint"
        )
    return particles


def read_prompt(path: str | Path) -> torch.Tensor:
    """An (L, hidden) prompt from our prompt.safetensors or a PEFT prompt-tuning adapter folder.

    An adapter folder's adapter_config.json, where there is one, must be PEFT's PROMPT_TUNING; its
    `prompt_embeddings` hold num_virtual_tokens rows per transformer submodule, and PEFT puts the first
    num_virtual_tokens on the input (of the encoder, for encoder-decoder models), as here: an adapter saved
    with PEFT's seq2seq default (2 submodules, 2L rows) gives those L rows, not a 2L-token prompt.
    FileNotFoundError when there is none; ConfigError naming the file when it is not such a prompt."""
    path = Path(path)
    adapter = None
    if path.is_dir():
        adapter = _read_adapter_config(path / ADAPTER_CONFIG)
        path = path / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no prompt at {path}")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise ConfigError(f"{path} is not a safetensors file: {error}") from error
    for key in ("prompt", "prompt_embeddings"):
        if key in tensors:
            prompt = tensors[key]
            if prompt.dim() != 2:
                raise ConfigError(f"{path}: {key!r} has shape {tuple(prompt.shape)}, not (L, hidden)")
            if adapter is not None:
                length, parts = adapter
                if prompt.shape[0] != length * parts:
                    raise ConfigError(
                        f"{path}: {key!r} has {prompt.shape[0]} rows, not num_virtual_tokens ({length}) x "
                        f"num_transformer_submodules ({parts}) as its adapter_config.json says"
                    )
                prompt = prompt[:length]
            return prompt.float()
    raise ConfigError(f"{path} holds neither 'prompt' nor 'prompt_embeddings' (keys: {sorted(tensors)})")


def _has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def _adapter_holds(folder: Path, prompt_file: Path) -> bool:
    """Whether `folder` is a PEFT adapter of the prompt in prompt_file (one exported before the target was
    trained further had been kept as current)."""
    if not _has_adapter(folder):
        return False
    try:
        return torch.equal(read_prompt(folder), read_prompt(prompt_file))
    except (ConfigError, OSError, ValueError):  # (an unreadable adapter is exported again)
        return False


def _read_adapter_config(path: Path) -> tuple[int, int] | None:
    """(num_virtual_tokens, num_transformer_submodules) of a PEFT prompt-tuning adapter_config.json, or None
    where the folder has none; ConfigError for another PEFT method (prefix tuning, P-tuning, LoRA, ...)."""
    if not path.is_file():
        return None
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ConfigError(
            f"{path}: peft_type {config.get('peft_type')!r} is not a prompt-tuning adapter (PROMPT_TUNING); "
            f"its weights are not a soft prompt"
        )
    length, parts = config.get("num_virtual_tokens"), config.get("num_transformer_submodules") or 1
    if not isinstance(length, int) or length < 1 or not isinstance(parts, int) or parts < 1:
        raise ConfigError(
            f"{path}: num_virtual_tokens {length!r} and num_transformer_submodules {parts!r} must be positive integers"
        )
    return length, parts


def _read_json(path: Path) -> Any:
    """The JSON value in `path`, or None when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


RESULTS_FILES = ("results.json", "results.md")


def _read_results(run_dir: Path) -> dict[str, Any] | None:
    """The table of results.json (None: there is none, or it is no JSON object)."""
    path = run_dir / RESULTS_FILES[0]
    if not path.is_file():
        return None
    table = _read_json(path)
    if not isinstance(table, dict):
        logger.warning("results: %s is not a JSON object; left as it is", path)
        return None
    return table


def write_results(run_dir: Path, results: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(run_dir / RESULTS_FILES[0], to_json(results, indent=1))
    atomic_write_text(run_dir / RESULTS_FILES[1], results_table(results))


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per method, one column per metric (n/a: not finite, null in the JSON)."""
    metrics = sorted(
        {k for r in results.values() for k, v in r.items() if isinstance(v, float) or (v is None and k != "method")}
    )
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, row in results.items():
        cells = [_cell(row, m) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], metric: str) -> str:
    if metric not in row:
        return ""
    value = row[metric]
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _trajectory_config(
    config: dict[str, Any],
    stage: str,
    method: str | None = None,
    with_steps: bool = False,
    places: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The configuration that determines a stage's trajectory (what must not change across a resume):
    all but RESUMABLE_CHANGES and the settings the stage does not read (a source stage: the target section
    and data.target_task; a target stage without a source stage: the source section and
    data.source_tasks; and the settings its method does not read: _drop_unread_settings). A target stage
    starts from the particles of its source stage: source.steps counts. with_steps: the stage's own steps
    count too. places: the folder settings' real paths (local_places) in place of their values as written."""
    drop = set(RESUMABLE_CHANGES) | {"output_dir"}
    out = {
        section: ({k: v for k, v in values.items() if k not in drop} if isinstance(values, dict) else values)
        for section, values in config.items()
        if section not in drop
    }
    data = out.get("data", {})
    if stage == "source":
        out.pop("target", None)
        data.pop("target_task", None)
    elif method in TARGET_METHODS and TARGET_METHODS[method][0] is None:
        out.pop("source", None)
        data.pop("source_tasks", None)
    elif isinstance(out.get("source"), dict):
        out["source"]["steps"] = config["source"].get("steps")
    if with_steps and isinstance(out.get(stage), dict):
        out[stage]["steps"] = config[stage].get("steps")
    _drop_unread_settings(out, stage, method)
    for (section, key), _ in _place_settings(out):
        if f"{section}.{key}" in (places or {}):
            out[section][key] = places[f"{section}.{key}"]
    return out


def _input_settings(config: dict[str, Any], method: str, places: dict[str, str] | None) -> dict[str, Any]:
    """What a target stage reads besides its own settings and its source particles: the backbone (the model
    section) and the data (data.data_dir, data.max_train_examples), as they count for a resume."""
    trajectory = _trajectory_config(config, "target", method, places=places)
    data = trajectory.get("data")
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in ("source_tasks", "target_task")}
    return {"model": trajectory.get("model"), "data": data}


PLACE_SETTINGS = (("data", "data_dir"), ("model", "name_or_path"), ("model", "tokenizer"))


def _place_settings(config: dict[str, Any]):
    """((section, key), value) of the folder settings that config gives as strings."""
    for section, key in PLACE_SETTINGS:
        values = config.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            yield (section, key), values[key]


def local_places(config: dict[str, Any]) -> dict[str, str]:
    """{"data.data_dir": real path, ...} of the folder settings that exist here, as a stage's checkpoints
    record them when it trains: `data/full`, `./data/full` and its absolute path are one folder (they had been
    three configurations), while the same relative path from another directory, or a link pointed elsewhere
    since, is another (the real path is the one at training time, not re-resolved later)."""
    places = {}
    for (section, key), value in _place_settings(config):
        expanded = os.path.expanduser(value)
        if os.path.exists(expanded):
            places[f"{section}.{key}"] = os.path.realpath(expanded)
    return places


def particles_digest(stage_dir: Path) -> str | None:
    """SHA-256 of a source stage's particles file (None: there is none), which the target stages trained from
    it record; computed once per file version."""
    path = Path(stage_dir) / PARTICLES_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Source settings a method does not read: SPoT trains one prompt per task by gradient steps from uniform
# batches, multitask one prompt (source.bandwidth is SVGD's; in their diagnostics only a logged number).
UNREAD_SOURCE_SETTINGS = {
    "spot": ("num_particles", "sampling", "bandwidth"),
    "multitask": ("num_particles", "bandwidth"),
}
# ... and in their source stage source.backend (SVGD's op; a target's KDE prior over their prompts reads it)
GRADIENT_SOURCES = ("spot", "multitask")


def _drop_unread_settings(out: dict[str, Any], stage: str, method: str | None) -> None:
    """Settings of the config's own sections that this stage's method never reads (a change of them had
    refused to reuse a stage that did not depend on them: a spot source for another source.num_particles, a
    prompt_tuning target for another target.kde_weight, a bmtpt row of the table for another
    target.particle_index)."""
    source_method = method if stage == "source" else TARGET_METHODS.get(method or "", (None,))[0]
    prompt = out.get("prompt")
    if isinstance(prompt, dict) and prompt.get("init") in ("vocab", "normal"):  # (each init reads its own)
        prompt.pop("init_std" if prompt["init"] == "vocab" else "vocab_top_k", None)
    source = out.get("source")
    if isinstance(source, dict):
        for key in UNREAD_SOURCE_SETTINGS.get(source_method or "", ()):
            source.pop(key, None)
        if stage == "source" and source_method in GRADIENT_SOURCES:
            source.pop("backend", None)
        if source_method == "spot" and source.get("likelihood_scale") in ("batch", 1, 1.0):
            # (a particle's only task has c = 1 under "mean", "batch" and 1.0 alike: likelihood_coefficients)
            source["likelihood_scale"] = "mean"
    target = out.get("target")
    if stage != "target" or not isinstance(target, dict):
        return
    if method != "bmtpt_particle":
        target.pop("particle_index", None)
    if method != "spot_best":
        target.pop("selection_examples", None)
    if source_method is None:  # no particles: no prior
        target.pop("kde_weight", None)
        target.pop("kde_bandwidth", None)
    elif target.get("kde_weight") == 0:  # (no prior: its bandwidth unread)
        target.pop("kde_bandwidth", None)
    if target.get("prompt_type") == "plain":  # (the low-rank factors are MPT's)
        target.pop("rank", None)
        target.pop("lowrank_lr", None)


def _warn_if_not_finite(name: str, metrics: dict[str, Any]) -> None:
    bad = [k for k, v in metrics.items() if v is None or (isinstance(v, float) and not math.isfinite(v))]
    if bad:
        logger.warning(
            "%s: %s not finite (null in eval.json): the prompt or the backbone's activations overflowed "
            "(a learning rate or prompt.init_std too large, or float16?)",
            name,
            ", ".join(bad),
        )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` of the settings that differ. One that only one side reads (the other's method or
    settings leave it unread: _drop_unread_settings) is named only where nothing else differs: a changed
    target.kde_weight from 0 is the change, not the prior's bandwidth that 0 left unread."""
    a, b = _dotted(old), _dotted(new)
    both = [f"{key}: {a[key]!r} -> {b[key]!r}" for key in sorted(a.keys() & b.keys()) if a[key] != b[key]]
    if both:
        return both

    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(unread)"

    return [f"{key}: {shown(a, key)} -> {shown(b, key)}" for key in sorted(a.keys() ^ b.keys())]


def _dotted(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
