"""The trainer under DeepSpeed: a frozen backbone under ZeRO, prompts trained data-parallel.

    deepspeed --num_gpus 8 $(which bmt-fast) source --config run.yaml --deepspeed ds_zero3.json
    torchrun --nproc_per_node 8 -m bmt_fast.cli source --config run.yaml --deepspeed ds_zero3.json

What DeepSpeed holds: the frozen backbone. ZeRO-3 partitions its weights over the processes from load time
(`from_pretrained` runs under `deepspeed.zero.Init` through transformers' HfDeepSpeedConfig), so a model
larger than one device loads, and `offload_param` keeps the partitions in CPU memory; the forward's hooks
gather each layer's weights when it runs. ZeRO stages 0-2 partition optimizer state and gradients, which a
frozen backbone does not have: under them the backbone is replicated on every device.

What it does not hold: the prompt particles (and the target prompt) and their optimizer state. SVGD needs
every particle whole, they are small (M x L x hidden), so every process keeps them all and updates them
with the same torch optimizer as a single process, and checkpoints keep the single-process format. A
DeepSpeed config's `optimizer` and `scheduler` sections are therefore rejected.

Data parallelism: every process draws the same global batch (the samplers share seed and state) and takes
its share; gradients and losses are summed over processes with weights (share / batch), so a step equals
the single-process step on the global batch, up to summation order. `source.batch_size` and
`target.batch_size` are thus global, whatever the number of processes. Every process applies the same
update to the same inputs, so the particles stay identical; each checkpoint checks that they are, bit for
bit. Only the first process writes files; the output folder must be shared by all processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import rng_state, set_rng_state
from .config import ConfigError, RunConfig, model_device
from .data import make_batches
from .runner import Run, load_pretrained, longest_sequence, prompted_model
from .source import ParticleTrainer
from .target import TargetTrainer

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements/deepspeed.txt (DS_BUILD_OPS=0, --no-build-isolation; see README)"
# Keys DeepSpeed requires; they do not affect bmt-fast, whose batches are source/target.batch_size.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
HALF_SECTIONS = {"bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------------------------------------------
# The DeepSpeed config


def read_ds_config(source: str | Path | dict[str, Any], cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config as a dict, checked against the run config; its batch keys set (they do not
    affect training)."""
    if isinstance(source, dict):
        ds = json.loads(json.dumps(source))  # a deep copy; the caller's dict stays as it was
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--deepspeed: config file not found: {path}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"--deepspeed: {path} is not valid JSON: {error}") from error
    if not isinstance(ds, dict):
        raise ConfigError("--deepspeed: the config must be a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"--deepspeed: remove the {section!r} section: the backbone is frozen, and the prompts are "
                "trained by source.optimizer / target.optimizer (source.lr, target.lr)"
            )
    if "bfloat16" in ds:  # DeepSpeed's older name of the bf16 section (zero.Init reads either)
        if "bf16" in ds:
            raise ConfigError("--deepspeed: give one of the sections 'bf16' and 'bfloat16' (the same one), not both")
        ds["bf16"] = ds.pop("bfloat16")
    for section in ("zero_optimization", *HALF_SECTIONS):
        if section in ds and not isinstance(ds[section], dict):
            raise ConfigError(f"--deepspeed: {section!r} must be a JSON object, got {json.dumps(ds[section])}")
    stage = zero_stage(ds)
    if "stage" in ds.get("zero_optimization", {}):
        ds["zero_optimization"]["stage"] = stage  # (3.0 as 3)
    for key in ("offload_param", "offload_optimizer"):  # (a string, e.g. "cpu", had passed to deepspeed.initialize)
        value = ds.get("zero_optimization", {}).get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f'--deepspeed: zero_optimization.{key} must be a JSON object such as {{"device": "cpu"}}, got '
                f"{json.dumps(value)}"
            )
    offload = ds.get("zero_optimization", {}).get("offload_param")
    if stage < 3 and isinstance(offload, dict) and offload.get("device", "none") != "none":
        raise ConfigError(
            f"--deepspeed: zero_optimization.offload_param needs stage 3 (stage {stage} keeps the whole backbone "
            "on every device and ignores it)"
        )
    _check_precision(ds, cfg.model.dtype)
    _set_batch_keys(ds, world_size)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):  # (true had been read as stage 1)
        raise ConfigError(f"--deepspeed: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return int(stage)  # (3.0, which DeepSpeed reads as 3, as 3 in the messages and records)


# The strings DeepSpeed's config (pydantic) reads as booleans, case aside.
_TRUE = ("true", "1", "yes", "y", "on", "t")
_FALSE = ("false", "0", "no", "n", "off", "f")


def _switch(name: str, value: Any) -> bool | str:
    """A section's `enabled` as a bool (or "auto"), read as DeepSpeed reads it: "true" and 1 as true (the check
    had counted only true and "auto" as enabled, so an fp16 section enabled by "true" passed a float32 model)."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ConfigError(f'--deepspeed: {name} must be true, false or "auto", got {json.dumps(value)}')


def _check_precision(ds: dict[str, Any], model_dtype: str) -> None:
    """bf16 / fp16 sections must agree with model.dtype (zero.Init takes the weights' dtype from them);
    a half-precision model.dtype adds its section when there is none, and refuses one that disables it (it
    had been switched on silently)."""
    for name, dtype in HALF_SECTIONS.items():
        if "enabled" in ds.get(name, {}):
            switch = _switch(f"{name}.enabled", ds[name]["enabled"])
            # "auto" (Hugging Face's Trainer fills it in from its own precision): model.dtype's. DeepSpeed itself
            # reads "auto" as false, and the check had counted it as enabled: a bf16 backbone under bf16 "auto"
            # had been handed to DeepSpeed as a disabled section, an fp16 "auto" refused for float32.
            ds[name]["enabled"] = dtype == model_dtype if switch == "auto" else switch
    enabled = [name for name in HALF_SECTIONS if ds.get(name, {}).get("enabled") is True]
    if len(enabled) > 1:
        raise ConfigError("--deepspeed: bf16 and fp16 cannot both be enabled")
    wanted = next((name for name, dtype in HALF_SECTIONS.items() if dtype == model_dtype), None)
    if enabled and enabled[0] != wanted:
        raise ConfigError(
            f"--deepspeed: {enabled[0]}.enabled but model.dtype={model_dtype}; "
            f"set model.dtype={HALF_SECTIONS[enabled[0]]} or disable {enabled[0]}"
        )
    if wanted and ds.get(wanted, {}).get("enabled") is False:
        raise ConfigError(
            f"--deepspeed: {wanted}.enabled is false but model.dtype={model_dtype}: enable {wanted} (or leave "
            f"the section out), or set model.dtype=float32"
        )
    if wanted:
        ds.setdefault(wanted, {})["enabled"] = True


def _set_batch_keys(ds: dict[str, Any], world_size: int) -> None:
    """DeepSpeed's batch keys, which bmt-fast's batches do not use, set to values it accepts for this number of
    processes (one example per process). Values written for another number of GPUs (train_batch_size 32 on
    2 processes) had stopped ZeRO-3 runs inside from_pretrained with DeepSpeed's AssertionError."""
    given = {key: ds[key] for key in BATCH_KEYS if ds.get(key, "auto") != "auto"}
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world_size)
    if given:
        logger.info(
            "DeepSpeed's %s replaced (bmt-fast's batches are source.batch_size and target.batch_size)",
            ", ".join(f"{key}={value}" for key, value in given.items()),
        )


# ---------------------------------------------------------------------------------------------------
# The processes


class DeepSpeedWorld:
    """The processes of one run (a `loop.World`): rank, device, collectives, per-process RNG states.

    Started by `deepspeed` or `torchrun` (which set RANK, WORLD_SIZE, LOCAL_RANK...), or as one process
    without a launcher (ZeRO-3 with offload_param on one device).
    """

    def __init__(self):
        deepspeed = import_deepspeed()
        _single_process_defaults()
        # torch._dynamo before the group exists: the first torch.optim step imports it, and that import made
        # with a live group keeps references to it, so that the group (gloo's worker threads included) outlives
        # destroy_process_group (README, "Multi-rank SVGD step").
        import torch._dynamo  # noqa: F401

        deepspeed.init_distributed()  # the accelerator's backend: nccl on CUDA, gloo on CPU
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if accelerator.device_name() == "cpu":
            self.device = torch.device("cpu")
        else:
            accelerator.set_device(self.local_rank)
            self.device = torch.device(accelerator.device_name(self.local_rank))
        self.is_main = self.rank == 0
        _separate_random_streams(self.rank)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """The end of a program's runs, on every process, after they succeeded (bmt_fast.cli does it): a
        barrier, then the process group destroyed, as torch asks of a normal exit (it warns at exit about an
        NCCL group never destroyed, and a gloo group left to the interpreter's shutdown can abort a finished
        run, torch issue 190489). Not after an error: other processes may be gone, and the barrier would
        wait for them. No DeepSpeedRun after it in the same process: DeepSpeed caches its groups (ZeRO's
        data-parallel group among them), which a new process group does not replace."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over processes of t, on t's device (the collective runs where the backend wants it)."""
        reduced = t.detach().to(self.device, copy=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(t.device)

    def share(self, indices: list[int]) -> tuple[list[int], float]:
        return share_of(indices, self.rank, self.size)

    def check_shared_folder(self, folder: Path) -> None:
        """ConfigError on every process unless each one sees a file the first writes in `folder`: output_dir
        must be one folder for all (the others read the stages the first writes). A folder local to each node
        had ended in a collective mismatch (gloo: "Received data size doesn't match"; NCCL would hang), the
        other processes training a source stage again while the first went on to the target."""
        if self.size == 1:
            return
        token = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        probe = Path(folder) / f".bmt-fast-shared-{token[0]}"
        if self.rank == 0:
            try:
                probe.parent.mkdir(parents=True, exist_ok=True)
                probe.write_text("")
            except OSError as error:
                logger.error("cannot write in output_dir %s: %s", folder, error)
        dist.barrier()
        seen = torch.tensor([int(probe.exists())], device=self.device)
        dist.all_reduce(seen, op=dist.ReduceOp.SUM)
        if self.rank == 0:
            probe.unlink(missing_ok=True)
        if int(seen) < self.size:
            raise ConfigError(
                f"output_dir {folder}: {self.size - int(seen)} of {self.size} processes do not see the files the "
                "first process writes there; give a folder that every process shares (a shared file system)"
            )

    def check_identical(self, t: torch.Tensor, name: str) -> None:
        """Raise on every process unless t is bit for bit the same on all of them."""
        first = t.detach().to(self.device, copy=True).contiguous()
        dist.broadcast(first, src=0)
        # bit patterns (torch.equal takes NaN for unequal to itself: NaN particles had "differed" everywhere)
        mine = t.detach().to(self.device).contiguous()
        same = torch.equal(first.reshape(-1).view(torch.uint8), mine.reshape(-1).view(torch.uint8))
        differs = torch.tensor([0 if same else 1], device=self.device)
        dist.all_reduce(differs, op=dist.ReduceOp.SUM)
        if int(differs):
            raise RuntimeError(f"the {name} differ between processes ({int(differs)} of {self.size} differ)")

    def rng_state(self) -> dict[str, Any]:
        """The first process's RNG state (what a single-process checkpoint holds) and every process's."""
        states: list[Any] = [None] * self.size
        dist.all_gather_object(states, rng_state())
        return {**states[0], "processes": states}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        mine = state.get("processes", [])
        if len(mine) == self.size:
            set_rng_state(mine[self.rank])
            return
        set_rng_state(state)  # a checkpoint of another number of processes: the first one's state
        if self.rank:
            torch.manual_seed(torch.initial_seed() + self.rank)


_streams_separated = False


def _separate_random_streams(rank: int) -> None:
    """Once per process: dropout (model.train_mode) must differ between processes. The first keeps torch's
    default stream, as a single process does."""
    global _streams_separated
    if rank and not _streams_separated:
        torch.manual_seed(torch.initial_seed() + rank)
    _streams_separated = True


def share_of(indices: list[int], rank: int, size: int) -> tuple[list[int], float]:
    """Process `rank`'s part of a global batch (contiguous, sizes differing by at most one) and its weight
    (part / batch). A process without a part runs the batch's first example with weight 0: under ZeRO-3
    every process must take part in every forward."""
    n = len(indices)
    start, stop = rank * n // size, (rank + 1) * n // size
    if stop > start:
        return indices[start:stop], (stop - start) / n
    return indices[:1], 0.0


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as error:
        raise ConfigError(f"--deepspeed needs the deepspeed package ({error}): {INSTALL_HINT}") from error
    return deepspeed


def _single_process_defaults() -> None:
    """Without a launcher, one process: the environment variables torch.distributed reads."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(port))


# ---------------------------------------------------------------------------------------------------
# The backbone


class Backbone:
    """The frozen backbone under DeepSpeed and the objects that must stay alive with it."""

    def __init__(self, cfg: RunConfig, ds: dict[str, Any], world: DeepSpeedWorld):
        deepspeed = import_deepspeed()
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        self.zero3 = zero_stage(ds) == 3
        self.engine = None
        if self.zero3:
            # While this object lives, from_pretrained builds the model under deepspeed.zero.Init (each
            # process materialises only its shard of every weight) and generate() keeps processes in step.
            self.hf_config = HfDeepSpeedConfig(ds)
            model, tokenizer = load_pretrained(cfg.model, longest_sequence(cfg))
            if not cfg.model.gguf_file:
                untie_saved_output_embedding(model, cfg.model.name_or_path, ds)
            model.requires_grad_(False)
            self.engine, *_ = deepspeed.initialize(model=model, config=ds)  # registers the gathering hooks
        else:
            unset_hf_deepspeed_config()
            self.hf_config = None
            model, tokenizer = load_pretrained(cfg.model, longest_sequence(cfg))
            model.to(world.device)
            if world.is_main:
                _log_replicated(ds)
        self.pm = prompted_model(model, tokenizer, cfg.model, world.device)

    def gathered(self, parameters: list[torch.nn.Parameter]):
        """Context in which ZeRO-3-partitioned parameters are whole on every process (read only)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        # The forward hooks may have a prefetch of these parameters in flight (the embedding lookup
        # ends the recorded module trace); let it land and release everything before gathering by hand.
        self.engine.empty_partition_cache()
        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


def untie_saved_output_embedding(model: torch.nn.Module, name_or_path: str, ds: dict[str, Any]) -> bool:
    """Under ZeRO-3, give the model the output embedding its checkpoint holds where from_pretrained tied it to
    the input embedding instead; whether it did. transformers 5 builds T5 with lm_head tied to the shared
    embedding whatever the config says, and a plain from_pretrained unties it where the checkpoint holds a
    different lm_head (T5 v1.1, Flan-T5); under ZeRO-3 (zero.Init) it stays tied and the checkpoint's lm_head
    is dropped without a word: the model computed other logits than the plain one. Every process reads the
    saved tensor and compares it with the gathered input embedding (the same answer everywhere); the new
    head is built under zero.Init, partitioned, and filled by the first process."""
    import deepspeed

    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return False
    key = next(f"{name}.weight" for name, module in model.named_modules() if module is outputs)
    saved = _saved_tensor(name_or_path, key)
    if saved is None:
        return False
    with deepspeed.zero.GatheredParameters([inputs.weight], modifier_rank=None):
        embedding = inputs.weight.detach()
        same = saved.shape == embedding.shape and torch.equal(saved.to(embedding), embedding)
    if same:  # (a .bin checkpoint holds both keys of tied weights)
        return False
    with deepspeed.zero.Init(config_dict_or_path=ds):
        head = torch.nn.Linear(saved.shape[1], saved.shape[0], bias=False, dtype=inputs.weight.dtype)
    with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=0):
        if not dist.is_initialized() or dist.get_rank() == 0:
            with torch.no_grad():
                head.weight.copy_(saved)
    model.set_output_embeddings(head)
    logger.info("ZeRO-3: %s holds its own %s, which from_pretrained had tied to the input embedding: untied", name_or_path, key)
    return True


def _saved_tensor(name_or_path: str, key: str) -> torch.Tensor | None:
    """The tensor `key` of a checkpoint (a local folder or the hub's cache: safetensors or PyTorch .bin, one
    file or shards with their index), None where it holds none."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)  # fmt: skip

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):  # fmt: skip
        index = find(index_name)
        if index:
            shard = json.loads(Path(index).read_text()).get("weight_map", {}).get(key)
            path = find(shard) if shard else None
        else:
            path = find(single)
        if path is None:
            continue
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return f.get_tensor(key) if key in f.keys() else None
        import zipfile  # (torch maps only its zip format into memory: a legacy .bin is read whole)

        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True).get(key)
    return None


def _log_replicated(ds: dict[str, Any]) -> None:
    stage = zero_stage(ds)
    logger.info(
        "ZeRO stage %d: the frozen backbone is replicated on every device (stages 1-2 partition optimizer "
        "state and gradients, which it does not have; stage 3 partitions its weights)",
        stage,
    )
    if "offload_optimizer" in ds.get("zero_optimization", {}):
        logger.info("zero_optimization.offload_optimizer has no effect: the prompts' optimizer state stays on the device")


# ---------------------------------------------------------------------------------------------------
# Data-parallel trainers (loop.Trainable wrappers)


class DataParallelParticleTrainer:
    """A ParticleTrainer whose global batch the processes of `world` share (see the module docstring)."""

    def __init__(self, trainer: ParticleTrainer, world: DeepSpeedWorld):
        self.trainer = trainer
        self.world = world

    @property
    def particles(self) -> torch.Tensor:
        return self.trainer.particles

    def train_step(self) -> dict[str, Any]:
        t = self.trainer
        shares = [self.world.share(indices) for indices in t.sampler.sample()]
        batches = make_batches(t.pm, t.tasks, [part for part, _ in shares])
        grad, losses = t.likelihood_gradient(batches, [weight for _, weight in shares])
        grad, losses = self.world.all_reduce_sum(grad), self.world.all_reduce_sum(losses)
        t.update.step(t.add_prior(-grad))
        return t.metrics(losses)

    def diagnostics(self) -> dict[str, Any]:
        return self.trainer.diagnostics()

    def after_step(self, step: int) -> dict[str, Any] | None:
        return self.trainer.after_step(step)

    def state_dict(self) -> dict[str, Any]:
        self.world.check_identical(self.trainer.particles, "particles")
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)


class DataParallelTargetTrainer:
    """A TargetTrainer whose global batch the processes of `world` share."""

    def __init__(self, trainer: TargetTrainer, world: DeepSpeedWorld):
        self.trainer = trainer
        self.world = world

    def train_step(self) -> dict[str, Any]:
        t = self.trainer
        (indices,) = t.sampler.sample()
        part, weight = self.world.share(indices)
        t.optimizer.zero_grad(set_to_none=True)
        # The KDE term is the same on every process: each adds 1/size of it.
        metrics = t.backward(part, weight=weight, prior_share=1.0 / self.world.size)
        for parameter in t.prompt.parameters():
            if parameter.grad is not None:
                parameter.grad = self.world.all_reduce_sum(parameter.grad)
        t.check_gradients()  # (the sums: every process raises, or none)
        t.optimizer.step()
        loss = torch.tensor(weight * metrics["loss"], dtype=torch.float64)
        metrics["loss"] = float(self.world.all_reduce_sum(loss))
        return metrics

    def diagnostics(self) -> dict[str, Any]:
        return self.trainer.diagnostics()

    def after_step(self, step: int) -> dict[str, Any] | None:
        return self.trainer.after_step(step)

    def current_prompt(self) -> torch.Tensor:
        return self.trainer.current_prompt()

    def final_evaluation(self, prompt: torch.Tensor) -> dict[str, Any]:
        return self.trainer.final_evaluation(prompt)

    def state_dict(self) -> dict[str, Any]:
        for name, parameter in self.trainer.prompt.named_parameters():
            self.world.check_identical(parameter, f"target prompt's {name}")
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# The run


class DeepSpeedRun(Run):
    """`Run` with the backbone under DeepSpeed and data-parallel stages; every process constructs one.

    Evaluation runs on every process (under ZeRO-3 every process takes part in every forward) on all
    evaluation examples; the first process writes the results.
    """

    def __init__(
        self,
        cfg: RunConfig,
        command: str,
        ds_config: str | Path | dict[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        backbone: Backbone | None = None,
        config_file: str | Path | None = None,
        prompt_path: str | None = None,
    ):
        """backbone: one loaded by an earlier DeepSpeedRun of this process with the same model config.
        config_file, prompt_path: as Run's."""
        world = DeepSpeedWorld()
        if cfg.model.device != "auto" and model_device(cfg.model.device).type != world.device.type:
            raise ConfigError(f"model.device={cfg.model.device}, but the DeepSpeed processes run on {world.device.type}")
        self.ds_config = read_ds_config(ds_config, cfg, world.size)
        self.backbone = backbone
        pm = backbone.pm if backbone else None
        super().__init__(cfg, command, resume=resume, overwrite=overwrite, pm=pm, world=world,
                         config_file=config_file, prompt_path=prompt_path)  # fmt: skip

    def _load_backbone(self) -> PromptedModel:
        self.backbone = Backbone(self.cfg, self.ds_config, self.world)
        return self.backbone.pm

    def initial_prompts(self, count: int, distinct: bool = True) -> torch.Tensor:
        weight = self.pm.embedding.weight  # loads the backbone first
        with self.backbone.gathered([weight]):  # init_prompts reads rows (or the std) of the whole matrix
            return super().initial_prompts(count, distinct)

    def source_trainer(self, method: str) -> tuple[DataParallelParticleTrainer, dict[str, Any]]:
        trainer, summary = super().source_trainer(method)
        return DataParallelParticleTrainer(trainer, self.world), {**summary, "processes": self.world.size}

    def target_trainer(self, method: str) -> DataParallelTargetTrainer:
        return DataParallelTargetTrainer(super().target_trainer(method), self.world)
