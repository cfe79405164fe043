"""Bayesian multi-task prompt transfer (BMTPT) on Hugging Face backbones.

    source stage   prompt particles sampled from the posterior over K source tasks by SVGD
                   (`bmt_fast.SVGD`), or the SPoT / multi-task baselines through the same loop
    aggregation    mean of the particles (the paper), medoid, one particle, or the best for the target
    target stage   plain or MPT-style prompt, optional posterior-as-prior KDE term

Command line: `bmt-fast source|target|transfer|eval|plot` (see `bmt_fast.cli`). In Python:

    cfg = load_config("run.yaml", ["source.steps=100"])
    run = Run(cfg, "transfer")
    particles = run.source("bmtpt")
    metrics = run.target("bmtpt")
"""

from .aggregate import aggregate
from .config import ConfigError, RunConfig, check_config, load_config
from .data import TaskSampler, load_task_data
from .evaluate import evaluate_prompt
from .loop import LoopSettings, run_loop
from .peft_export import export_peft_prompt
from .prompts import Batch, PromptedModel, init_prompts
from .runner import Run, load_backbone, read_prompt
from .source import ParticleTrainer, ParticleUpdate, likelihood_coefficients, source_layout
from .target import KDEPrior, TargetPrompt, TargetTrainer

__all__ = [
    "Batch",
    "ConfigError",
    "KDEPrior",
    "LoopSettings",
    "ParticleTrainer",
    "ParticleUpdate",
    "PromptedModel",
    "Run",
    "RunConfig",
    "TargetPrompt",
    "TargetTrainer",
    "TaskSampler",
    "aggregate",
    "check_config",
    "evaluate_prompt",
    "export_peft_prompt",
    "init_prompts",
    "likelihood_coefficients",
    "load_backbone",
    "load_config",
    "load_task_data",
    "read_prompt",
    "run_loop",
    "source_layout",
]
