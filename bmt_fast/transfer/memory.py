"""Memory per GPU of a BMTPT run under DeepSpeed, COMPUTED from parameter counts (not measured).

    python -m bmt_fast.transfer.memory                    # the README table: T5-XXL, a 7B and a 70B model
    python -m bmt_fast.transfer.memory --config path/to/config.json --gpus 8 --particles 5 --prompt-length 100

Per GPU, in bytes, with P backbone parameters of b bytes each (bf16: 2), W GPUs (one process each),
and N = M * L * hidden prompt-particle elements (M particles of L tokens; float32):

    backbone    ZeRO-0/1/2: P*b (replicated: stages 1-2 partition optimizer state and gradients, which
                a frozen backbone does not have); ZeRO-3: P*b / W; ZeRO-3 + offload_param: 0 on the GPU
                (P*b / W of CPU memory per process)
    particles   4N     every process holds all M particles (SVGD couples them all)
    optimizer   8N     Adam's two moments (Adagrad: 4N)
    gradients   12N    transient: the likelihood gradient, the score, phi
    gathered    ZeRO-3 (also with offload_param): G*b, G the largest layer's own parameters (the 70B's
                embedding or head: 1.05B), which DeepSpeed gathers whole before the layer runs

Not included: activations (M x B sequences of L + T tokens through the backbone, with B examples per
task and process), and under ZeRO-3 the further parameters prefetched ahead of the layer that runs (up to
stage3_max_live_parameters * b; the prefetch bucket), and the embedding matrix once, when the prompts are
initialised. Parameter counts come from the models' configs, built on the meta device (no weights are
read); a config with tie_word_embeddings false counts its output embedding apart, as the checkpoint holds
it (transformers 5 builds T5 with lm_head tied to the shared embedding whatever the config says, and
loads T5 v1.1's separate lm_head untied).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES = {"adam": 8, "adagrad": 4}  # optimizer state per float32 prompt element
PARTICLE_BYTES = 4
GRADIENT_BYTES = 12
STAGES = ("0-2", "3", "3+offload")

# Public config.json values of the README's reference models (the fields that set the parameter count).
REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "T5-XXL (t5-v1_1-xxl)": {
        "model_type": "t5",
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
    "7B decoder-only (Llama-2-7b)": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "70B decoder-only (Llama-3.1-70B)": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}


@dataclass(frozen=True)
class Footprint:
    """Bytes per GPU of one configuration (see the module docstring for the formulas)."""

    backbone: int
    particles: int
    optimizer: int
    gradients: int
    host_backbone: int = 0  # CPU memory per process (offload_param)
    gathered: int = 0  # ZeRO-3: the largest layer, gathered whole while it runs

    @property
    def total(self) -> int:
        """GPU bytes (host_backbone is CPU memory)."""
        return self.backbone + self.particles + self.optimizer + self.gradients + self.gathered


def footprint(
    parameters: int,
    hidden: int,
    *,
    stage: str,
    gpus: int,
    particles: int,
    prompt_length: int,
    dtype: str = "bfloat16",
    optimizer: str = "adam",
    largest_layer: int = 0,
) -> Footprint:
    """largest_layer: the parameters of the backbone's largest layer (count_parameters), gathered whole
    under ZeRO-3."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if gpus < 1 or particles < 1 or prompt_length < 1 or parameters < 1 or hidden < 1:
        raise ValueError("parameters, hidden, gpus, particles and prompt_length must be positive")
    if not 0 <= largest_layer <= parameters:
        raise ValueError(f"largest_layer must be in [0, parameters], got {largest_layer}")
    b = BYTES_PER_DTYPE[dtype]
    weights = parameters * b
    shard = -(-weights // gpus)
    backbone, host = {"0-2": (weights, 0), "3": (shard, 0), "3+offload": (0, shard)}[stage]
    gathered = 0 if stage == "0-2" else largest_layer * b
    n = particles * prompt_length * hidden
    return Footprint(
        backbone, PARTICLE_BYTES * n, OPTIMIZER_BYTES[optimizer] * n, GRADIENT_BYTES * n, host, gathered
    )


def count_parameters(config: dict[str, Any]) -> tuple[int, int]:
    """(parameters, hidden size) of a Hugging Face config dict, by building the model on the meta device."""
    return model_sizes(config)[:2]


def model_sizes(config: dict[str, Any]) -> tuple[int, int, int]:
    """(parameters, hidden size, the largest layer's own parameters) of a Hugging Face config dict, by
    building the model on the meta device. An output embedding that the built model ties to the input one
    while the config says tie_word_embeddings false counts apart (T5 v1.1: transformers 5 ties T5's lm_head
    whatever the config says, and loads a checkpoint's separate lm_head untied; 11.00B had been counted for
    T5-XXL, whose checkpoint holds 11.14B)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    fields = dict(config)
    if "model_type" not in fields:
        raise ValueError("the model config has no model_type (a Hugging Face config.json names one)")
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cls = AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(hf_config)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    count = sum(p.numel() for p in model.parameters())
    layers = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    if config.get("tie_word_embeddings") is False and outputs is not None and outputs.weight is inputs.weight:
        count += outputs.weight.numel()
    return count, inputs.embedding_dim, max(layers)


def table(
    models: dict[str, dict[str, Any]],
    *,
    gpus: int,
    particles: int,
    prompt_length: int,
    dtype: str = "bfloat16",
    optimizer: str = "adam",
) -> str:
    """A Markdown table: one row per (model, ZeRO stage), GiB per GPU (and CPU memory per process)."""
    header = (
        f"| model (parameters, hidden) | ZeRO stage | backbone | {particles} particles | {optimizer} state "
        "| gradients (transient) | largest layer gathered | total per GPU | backbone in CPU memory per process |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, config in models.items():
        count, hidden, largest = model_sizes(config)
        for stage in STAGES:
            f = footprint(
                count,
                hidden,
                stage=stage,
                gpus=gpus,
                particles=particles,
                prompt_length=prompt_length,
                dtype=dtype,
                optimizer=optimizer,
                largest_layer=largest,
            )
            cells = [f.backbone, f.particles, f.optimizer, f.gradients, f.gathered, f.total, f.host_backbone]
            label = f"{name} ({count / 1e9:.2f}B, {hidden})"
            lines.append(f"| {label} | {stage} | " + " | ".join(_gib(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _gib(value: int) -> str:
    if value == 0:
        return "0"
    return f"{value / GIB:.3f}" if value < GIB else f"{value / GIB:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmt_fast.transfer.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a model's config.json (default: the README's reference models)")
    parser.add_argument("--gpus", type=_positive, default=8, help="processes, one GPU each (default 8)")
    parser.add_argument("--particles", type=_positive, default=5, help="M (default 5)")
    parser.add_argument("--prompt-length", type=_positive, default=100, help="L (default 100)")
    parser.add_argument("--dtype", choices=sorted(BYTES_PER_DTYPE), default="bfloat16")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_BYTES), default="adam")
    args = parser.parse_args(argv)
    models = REFERENCE_MODELS
    if args.config:  # (a folder, no JSON, no model_type: argparse's one-line error, not a traceback)
        path = Path(args.config)
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            parser.error(f"--config {path}: not a readable config.json ({error})")
        if not isinstance(config, dict) or "model_type" not in config:
            parser.error(f"--config {path}: a Hugging Face config.json (a JSON object naming its model_type)")
        models = {path.parent.name or args.config: config}
    print(
        f"Computed from parameter counts, not measured: GiB per GPU, {args.gpus} GPUs, {args.dtype} backbone, "
        f"M={args.particles} particles of L={args.prompt_length} tokens (float32). Activations and ZeRO-3's "
        "prefetched parameters beyond the layer that runs are not included.\n"
    )
    sizes = {"gpus": args.gpus, "particles": args.particles, "prompt_length": args.prompt_length}
    print(table(models, **sizes, dtype=args.dtype, optimizer=args.optimizer), end="")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
