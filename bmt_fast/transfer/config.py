"""Run configuration: dataclasses, YAML loading, `key=value` overrides, and validation before any work.

    cfg = load_config("run.yaml", ["source.steps=200", "model.dtype=bfloat16"])
    check_config(cfg, command="transfer")      # every error a user can make, before a model is loaded

All checks raise `ConfigError` with the dotted name of the offending key.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml


class ConfigError(ValueError):
    """A configuration a run cannot start with (raised before any model or data is loaded)."""


DTYPES = ("float32", "bfloat16", "float16")
PROMPT_INITS = ("vocab", "normal")
SOURCE_METHODS = ("bmtpt", "spot", "multitask")
SAMPLINGS = ("proportional", "uniform")
OPTIMIZERS = ("adam", "adagrad")
LIKELIHOOD_SCALES = ("mean", "dataset", "batch")
PROMPT_TYPES = ("plain", "mpt")

# Target methods: which source stage provides the initial target prompt, and how its particles are
# aggregated into one. None: no source stage (plain prompt tuning from `prompt.init`).
TARGET_METHODS: dict[str, tuple[str | None, str]] = {
    "bmtpt": ("bmtpt", "mean"),  # the paper: the mean of the SVGD particles
    "bmtpt_medoid": ("bmtpt", "medoid"),
    "bmtpt_particle": ("bmtpt", "particle"),
    "spot_best": ("spot", "best"),  # SPoT: the source prompt with the lowest target loss
    "spot_mean": ("spot", "mean"),
    "multitask": ("multitask", "mean"),  # one prompt trained on the mixture of source tasks
    "prompt_tuning": (None, "init"),
}


@dataclass
class ModelConfig:
    name_or_path: str = ""  # a local folder saved by save_pretrained (or a hub id when online)
    gguf_file: str | None = None  # a .gguf file inside name_or_path
    tokenizer: str | None = None  # tokenizer folder; default: name_or_path
    dtype: str = "float32"  # backbone dtype; prompts are always trained in float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    train_mode: bool = False  # True: dropout while training (evaluation: eval mode); frozen either way
    max_source_length: int = 256  # input tokens kept per example (after the prompt)
    max_target_length: int = 16  # target tokens kept per example (including EOS)
    target_prefix: str = " "  # decoder-only: text between the input and the answer


@dataclass
class PromptConfig:
    length: int = 20  # L, soft prompt tokens
    init: str = "vocab"  # vocab: embeddings of random vocabulary tokens; normal: N(0, init_std^2)
    init_std: float | None = None  # normal init; None: the std of the embedding matrix
    vocab_top_k: int | None = None  # vocab init draws from the first k token ids (Lester et al.: 5000)


@dataclass
class DataConfig:
    source_tasks: list[str] = field(default_factory=list)
    target_task: str | None = None
    data_dir: str | None = None  # hub-schema files <data_dir>/<task>/<split>.jsonl; None: the hub
    task_modules: list[str] = field(default_factory=list)  # imported first; they call register_task
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_split: str = "validation"


@dataclass
class SourceConfig:
    method: str = "bmtpt"  # bmtpt (SVGD posterior) | spot (one prompt per task) | multitask (one prompt)
    num_particles: int = 5  # M (bmtpt only: spot uses one per task, multitask one)
    steps: int = 1000
    batch_size: int = 8  # examples per source task per step (the mean under proportional sampling)
    sampling: str = "proportional"  # per-task batch sizes proportional to task size, or uniform
    optimizer: str = "adam"
    lr: float = 0.01
    bandwidth: Union[str, float] = "median"  # SVGD kernel bandwidth H
    prior_std: float | None = 100.0  # Gaussian prior N(0, prior_std^2 I); None: flat prior
    likelihood_scale: Union[str, float] = "mean"  # mean | dataset | batch | a positive float (see README)
    backend: str = "auto"  # bmt_fast backend for svgd_step
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2


@dataclass
class TargetConfig:
    methods: list[str] = field(default_factory=lambda: ["bmtpt"])  # keys of TARGET_METHODS
    prompt_type: str = "plain"  # plain: L x hidden; mpt: init * (u v^T) with rank-r u, v
    rank: int = 1
    steps: int = 1000
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 0.01  # the full-rank prompt
    lowrank_lr: float = 0.01  # u and v of the mpt prompt
    kde_weight: float = 0.0  # lambda of the posterior-as-prior term -lambda log mean_m k(theta, theta_m)
    kde_bandwidth: Union[str, float] = "median"
    particle_index: int = 0  # bmtpt_particle: which particle
    selection_examples: int = 32  # spot_best: target training examples that rank the source prompts
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int = 16
    max_new_tokens: int = 16  # generation tasks
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    export_peft: bool = True


@dataclass
class RunConfig:
    output_dir: str = "runs/bmtpt"
    seed: int = 0
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


# ---------------------------------------------------------------------------------------------------
# Loading: YAML mapping + overrides -> typed dataclasses


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """RunConfig from a YAML file (optional) and `section.key=value` overrides (values in YAML syntax)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a YAML mapping, got {type(loaded).__name__}")
        data = _unshared(loaded or {})
    for item in overrides:
        _apply_override(data, item)
    _expand_home(data)
    return from_dict(RunConfig, data)


