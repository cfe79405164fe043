"""PEFT export: `peft.PeftModel.from_pretrained` loads our prompt and computes our loss with it."""

from __future__ import annotations

import json

import pytest
import torch

from bmt_fast.transfer import read_prompt
from bmt_fast.transfer.peft_export import export_peft_prompt
from bmt_fast.transfer.prompts import IGNORE
from synthetic_tasks import TASKS

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_peft_round_trip(backbones, model_dirs, tmp_path, kind):
    pm = backbones[kind]
    prompt = torch.randn(4, pm.hidden_size)
    export_peft_prompt(
        prompt,
        tmp_path / "adapter",
        base_model_name_or_path=str(model_dirs[kind]),
        is_encoder_decoder=pm.kind == "encoder-decoder",
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    assert torch.equal(read_prompt(tmp_path / "adapter"), prompt)

    base = type(pm.model).from_pretrained(model_dirs[kind]).eval()  # PEFT wraps its own copy
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(loaded.get_prompt_embedding_to_save("default"), prompt, rtol=0, atol=0)

    examples = TASKS["movie_sentiment"].examples["validation"][:3]
    ours = pm.sequence_nll(prompt, pm.collate(pm.encode(examples)))[0]
    for i, e in enumerate(pm.encode(examples)):
        with torch.no_grad():
            theirs = peft_summed_loss(loaded, pm.kind, e)
        torch.testing.assert_close(ours[i], theirs, rtol=1e-5, atol=1e-5)


def peft_summed_loss(model, kind, encoded):
    """PEFT's own forward with labels (mean over label tokens), times the number of target tokens."""
    source = torch.tensor([encoded.input_ids])
    target = torch.tensor([encoded.target_ids])
    if kind == "encoder-decoder":
        loss = model(input_ids=source, attention_mask=torch.ones_like(source), labels=target).loss
    else:
        ids = torch.cat([source, target], dim=1)
        labels = torch.full_like(ids, IGNORE)
        labels[0, -target.shape[1] :] = target
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    return loss * target.shape[1]


def test_a_peft_seq2seq_adapter_with_its_default_two_submodules(backbones, model_dirs, tmp_path):
    """PEFT saves a seq2seq prompt-tuning adapter with num_transformer_submodules=2 by default: 2L rows, of
    which its forward puts the first L on the encoder input. read_prompt had returned all 2L as one prompt
    (another loss than PEFT's); now those L rows, and PEFT's loss with them."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    pm = backbones["t5"]
    base = type(pm.model).from_pretrained(model_dirs["t5"]).eval()
    torch.manual_seed(0)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=4))
    assert model.peft_config["default"].num_transformer_submodules == 2
    model.save_pretrained(str(tmp_path / "adapter"))
    prompt = read_prompt(tmp_path / "adapter")
    assert prompt.shape == (4, pm.hidden_size)
    examples = TASKS["movie_sentiment"].examples["validation"][:3]
    ours = pm.sequence_nll(prompt, pm.collate(pm.encode(examples)))[0]
    model.eval()
    for i, e in enumerate(pm.encode(examples)):
        with torch.no_grad():
            torch.testing.assert_close(ours[i], peft_summed_loss(model, pm.kind, e), rtol=1e-5, atol=1e-5)


def test_an_adapter_of_another_peft_method_is_refused(tmp_path):
    from bmt_fast.transfer.config import ConfigError
    from bmt_fast.transfer.peft_export import ADAPTER_WEIGHTS

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(8, 16)}, str(folder / ADAPTER_WEIGHTS))
    with pytest.raises(ConfigError, match="PREFIX_TUNING"):
        read_prompt(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}))
    with pytest.raises(ConfigError, match="8 rows"):
        read_prompt(folder)


@pytest.mark.parametrize("loaded", [True, False])
def test_export_warns_where_peft_cannot_reproduce_the_prompt(backbones, model_dirs, tmp_path, caplog, loaded):
    """Marian (like Pegasus, BlenderbotSmall, MVP) scales its encoder's token embeddings only for input_ids;
    PEFT feeds the prompt and the tokens' embeddings unscaled, so its adapter gives other results (label NLLs
    up to 1.0 apart on the tiny Marian), which the export had not said. T5 and Llama export silently. The
    export runs no forward of its own to find the scale (under ZeRO-3 only the first process exports, and
    the forwards need every process: that had hung): without a forward so far the config's flag decides."""
    from bmt_fast.transfer import Run
    from conftest import make_config

    for kind in ("marian", "t5", "llama"):
        caplog.clear()
        cfg = make_config(tmp_path / kind, model_dirs[kind], target={"methods": ["prompt_tuning"]})
        if loaded:  # (a trained backbone has found its scale at its first forward; the export runs none)
            backbones[kind].input_scale()
        run = Run(cfg, "target", pm=backbones[kind] if loaded else None)
        with caplog.at_level("WARNING", logger="bmt_fast"):
            run.export_peft(torch.randn(4, backbones[kind].hidden_size), tmp_path / kind / "peft")
        warned = [r.getMessage() for r in caplog.records if "scales its input embeddings" in r.getMessage()]
        assert len(warned) == (kind == "marian"), (kind, warned)
        if warned:
            assert ("does not reproduce" if loaded else "may not reproduce") in warned[0]
        assert read_prompt(tmp_path / kind / "peft").shape == (4, backbones[kind].hidden_size)


def test_an_exported_adapter_names_a_local_backbone_by_its_real_path(model_dirs, tmp_path, monkeypatch):
    """The adapter recorded model.name_or_path as written: a relative local folder, which
    AutoPeftModelForCausalLM.from_pretrained resolved from its own working directory (another than the
    training run's: an error, or another folder of that name). Now a local folder's real path; a hub id as it
    is."""
    import os
    import shutil

    from peft import AutoPeftModelForCausalLM

    from bmt_fast.transfer import Run
    from conftest import make_config

    shutil.copytree(model_dirs["llama"], tmp_path / "work" / "models" / "llama")
    monkeypatch.chdir(tmp_path / "work")
    run = Run(make_config(tmp_path / "run", "models/llama", target={"methods": ["prompt_tuning"]}), "target")
    prompt = torch.randn(4, 32)
    adapter = run.export_peft(prompt, tmp_path / "run" / "peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.realpath(tmp_path / "work" / "models" / "llama")
    monkeypatch.chdir(tmp_path)  # (where `models/llama` is no folder)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    torch.testing.assert_close(loaded.get_prompt_embedding_to_save("default"), prompt, rtol=0, atol=0)
    from bmt_fast.transfer.runner import peft_base_name

    assert peft_base_name("google-t5/t5-base") == "google-t5/t5-base"
