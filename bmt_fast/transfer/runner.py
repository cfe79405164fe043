"""Stages of a run, wired from a RunConfig: source (per method), target (per method), evaluation.

Run folder:
    config.yaml                 the resolved configuration of the last command
    source-<method>/            metrics.jsonl, checkpoint-*/, particles.safetensors, source.json
    target-<method>/            metrics.jsonl, checkpoint-*/, prompt.safetensors, eval.json, peft/
    results.json, results.md    final target metrics per method (the side-by-side table)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from ..tasks import get_task
from .aggregate import aggregate
from .checkpoint import atomic_save_tensors, atomic_write_text, latest_checkpoint, load_checkpoint
from .config import (
    TARGET_METHODS,
    ConfigError,
    ModelConfig,
    RunConfig,
    check_config,
    dump_config,
    source_methods_for,
    to_dict,
)
from .data import TaskSampler, load_task_data, task_batch_sizes
from .evaluate import evaluate_prompt, mean_nll
from .loop import SINGLE_PROCESS, CheckpointHook, LoopSettings, World, run_loop
from .peft_export import ADAPTER_WEIGHTS, export_peft_prompt
from .prompts import PromptedModel, init_prompts
from .source import ParticleTrainer, ParticleUpdate, likelihood_coefficients, source_layout
from .target import KDEPrior, TargetPrompt, TargetTrainer

PARTICLES_FILE = "particles.safetensors"
PROMPT_FILE = "prompt.safetensors"
# Keys that may change between a run and its resumption: they do not change the trajectory (evaluation
# settings, bookkeeping, the device a run continues on), or they only extend it (steps).
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
    model, tokenizer = load_pretrained(cfg.model)
    device = resolve_device(cfg.model.device)
    model.to(device)
    return prompted_model(model, tokenizer, cfg.model, device)


def load_pretrained(mc: ModelConfig):
    """(model, tokenizer) as `from_pretrained` gives them (under a live DeepSpeed ZeRO-3 config, with the
    weights partitioned as they load: see deepspeed_support)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    gguf = {"gguf_file": mc.gguf_file} if mc.gguf_file else {}
    config = AutoConfig.from_pretrained(mc.name_or_path, **gguf)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(mc.name_or_path, dtype=getattr(torch, mc.dtype), **gguf)
    tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer or mc.name_or_path, **({} if mc.tokenizer else gguf))
    return model, tokenizer


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    ):
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        check_config(cfg, command)
        self.cfg = cfg
        self.command = command
        self.resume = resume
        self.world = world
        self.dir = Path(cfg.output_dir)
        check_outputs(self, command, overwrite)
        world.barrier()  # every process has looked at the folder before any writes to it
        if overwrite and world.is_main:
            for stage in stages_of(cfg, command):
                shutil.rmtree(self.dir / stage, ignore_errors=True)
        world.barrier()
        self._pm = pm

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
        if self.world.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.dir / "config.yaml")
        self.world.barrier()

    # -- source ---------------------------------------------------------------------------------------

    def source(self, method: str, on_checkpoint: Sequence[CheckpointHook] = ()) -> torch.Tensor:
        """Train (or, when finished earlier, load) the particles of a source method: (M, L, hidden)."""
        stage_dir = self.source_dir(method)
        if (stage_dir / PARTICLES_FILE).exists():
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
        particles = self.initial_prompts(layout.num_particles).to(pm.device)
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

    def initial_prompts(self, count: int) -> torch.Tensor:
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
        )

    # -- target ---------------------------------------------------------------------------------------

    def target(self, method: str, on_checkpoint: Sequence[CheckpointHook] = ()) -> dict[str, float]:
        """Adapt a target prompt initialised by `method`; returns its final evaluation."""
        stage_dir = self.target_dir(method)
        if (stage_dir / PROMPT_FILE).exists() and (stage_dir / "eval.json").exists():
            return json.loads((stage_dir / "eval.json").read_text())
        trainer = self.target_trainer(method)
        self._train(stage_dir, trainer, self.cfg.target, "target", method, on_checkpoint)
        final = trainer.current_prompt()
        if self.world.is_main:
            atomic_save_tensors(stage_dir / PROMPT_FILE, {"prompt": final}, {"method": method})
            if self.cfg.target.export_peft:
                self.export_peft(final, stage_dir / "peft")
        metrics = {"method": method, "split": self.cfg.data.eval_split, **trainer.evaluate(final)}
        if self.world.is_main:
            atomic_write_text(stage_dir / "eval.json", json.dumps(metrics, indent=1))
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

    def evaluator(self, task, split: str):
        """prompt -> {"examples": n, "loss": ..., **task metrics} on `split` of `task`."""
        cfg, tc, pm = self.cfg, self.cfg.target, self.pm
        examples = task.load(split, cfg.data.data_dir, limit=cfg.data.max_eval_examples)

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

    def _train(self, stage_dir: Path, trainer, stage_cfg, stage: str, method: str, on_checkpoint) -> None:
        settings = LoopSettings(
            stage_cfg.steps,
            stage_cfg.log_every,
            stage_cfg.checkpoint_every,
            stage_cfg.keep_checkpoints,
            self.cfg.progress,
            f"{stage} {method}",
        )
        meta = {"stage": stage, "method": method, "config": to_dict(self.cfg)}
        self._check_resumable(stage_dir, meta)
        run_loop(stage_dir, trainer, settings, meta, resume=self.resume, on_checkpoint=on_checkpoint, world=self.world)

    def initial_target(self, particles: torch.Tensor | None, how: str, train_examples) -> torch.Tensor:
        if particles is None:
            return self.initial_prompts(1)[0]
        loss = None
        if how == "best":
            chosen = train_examples[: self.cfg.target.selection_examples]
            loss = mean_nll(self.pm, particles.to(self.pm.device), chosen, self.cfg.target.eval_batch_size)
        return aggregate(particles, how, index=self.cfg.target.particle_index, target_loss=loss)

    def export_peft(self, prompt: torch.Tensor, out_dir: Path) -> Path:
        config = self.pm.model.config
        return export_peft_prompt(
            prompt,
            out_dir,
            base_model_name_or_path=self.cfg.model.name_or_path,
            is_encoder_decoder=config.is_encoder_decoder,
            num_layers=getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None),
            num_attention_heads=getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None),
        )

    # -- evaluation -----------------------------------------------------------------------------------

    def evaluate(self, prompt_path: str | None = None, split: str | None = None) -> dict[str, dict[str, Any]]:
        """Metrics of each target method's prompt (or of the prompt file given) on the evaluation split."""
        split = split or self.cfg.data.eval_split
        prompts = (
            {Path(prompt_path).name: read_prompt(prompt_path)}
            if prompt_path
            else {m: read_prompt(self.target_dir(m) / PROMPT_FILE) for m in self.cfg.target.methods}
        )
        evaluate = self.evaluator(get_task(self.cfg.data.target_task), split)
        results = {name: {"split": split, **evaluate(prompt)} for name, prompt in prompts.items()}
        if not prompt_path and self.world.is_main:
            write_results(self.dir, results)
        self.world.barrier()
        return results

    # -- resume bookkeeping ---------------------------------------------------------------------------

    def _check_resumable(self, stage_dir: Path, meta: dict[str, Any]) -> None:
        path = latest_checkpoint(stage_dir)
        if not self.resume or path is None:
            return
        saved = _trajectory_config(load_checkpoint(path).meta.get("config", {}), meta["stage"])
        current = _trajectory_config(meta["config"], meta["stage"])
        if saved != current:
            changes = ", ".join(_differences(saved, current))
            raise ConfigError(f"cannot resume {stage_dir}: the configuration changed ({changes})")