def _unshared(value: Any) -> Any:
    """A copy of YAML's mappings and lists in which no two places share one object: an alias (`target: *opt`)
    is a copy, so an override of one section leaves the other as written (deepcopy keeps such sharing)."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def _expand_home(data: dict[str, Any]) -> None:
    """A folder setting that starts with `~` read as a shell reads it (transformers had taken
    `~/models/t5` for a malformed hub id, after the checks had found the folder)."""
    for section, key in (("model", "name_or_path"), ("model", "tokenizer"), ("data", "data_dir"), (None, "output_dir")):
        values = data if section is None else data.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML forbids it; PyYAML kept the last, so a
    second `source:` section replaced the whole first one, silently)."""

    def construct_mapping(self, node, deep=False):
        # The keys as written, before the merge keys (<<: *anchor) are flattened in: a merged key that the
        # mapping gives again is an override, which YAML allows (the `<<` keys themselves are not counted).
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if duplicate:
                raise yaml.YAMLError(f"the key {key!r} is given twice in one mapping (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # (an empty section, `source:` with nothing under it, is null in YAML)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {error}") from error
    _merge_into(node, parts[-1], value)


def _merge_into(node: dict[str, Any], key: str, value: Any) -> None:
    """node[key] = value, where a mapping given for a section merges into it key by key, as Hydra's overrides
    do (`source={steps: 3}` had replaced the whole section: its other keys, given in the YAML, went back to
    their defaults)."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for name, item in value.items():
            _merge_into(node[key], name, item)
    else:
        node[key] = value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking key names and coercing values to the field types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid: {', '.join(names)}")
    values = {}
    for name in names:
        if name in data:
            values[name] = _coerce(hints[name], data[name], prefix + name)
    return cls(**values)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, name + ".")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return _coerce_union(typing.get_args(hint), value, name)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(hint, value, name)


def _coerce_union(options: tuple[Any, ...], value: Any, name: str) -> Any:
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name} must not be null")
    # A string that reads as a number ("1e-3": PyYAML leaves it a string) goes to the numeric option.
    ordered = sorted((o for o in options if o is not type(None)), key=lambda o: o is str)
    errors = []
    for option in ordered:
        try:
            return _coerce(option, value, name)
        except ConfigError as error:
            errors.append(str(error))
    raise ConfigError(errors[-1])


def _coerce_scalar(hint: Any, value: Any, name: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {hint!r}")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------------
# Validation (values, tasks, files): everything that can be checked before a model is loaded

COMMANDS = ("source", "target", "transfer", "eval")


def check_config(cfg: RunConfig, command: str, *, prompt_path: str | None = None) -> None:
    """Raise ConfigError for anything that would make `command` fail later (values, tasks, files).
    prompt_path: `eval --prompt`'s file, evaluated instead of the run's prompts (no source stage is read)."""
    if command not in COMMANDS:
        raise ConfigError(f"command must be one of {COMMANDS}, got {command!r}")
    check_values(cfg)
    check_tasks(cfg, command, prompt_path=prompt_path)
    check_files(cfg)
    check_data(cfg, command)


def check_values(cfg: RunConfig) -> None:
    m, p, s, t = cfg.model, cfg.prompt, cfg.source, cfg.target
    _choice("model.dtype", m.dtype, DTYPES)
    device = model_device(m.device)
    if not m.name_or_path:
        raise ConfigError("model.name_or_path is required")
    if not 0 <= cfg.seed < 2**63:  # (torch.manual_seed takes a 64-bit integer)
        raise ConfigError(f"seed must be in [0, 2**63), got {cfg.seed}")
    _at_least("model.max_source_length", m.max_source_length, 1)
    _at_least("model.max_target_length", m.max_target_length, 1)
    _at_least("prompt.length", p.length, 1)
    _choice("prompt.init", p.init, PROMPT_INITS)
    _positive_or_none("prompt.init_std", p.init_std)
    if p.vocab_top_k is not None:
        _at_least("prompt.vocab_top_k", p.vocab_top_k, 1)
    _choice("source.method", s.method, SOURCE_METHODS)
    _at_least("source.num_particles", s.num_particles, 1)
    _choice("source.sampling", s.sampling, SAMPLINGS)
    _positive_or_none("source.prior_std", s.prior_std)
    _bandwidth("source.bandwidth", s.bandwidth, torch.float32)  # (the SVGD step's: float32 prompts)
    _backend("source.backend", s.backend, device, m.device)
    if isinstance(s.likelihood_scale, str):
        _choice("source.likelihood_scale", s.likelihood_scale, LIKELIHOOD_SCALES)
    else:
        _positive("source.likelihood_scale", s.likelihood_scale)
    _choice("target.prompt_type", t.prompt_type, PROMPT_TYPES)
    _at_least("target.rank", t.rank, 1)
    _positive("target.lowrank_lr", t.lowrank_lr)
    if not (t.kde_weight >= 0 and math.isfinite(t.kde_weight)):
        raise ConfigError(f"target.kde_weight must be a finite number >= 0, got {t.kde_weight}")
    _bandwidth("target.kde_bandwidth", t.kde_bandwidth, torch.float64)  # (KDEPrior's particles: float64)
    _at_least("target.particle_index", t.particle_index, 0)
    _at_least("target.selection_examples", t.selection_examples, 1)
    _at_least("target.eval_every", t.eval_every, 0)
    _at_least("target.eval_batch_size", t.eval_batch_size, 1)
    _at_least("target.max_new_tokens", t.max_new_tokens, 1)
    if not t.methods:
        raise ConfigError("target.methods must name at least one method")
    for i, method in enumerate(t.methods):
        _choice(f"target.methods[{i}]", method, tuple(TARGET_METHODS))
    for stage, sc in (("source", s), ("target", t)):
        _at_least(f"{stage}.steps", sc.steps, 0)
        _at_least(f"{stage}.batch_size", sc.batch_size, 1)
        _choice(f"{stage}.optimizer", sc.optimizer, OPTIMIZERS)
        _positive(f"{stage}.lr", sc.lr)
        _at_least(f"{stage}.log_every", sc.log_every, 1)
        _at_least(f"{stage}.checkpoint_every", sc.checkpoint_every, 1)
        _at_least(f"{stage}.keep_checkpoints", sc.keep_checkpoints, 1)
    for name in ("max_train_examples", "max_eval_examples"):
        value = getattr(cfg.data, name)
        if value is not None:
            _at_least(f"data.{name}", value, 1)
    _check_particle_counts(cfg)


def _check_particle_counts(cfg: RunConfig) -> None:
    bmtpt_particles = cfg.source.num_particles
    if "bmtpt_particle" in cfg.target.methods and cfg.target.particle_index >= bmtpt_particles:
        raise ConfigError(
            f"target.particle_index={cfg.target.particle_index} but source.num_particles={bmtpt_particles}"
        )
    if cfg.target.kde_weight > 0 and cfg.target.kde_bandwidth == "median":
        for method in cfg.target.methods:
            count = particles_of(cfg, TARGET_METHODS[method][0])
            if count is not None and count < 2:
                raise ConfigError(
                    f"target.kde_weight > 0 with kde_bandwidth=median needs >= 2 source particles; "
                    f"method {method!r} has {count} (set target.kde_bandwidth to a number)"
                )


def particles_of(cfg: RunConfig, source_method: str | None) -> int | None:
    """How many particles a source method trains (None: no source stage)."""
    if source_method is None:
        return None
    if source_method == "spot":
        return len(cfg.data.source_tasks)
    if source_method == "multitask":
        return 1
    return cfg.source.num_particles


def source_methods_for(cfg: RunConfig, command: str) -> list[str]:
    """Source stages a command runs (source: the configured one) or needs (target/transfer)."""
    if command == "source":
        return [cfg.source.method]
    needed = [TARGET_METHODS[m][0] for m in cfg.target.methods]
    return list(dict.fromkeys(m for m in needed if m is not None))


def check_tasks(cfg: RunConfig, command: str, *, prompt_path: str | None = None) -> None:
    """Import `data.task_modules`, then look every named task up in the registry. `eval --prompt`
    (prompt_path) evaluates the file it is given: it needs no source tasks (they had been required, for the
    source stages of target.methods that it never reads)."""
    from ..tasks import get_task

    for module in cfg.data.task_modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"data.task_modules: cannot import {module!r}: {error}") from error
    reads_sources = not (command == "eval" and prompt_path)
    if reads_sources and source_methods_for(cfg, command) and not cfg.data.source_tasks:
        raise ConfigError("data.source_tasks must name at least one task")
    if len(set(cfg.data.source_tasks)) != len(cfg.data.source_tasks):
        raise ConfigError(f"data.source_tasks has duplicates: {cfg.data.source_tasks}")
    if command != "source" and not cfg.data.target_task:
        raise ConfigError(f"data.target_task is required for `{command}`")
    names = [("data.source_tasks", n) for n in cfg.data.source_tasks]
    if cfg.data.target_task:
        names.append(("data.target_task", cfg.data.target_task))
    for key, name in names:
        try:
            get_task(name)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from error


def check_data(cfg: RunConfig, command: str) -> None:
    """The splits a command reads exist (names; with data.data_dir, non-empty files with the task's
    columns), and with data.data_dir they load as the run will load them (every row read, as many as the
    run takes, each labelled): a bad row or an unlabelled split is reported before a source stage trains, not
    after it. A split from the hub is read when the run loads it, except offline (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE): then it loads here, from the local cache, so that a split the cache lacks is an
    error before anything trains (a hub target task had failed after the source stages trained). `eval`
    reads only the target task's, and so does `target`: it takes its source stages as they are (finished,
    checked by check_outputs), never their training data."""
    from ..tasks import get_task
    from .data import load_examples

    needed = []
    if command in ("source", "transfer") and source_methods_for(cfg, command):
        needed += [("data.source_tasks", name, "train") for name in cfg.data.source_tasks]
    if command in ("target", "transfer"):
        needed.append(("data.target_task", cfg.data.target_task, "train"))
    if command in ("target", "transfer", "eval"):
        needed.append(("data.eval_split", cfg.data.target_task, cfg.data.eval_split))
    for key, name, split in needed:
        task = get_task(name)
        try:
            task.check_split(split, cfg.data.data_dir)
            if cfg.data.data_dir is not None or _offline("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                limit = cfg.data.max_train_examples if split == "train" else cfg.data.max_eval_examples
                load_examples(task, split, cfg.data.data_dir, limit)
        except (ValueError, OSError) as error:  # (DataError is a ValueError)
            raise ConfigError(f"{key}: {error}") from error


def check_files(cfg: RunConfig) -> None:
    mc = cfg.model
    model_path = Path(os.path.expanduser(mc.name_or_path))
    if model_path.exists():
        if mc.gguf_file and not (model_path / mc.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file: {mc.gguf_file} not found in {model_path}")
    else:
        _check_hub_name("model.name_or_path", mc.name_or_path, mc.gguf_file or "config.json")
    if mc.tokenizer and not Path(os.path.expanduser(mc.tokenizer)).exists():
        _check_hub_name("model.tokenizer", mc.tokenizer, "tokenizer_config.json")
    if cfg.data.data_dir is not None and not Path(cfg.data.data_dir).is_dir():
        raise ConfigError(f"data.data_dir: folder not found: {cfg.data.data_dir}")
    existing = nearest_existing(Path(cfg.output_dir or "."))
    if not existing.is_dir():  # (mkdir had failed with a traceback)
        raise ConfigError(f"output_dir: {existing} is a file, not a folder")


def nearest_existing(path: Path) -> Path:
    """path, or the closest folder above it that exists: what a mkdir of path would write into (a file
    there, or no permission, and the mkdir or the write fails)."""
    return next(q for q in (path, *path.absolute().parents) if q.exists())


def _check_hub_name(key: str, name: str, filename: str) -> None:
    """A name that is not a local folder must be a hub id; offline, it must be in the local HF cache."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ConfigError(f"{key}: folder not found: {name}")
    if not _offline("HF_HUB_OFFLINE"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, filename), str):
        raise ConfigError(
            f"{key}: {name} is neither a local folder nor in the Hugging Face cache (HF_HUB_OFFLINE is set)"
        )


