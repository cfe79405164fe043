"""Export a trained prompt as a PEFT prompt-tuning adapter (`peft.PeftModel.from_pretrained` loads it).

The folder holds PEFT's own `adapter_config.json` (written by `peft.PromptTuningConfig`) and
`adapter_model.safetensors` with the one tensor PEFT saves for prompt learning, `prompt_embeddings`
(L x hidden). Encoder-decoder models get `num_transformer_submodules=1`: the prompt goes on the encoder
input only, as in training (PEFT's default of 2 would also expect a decoder prompt).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import atomic_save_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # written by PEFT's save_pretrained


def export_peft_prompt(
    prompt: torch.Tensor,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None,
    is_encoder_decoder: bool,
    num_layers: int | None = None,
    num_attention_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    try:
        from peft import PromptTuningConfig, TaskType
    except ImportError as error:  # the `train` extra installs it
        raise ImportError("exporting a PEFT adapter needs the peft package: pip install 'bmt_fast[train]'") from error
    if prompt.dim() != 2:
        raise ValueError(f"prompt must have shape (L, hidden), got {tuple(prompt.shape)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    length, hidden = prompt.shape
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
        num_virtual_tokens=length,
        token_dim=hidden,
        num_transformer_submodules=1,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    config.save_pretrained(str(out_dir))
    atomic_save_tensors(out_dir / ADAPTER_WEIGHTS, {"prompt_embeddings": prompt.detach().to(dtype)}, {"format": "pt"})
    return out_dir