def stages_of(cfg: RunConfig, command: str) -> list[str]:
    stages = [f"source-{m}" for m in source_methods_for(cfg, command)] if command in ("source", "transfer") else []
    if command in ("target", "transfer"):
        stages += [f"target-{m}" for m in cfg.target.methods]
    return stages


def check_outputs(run: Run, command: str, overwrite: bool) -> None:
    """Refuse to silently reuse or clobber results; check that inputs from earlier stages exist."""
    if command == "target":
        for method in source_methods_for(run.cfg, "target"):
            if not (run.source_dir(method) / PARTICLES_FILE).exists():
                raise ConfigError(
                    f"target needs the {method} source particles: {run.source_dir(method) / PARTICLES_FILE} "
                    f"is missing (run `bmt-fast source` with source.method={method}, or `bmt-fast transfer`)"
                )
    if command == "eval":
        return
    if overwrite or run.resume:
        return
    for stage in stages_of(run.cfg, command):
        folder = run.dir / stage
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"{folder} already has results: pass --resume to continue it, or --overwrite")


def load_particles(stage_dir: str | Path) -> torch.Tensor:
    path = Path(stage_dir) / PARTICLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no particles at {path}")
    return load_file(str(path))["particles"]


def read_prompt(path: str | Path) -> torch.Tensor:
    """An (L, hidden) prompt from our prompt.safetensors or a PEFT prompt-tuning adapter folder."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no prompt at {path}")
    tensors = load_file(str(path))
    for key in ("prompt", "prompt_embeddings"):
        if key in tensors:
            return tensors[key].float()
    raise ValueError(f"{path} holds neither 'prompt' nor 'prompt_embeddings' (keys: {sorted(tensors)})")


def write_results(run_dir: Path, results: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
    atomic_write_text(run_dir / "results.md", results_table(results))


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per method, one column per metric."""
    metrics = sorted({k for r in results.values() for k, v in r.items() if isinstance(v, float)})
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.4f}" if m in row else "" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _trajectory_config(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The configuration that determines a stage's trajectory (what must not change across a resume)."""
    drop = set(RESUMABLE_CHANGES) | {"output_dir"} | ({"target"} if stage == "source" else set())
    return {
        section: ({k: v for k, v in values.items() if k not in drop} if isinstance(values, dict) else values)
        for section, values in config.items()
        if section not in drop
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