def _offline(*variables: str) -> bool:
    """Whether one of these environment variables turns Hugging Face's offline mode on."""
    return any(os.environ.get(name, "0").lower() in ("1", "true", "yes", "on") for name in variables)


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}; got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be > 0 and finite, got {value}")


def _positive_or_none(name: str, value: float | None) -> None:
    if value is not None:
        _positive(name, value)


def model_device(value: str) -> torch.device:
    """The device model.device names, as the run resolves it (auto: CUDA where torch sees it, else the CPU);
    ConfigError where torch cannot parse it (`cudax`, `cuda:-1`, `cuda:0:1`), it is neither the CPU nor
    CUDA, torch sees no CUDA device, or its index is past the CUDA devices torch sees (these had passed the
    checks and failed when the model moved to the device, after --overwrite had removed the stages)."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"model.device must be auto, cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={value} but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"model.device={value} but torch sees {count} CUDA device(s): cuda:0"
                + (f" to cuda:{count - 1}" if count > 1 else "")
            )
    return device


def _backend(name: str, value: str, device: torch.device, device_setting: str) -> None:
    """"auto" or a backend that runs in this process (`bmt_fast.available_backends()`) on `device`, the
    model's, where the particles live (`backend=cpu` with a CUDA model, or `cuda` with a CPU one, had passed
    the checks and failed at the first SVGD step, after --overwrite had removed the stages)."""
    from ..backends import available_backends, get, unavailable_backends

    if value == "auto":
        return
    if value not in available_backends():
        reason = unavailable_backends().get(value)
        if reason:
            raise ConfigError(f"{name}={value} is not available here: {reason}")
        _choice(name, value, ("auto", *available_backends()))
    if not get(value).supports(device):
        there = [n for n in available_backends() if get(n).supports(device)]
        raise ConfigError(
            f"{name}={value} does not run on {device.type}, where model.device={device_setting} puts the "
            f"particles; choose auto or one of: {', '.join(there)}"
        )


def _bandwidth(name: str, value: str | float, dtype: torch.dtype) -> None:
    """"median" or a number that bmt_fast's check_bandwidth takes for particles of `dtype`, the arithmetic it is
    used in (at least its smallest normal number: below it 1/H overflows, and the op refused it only when
    training reached it, after earlier stages had trained)."""
    if isinstance(value, str):
        _choice(name, value, ("median",))
        return
    from .._validation import check_bandwidth

    _positive(name, value)
    try:
        check_bandwidth(float(value), torch.empty(0, dtype=dtype))
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None