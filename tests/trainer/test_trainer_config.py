"""Configuration: YAML + overrides, typed values, and clear errors before any work starts."""

from __future__ import annotations

import json

import pytest

from bmt_fast.cli import COMMANDS, build_parser, main, register_command
from bmt_fast.transfer.config import ConfigError, RunConfig, check_config, dump_config, load_config
from bmt_fast.transfer.runner import Run
from conftest import base_dict, make_config, merge


def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"source": {"steps": 7, "lr": "1e-3"}, "data": {"source_tasks": ["a"]}})
    cfg = load_config(
        path,
        ["source.bandwidth=0.5", "target.methods=[bmtpt, spot_best]", "source.prior_std=null", "model.name_or_path=m"],
    )
    assert isinstance(cfg, RunConfig)
    assert cfg.source.steps == 7 and cfg.source.lr == 0.001  # "1e-3" is a string to PyYAML, a number here
    assert cfg.source.bandwidth == 0.5 and cfg.source.prior_std is None
    assert cfg.target.methods == ["bmtpt", "spot_best"] and cfg.model.name_or_path == "m"
    assert load_config(None, ["source.bandwidth=median"]).source.bandwidth == "median"
    dump_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    "items, message",
    [
        (["source.stpes=3"], "unknown key.*source.stpes"),
        (["source.steps=three"], "source.steps must be an integer"),
        (["source.lr=fast"], "source.lr must be a number"),
        (["progress=maybe"], "progress must be true or false"),
        (["source"], "must look like section.key=value"),
        (["source.lr=[1,"], r"override 'source.lr=\[1,': the value is not valid YAML"),
    ],
)
def test_malformed_configs(items, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, items)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_file_that_is_not_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("source: {steps: 3\ntarget: [")
    with pytest.raises(ConfigError, match="run.yaml is not valid YAML"):
        load_config(tmp_path / "run.yaml")


def test_a_key_given_twice_is_a_config_error(tmp_path):
    """YAML forbids a key twice in one mapping; PyYAML kept the last, so a second `source:` section (appended
    to a config) replaced the whole first one silently: its num_particles and lr went back to the defaults."""
    (tmp_path / "run.yaml").write_text("source:\n  num_particles: 3\n  lr: 0.05\nseed: 1\nsource:\n  steps: 2\n")
    with pytest.raises(ConfigError, match="the key 'source' is given twice in one mapping \\(lines 1 and 5\\)"):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("source:\n  steps: 2\n  steps: 3\n")
    with pytest.raises(ConfigError, match="the key 'steps' is given twice"):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("source: {steps: 2, steps: 3}\n")  # (one line)
    with pytest.raises(ConfigError, match="the key 'steps' is given twice in one mapping \\(lines 1 and 1\\)"):
        load_config(tmp_path / "run.yaml")
    # merge keys are no duplicates, and a key of the mapping overrides a merged one, as YAML has it (the
    # duplicate check had refused every `<<: *anchor`)
    (tmp_path / "run.yaml").write_text("source: &stage\n  steps: 2\n  lr: 0.5\ntarget:\n  <<: *stage\n  steps: 7\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.source.steps, cfg.source.lr, cfg.target.steps, cfg.target.lr) == (2, 0.5, 7, 0.5)
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):  # (in an override's value too)
        load_config(None, ["source={lr: 1, lr: 2}"])
    # an unhashable key: YAML's own error, as a ConfigError (it had been a TypeError's traceback)
    (tmp_path / "run.yaml").write_text("? [a]\n: 1\n")
    with pytest.raises(ConfigError, match="(?s)is not valid YAML: .*found unhashable key"):
        load_config(tmp_path / "run.yaml")


def test_an_override_into_an_empty_section(tmp_path):
    """`source:` with nothing under it is null in YAML, which from_dict reads as the defaults: an override
    into it had been refused ("'source' is not a section") where the same override without the line worked."""
    (tmp_path / "run.yaml").write_text("source:\n# steps: 3\nmodel: {name_or_path: m}\n")
    cfg = load_config(tmp_path / "run.yaml", ["source.steps=5", "source.lr=0.5"])
    assert (cfg.source.steps, cfg.source.lr, cfg.model.name_or_path) == (5, 0.5, "m")
    assert cfg.source.num_particles == RunConfig().source.num_particles  # (the other keys: the defaults)
    (tmp_path / "run.yaml").write_text("source: 3\n")
    with pytest.raises(ConfigError, match="'source' is not a section"):  # (a value there is still refused)
        load_config(tmp_path / "run.yaml", ["source.steps=5"])


def test_a_folder_setting_under_home(tmp_path, monkeypatch):
    """`~` in a folder setting is the home folder, as in a shell (transformers had taken `~/models/t5` for a
    malformed hub id after the checks had found the folder)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["model.name_or_path=~/models/t5", "model.tokenizer=~/tok", "data.data_dir=~/data",
                             "output_dir=~/runs/a"])  # fmt: skip
    assert cfg.model.name_or_path == str(tmp_path / "models/t5") and cfg.model.tokenizer == str(tmp_path / "tok")
    assert cfg.data.data_dir == str(tmp_path / "data") and cfg.output_dir == str(tmp_path / "runs/a")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"source": {"num_particles": 0}}, "source.num_particles must be >= 1"),
        ({"seed": 2**64}, r"seed must be in \[0, 2\*\*63\), got 18446744073709551616"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*63\), got -1"),
        ({"prompt": {"length": 0}}, "prompt.length must be >= 1"),
        ({"source": {"lr": 0.0}}, "source.lr must be > 0"),
        ({"source": {"lr": float("inf")}}, "source.lr must be > 0 and finite, got inf"),
        ({"target": {"kde_weight": float("nan")}}, "target.kde_weight must be a finite number >= 0"),
        ({"source": {"backend": "bogus"}}, "source.backend must be one of auto, torch"),
        ({"data": {"eval_split": "test"}}, "data.eval_split: task 'product_sentiment' has no split 'test'"),
        ({"target": {"lr": -1.0}}, "target.lr must be > 0"),
        ({"target": {"lowrank_lr": 0.0}}, "target.lowrank_lr must be > 0"),
        ({"source": {"sampling": "random"}}, "source.sampling must be one of proportional, uniform"),
        ({"source": {"likelihood_scale": "exact"}}, "source.likelihood_scale must be one of mean, dataset, batch"),
        ({"source": {"likelihood_scale": -2.0}}, "source.likelihood_scale must be > 0"),
        ({"source": {"bandwidth": -1.0}}, "source.bandwidth must be > 0"),
        # below the smallest normal number of the arithmetic they are used in, 1/H overflows: the SVGD step
        # (float32 prompts) and the KDE prior (float64) had refused them only once training reached them
        ({"source": {"bandwidth": 1e-39}}, r"source.bandwidth: bandwidth 1e-39 is below the smallest normal torch.float32 number \(1.17549e-38\)"),
        ({"target": {"kde_bandwidth": 1e-320, "kde_weight": 0.5}}, r"target.kde_bandwidth: bandwidth 9.99989e-321 is below the smallest normal torch.float64 number \(2.22507e-308\)"),
        ({"source": {"prior_std": 0.0}}, "source.prior_std must be > 0"),
        ({"model": {"dtype": "float8"}}, "model.dtype must be one of"),
        ({"target": {"methods": ["bmtpt", "magic"]}}, r"target.methods\[1\] must be one of"),
        (
            {"target": {"particle_index": 3, "methods": ["bmtpt_particle"]}},
            "particle_index=3 but source.num_particles=3",
        ),
        ({"target": {"kde_weight": 1.0, "methods": ["multitask"]}}, "needs >= 2 source particles"),
        ({"data": {"source_tasks": ["movie_sentiment", "nope"]}}, "data.source_tasks: unknown task 'nope'"),
        ({"data": {"target_task": "nope"}}, "data.target_task: unknown task 'nope'"),
        ({"data": {"source_tasks": []}}, "data.source_tasks must name at least one task"),
        ({"data": {"task_modules": ["no_such_module_xyz"]}}, "cannot import 'no_such_module_xyz'"),
        ({"model": {"name_or_path": "./missing-model"}}, "model.name_or_path: folder not found"),
        ({"model": {"name_or_path": "some-org/some-model"}}, "neither a local folder nor in the Hugging Face cache"),
        ({"model": {"gguf_file": "model.gguf"}}, "model.gguf_file: model.gguf not found"),
        ({"model": {"tokenizer": "./missing-tokenizer"}}, "model.tokenizer: folder not found"),
        ({"data": {"data_dir": "./missing-data"}}, "data.data_dir: folder not found"),
        # what the tokenizer cannot serve (ids 0-3 of the tiny tokenizers are special): it had been found when
        # the first stage drew its initial prompts, after --overwrite had removed the stages
        ({"prompt": {"vocab_top_k": 4}}, r"prompt.vocab_top_k=4: no token left .* the first 4 ids"),
    ],
)
def test_bad_configs_fail_before_any_work(model_dirs, tmp_path, changes, message):
    cfg = make_config(tmp_path / "run", model_dirs["llama"], **changes)
    with pytest.raises(ConfigError, match=message):
        Run(cfg, "transfer")
    assert not (tmp_path / "run").exists()  # nothing was written, no model was loaded


def _rte_files(folder, train=None, validation=None):
    """<folder>/rte/{train,validation}.jsonl in the hub's schema (rows, or the text of the file)."""
    row = {"sentence1": "A man sleeps.", "sentence2": "A man is awake.", "label": 1, "idx": 0}
    (folder / "rte").mkdir(parents=True)
    for split, content in (("train", train), ("validation", validation)):
        if content is None:
            content = [row]
        if content is not False:
            text = content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content)
            (folder / "rte" / f"{split}.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize(
    "files, message",
    [
        ({"train": [{"sentence1": "a", "label": 0}]}, r"data.target_task: .*missing column\(s\) \['sentence2'\]"),
        ({"train": ""}, "data.target_task: task 'rte', split 'train': .*train.jsonl is empty"),
        ({"validation": False}, "data.eval_split: no validation file for task 'rte'"),
        # every row is read (a malformed last line, an unlabelled split) before anything trains: these were
        # found only when the target stage loaded them, after the source stage had trained
        ({"train": '{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}\n{oops\n'},
         r"data.target_task: rte train \(.*rte/train.jsonl\): DatasetGenerationError"),
        ({"validation": [{"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0}]},
         r"data.eval_split: task 'rte', split 'validation' \(.*rte/validation.jsonl\): 1 of 1 examples have no label"),
        ({"train": [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0},
                    {"sentence1": "c", "sentence2": "d", "label": -1, "idx": 1}]},
         r"data.target_task: task 'rte', split 'train' \(.*rte/train.jsonl\): 1 of 2 examples have no label \(label -1, "
         r"or no answers: a hidden test split\?\), the first example 1 of the split \(0-based\), input 'rte sentence1: c"),
        ({"validation": [{"sentence1": None, "sentence2": "b", "label": 0, "idx": 0}]},
         # (the file and the row named: the messages had named only the task and split)
         r"data.eval_split: rte validation \(.*rte/validation.jsonl\): row 1: task 'rte': column 'sentence1' is null"),
    ],
)
def test_target_data_files_are_checked_before_the_source_stage_trains(model_dirs, tmp_path, files, message):
    data = _rte_files(tmp_path / "data", **files)
    cfg = make_config(tmp_path / "run", model_dirs["llama"], data={"target_task": "rte", "data_dir": str(data)})
    with pytest.raises(ConfigError, match=message):
        Run(cfg, "transfer")
    assert not (tmp_path / "run").exists()
    check_config(cfg, "source")  # the source stage does not read the target task


def test_eval_and_target_read_only_the_target_tasks_data(model_dirs, tmp_path):
    """`eval` checks (and reads) the target's evaluation split only, and `target` the target's splits only
    (it uses finished source stages as they are): a folder without the source tasks' files evaluates a
    finished run and trains its target stage (both were refused for a missing mnli train file)."""
    data = _rte_files(tmp_path / "data")
    cfg = make_config(tmp_path / "run", model_dirs["llama"],
                      data={"source_tasks": ["mnli"], "target_task": "rte", "data_dir": str(data)})  # fmt: skip
    check_config(cfg, "eval")
    check_config(cfg, "target")
    with pytest.raises(ConfigError, match="data.source_tasks: no train file for task 'mnli'"):
        check_config(cfg, "transfer")


def test_target_needs_finished_source_stages(model_dirs, tmp_path):
    cfg = make_config(tmp_path, model_dirs["llama"], target={"methods": ["prompt_tuning", "spot_mean"]})
    with pytest.raises(ConfigError, match="target needs the spot source particles"):
        Run(cfg, "target")
    check_config(make_config(tmp_path, model_dirs["llama"], target={"methods": ["prompt_tuning"]}), "target")


def test_cli_reports_config_errors_with_exit_code_2(model_dirs, tmp_path, capsys):
    data = merge(base_dict(tmp_path / "run", model_dirs["llama"]), {"source": {"num_particles": 0}})
    path = write_yaml(tmp_path / "bad.yaml", data)
    assert main(["source", "--config", str(path)]) == 2
    assert "source.num_particles must be >= 1" in capsys.readouterr().err
    assert main(["source", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["source", "--config", str(path), "source.num_particles=2", "prompt.length=-1"]) == 2
    assert "prompt.length must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_commands_are_a_registry():
    assert {"source", "target", "transfer", "eval", "plot"} <= set(COMMANDS)

    @register_command("hello-test", "a command added by another module")
    def hello(args):
        return 7

    try:
        assert main(["hello-test"]) == 7
        with pytest.raises(ValueError, match="already registered"):
            register_command("hello-test", "again")(hello)
        assert "hello-test" in build_parser().format_help()
    finally:
        del COMMANDS["hello-test"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_config_error(model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        Run(make_config(tmp_path, model_dirs["llama"], model={"device": "cuda"}), "source")


def test_a_decoder_only_backbone_must_hold_the_runs_longest_sequence(model_dirs, tmp_path):
    """prompt + input + the longer of target and generated answer beyond the model's position limit (the tiny
    Llama's 256) is a configuration error before the weights load (GPT-2's learned positions had raised an
    IndexError inside the forward)."""
    from bmt_fast.transfer import load_backbone

    cfg = make_config(tmp_path / "run", model_dirs["llama"], prompt={"length": 240})  # 240 + 32 + max(8, 16)
    with pytest.raises(ConfigError, match="= 288 positions, but .* takes at most 256: shorten them"):
        load_backbone(cfg)
    load_backbone(make_config(tmp_path / "run", model_dirs["llama"], prompt={"length": 208}))  # 256: fits


def test_an_encoder_decoder_backbone_with_learned_positions_must_hold_its_sequences(model_dirs, tmp_path):
    """Encoder-decoder models with absolute positions (BART's learned ones; T5's relative ones have no limit):
    the encoder's prompt + input and the decoder's target within max_position_embeddings, checked before the
    weights load (the check had skipped every encoder-decoder model: BART raised an IndexError in the forward)."""
    from transformers import BartConfig

    from bmt_fast.transfer import load_backbone

    folder = tmp_path / "bart"
    BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
               max_position_embeddings=30).save_pretrained(folder)  # fmt: skip
    with pytest.raises(ConfigError, match=r"max_source_length = 36 \(the encoder's\) positions, .* at most 30"):
        load_backbone(make_config(tmp_path / "run", folder))  # prompt 4 + input 32
    with pytest.raises(ConfigError, match=r"max_new_tokens\) = 40 \(the decoder's\) positions"):
        load_backbone(make_config(tmp_path / "run", folder, model={"max_source_length": 20},
                                  target={"max_new_tokens": 40}))  # fmt: skip


def test_a_vocab_top_k_of_special_tokens_only_is_a_config_error(model_dirs, tmp_path):
    """prompt.vocab_top_k that leaves no ordinary token (the tiny tokenizer's ids 0-3 are special) is reported as
    the setting it is (exit 2 from the CLI), not a traceback: by Run before anything is written (from the
    tokenizer; test_bad_configs_fail_before_any_work), and by the init itself for its other callers."""
    cfg = make_config(tmp_path / "run", model_dirs["llama"], prompt={"vocab_top_k": 4})
    with pytest.raises(ConfigError, match="prompt.vocab_top_k=4: no token left .* raise it"):
        Run(cfg, "source")
    check_config(cfg, "eval")  # (eval draws no initial prompts)
    cfg.prompt.vocab_top_k = 6  # (ids 4 and 5: 3 distinct particles of 4 tokens)
    run = Run(cfg, "source")
    run.cfg.prompt.vocab_top_k = 4
    with pytest.raises(ConfigError, match="prompt.vocab_top_k=4: no token left .* raise it"):
        run.initial_prompts(2)


def test_offline_a_hub_split_is_loaded_before_anything_trains(model_dirs, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE without data.data_dir: a hub split the local cache lacks had failed only when its stage
    loaded it (a hub target task after the source stages trained). Offline it loads up front, from the cache;
    online it is still read when the run loads it."""
    import datasets

    loads = []

    def offline(*args, **kwargs):
        loads.append(args)
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = make_config(tmp_path / "run", model_dirs["llama"], data={"target_task": "rte"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"data.target_task: rte train: task 'rte': could not load nyu-mll/glue .*"
                                          r"data.data_dir=DIR"):  # fmt: skip
        Run(cfg, "transfer")
    assert not (tmp_path / "run").exists()
    check_config(cfg, "source")  # (the source stage reads no target split)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # (datasets' own switch too)
    with pytest.raises(ConfigError, match="data.target_task: rte train: task 'rte': could not load"):
        check_config(cfg, "target")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    loads.clear()
    check_config(cfg, "transfer")  # online: nothing loaded here
    assert not loads


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_a_max_target_length_that_cuts_a_label_word_is_a_config_error(model_dirs, tmp_path, kind):
    """model.max_target_length below a label word's tokens (with EOS): the words had been cut silently (at 1,
    every class was only its EOS, the same NLL for all, argmin class 0). Now a configuration error naming the
    longest word of all the tasks the command reads and the length it needs, before anything is written (from
    the tokenizer alone; `transfer` had found the target task's only after training its source stages, and a
    longer max_target_length then could not resume them), and in evaluate_prompt."""
    from bmt_fast.transfer import load_backbone
    from bmt_fast.transfer.evaluate import evaluate_prompt
    from synthetic_tasks import TASKS

    tokenizer = load_backbone(make_config(tmp_path / "unused", model_dirs[kind])).tokenizer
    prefix = " " if kind == "llama" else ""

    def needed(name):
        return max(len(tokenizer(prefix + w, add_special_tokens=False)["input_ids"]) + 1 for w in TASKS[name].label_words)

    read = {"source": ["movie_sentiment", "topic"], "eval": ["product_sentiment"]}
    read["transfer"] = read["source"] + read["eval"]
    for command, names in read.items():
        longest = max(names, key=needed)  # (the first of equals, as the check reports it)
        cfg = make_config(tmp_path / command, model_dirs[kind], model={"max_target_length": 1})
        with pytest.raises(ConfigError, match=rf"max_target_length=1 cuts .*task '{longest}'.*at least {needed(longest)}$"):
            Run(cfg, command)
        assert not (tmp_path / command).exists()  # nothing written, nothing trained
    enough = max(needed(name) for name in read["transfer"])
    run = Run(make_config(tmp_path / "run", model_dirs[kind], model={"max_target_length": enough}), "transfer")
    task = TASKS["movie_sentiment"]
    run.pm.max_target_length = 1
    with pytest.raises(ConfigError, match="raise it to at least"):
        evaluate_prompt(run.pm, run.initial_prompts(1)[0], task, task.examples["validation"][:2], batch_size=4)


def test_a_mapping_override_merges_into_its_section(tmp_path):
    """`source={steps: 3}` sets source.steps and keeps the section's other keys, as Hydra's overrides do (it
    had replaced the section: the YAML's lr went back to its default); nested mappings merge too, other
    values (a list, a scalar, null) replace."""
    (tmp_path / "run.yaml").write_text("source: {steps: 2, lr: 0.5}\ndata: {source_tasks: [a, b]}\n")
    cfg = load_config(tmp_path / "run.yaml", ["source={steps: 3, num_particles: 6}", "data={source_tasks: [c]}"])
    assert (cfg.source.steps, cfg.source.lr, cfg.source.num_particles) == (3, 0.5, 6)
    assert cfg.data.source_tasks == ["c"]
    cfg = load_config(tmp_path / "run.yaml", ["source={}"])
    assert (cfg.source.steps, cfg.source.lr) == (2, 0.5)  # (an empty mapping changes nothing)
    cfg = load_config(tmp_path / "run.yaml", ["source="])  # (null: the section's defaults, as in YAML)
    assert (cfg.source.steps, cfg.source.lr) == (RunConfig().source.steps, RunConfig().source.lr)
    with pytest.raises(ConfigError, match="unknown key\\(s\\) source.stepz"):
        load_config(tmp_path / "run.yaml", ["source={stepz: 3}"])
    # a section that is a YAML alias of another is a copy: an override of one leaves the other as written
    (tmp_path / "run.yaml").write_text("source: &opt {steps: 2, lr: 0.5}\ntarget: *opt\n")
    for override in ("source={steps: 3}", "source.steps=3"):
        cfg = load_config(tmp_path / "run.yaml", [override])
        assert (cfg.source.steps, cfg.target.steps, cfg.target.lr) == (3, 2, 0.5), override


def test_a_model_or_tokenizer_path_that_is_none_is_a_one_line_config_error(model_dirs, tmp_path, capsys, monkeypatch):
    """A model.name_or_path or model.tokenizer that exists but is no model or tokenizer (an empty folder, a YAML
    file given by mistake) had been a traceback (exit 1) from transformers when the run read the backbone's
    config: a ValueError "Unrecognized model", an OSError "not a valid JSON file", for an empty tokenizer
    folder a message about sentencepiece. Now a ConfigError that names the setting and the first line of
    transformers' message, before anything is written; so is a folder without weights (when they load) and
    a hub id that cannot be fetched (no network)."""
    import shutil

    import transformers

    from bmt_fast.transfer import load_backbone

    empty = tmp_path / "empty"
    empty.mkdir()
    not_a_model = write_yaml(tmp_path / "run.yaml", {"seed": 0})
    for model, message in (
        ({"name_or_path": str(empty)}, f"model.name_or_path: cannot load {empty} as a model: Unrecognized model in "),
        ({"name_or_path": str(not_a_model)},
         rf"model.name_or_path: cannot load {not_a_model} as a model: It looks like the config file at .* is not a "
         r"valid JSON file.$"),
        ({"tokenizer": str(empty)},
         rf"model.tokenizer: cannot load {empty} as a tokenizer: the folder holds no tokenizer files \(.*\)$"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            Run(make_config(tmp_path / "run", model_dirs["llama"], model=model), "source")
        assert not (tmp_path / "run").exists()
    path = write_yaml(tmp_path / "cli.yaml", base_dict(tmp_path / "run", model_dirs["llama"]))
    for override in (f"model.name_or_path={empty}", f"model.tokenizer={empty}"):
        assert main(["source", "--config", str(path), override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bmt-fast source: error: model.") and err.count("\n") == 1, err
    no_weights = tmp_path / "no_weights"
    shutil.copytree(model_dirs["llama"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ConfigError, match=f"model.name_or_path: cannot load {no_weights} as AutoModelForCausalLM: "):
        load_backbone(make_config(tmp_path / "run", no_weights))
    # ... and found before --overwrite removes a finished stage (the load had failed after it)
    assert main(["source", "--config", str(path), "source.steps=1"]) == 0
    assert main(["source", "--config", str(path), "source.steps=1", f"model.name_or_path={no_weights}", "--overwrite"]) == 2
    assert f"model.name_or_path: {no_weights} holds no weights" in capsys.readouterr().err
    assert (tmp_path / "run" / "source-bmtpt" / "particles.safetensors").exists()

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # (online: a hub id is checked for its form only)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    with pytest.raises(ConfigError, match="model.name_or_path: cannot load some-org/some-model as a model: We couldn't "
                                          "connect to 'https://huggingface.co' to load the files.$"):  # fmt: skip
        Run(make_config(tmp_path / "run", "some-org/some-model"), "source")


def test_model_device_is_a_device_torch_has(model_dirs, tmp_path, monkeypatch):
    """model.device had been checked for how it starts ("cuda..."): `cudax`, `cuda:-1` and `cuda:0:1` passed
    the checks and failed when the model moved (torch.device's RuntimeError), and so did `cuda:7` on a machine
    with one GPU. Now parsed by torch.device, and an index checked against the CUDA devices torch sees, before
    anything is written (a machine with one GPU, simulated)."""
    import torch

    from bmt_fast.transfer.config import check_values, model_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cudax", "cuda:-1", "cuda:0:1", "mps", "gpu"):
        with pytest.raises(ConfigError, match=f"model.device must be auto, cpu, cuda or cuda:N, got '{device}'$"):
            Run(make_config(tmp_path / "run", model_dirs["llama"], model={"device": device}), "source")
    with pytest.raises(ConfigError, match=r"model.device=cuda:7 but torch sees 1 CUDA device\(s\): cuda:0$"):
        Run(make_config(tmp_path / "run", model_dirs["llama"], model={"device": "cuda:7"}), "source")
    assert not (tmp_path / "run").exists()
    for device in ("auto", "cpu", "cuda", "cuda:0"):
        check_values(make_config(tmp_path / "run", model_dirs["llama"], model={"device": device}))
    assert model_device("auto") == torch.device("cuda") and model_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_values(make_config(tmp_path / "run", model_dirs["llama"], model={"device": "cuda:1"}))
    with pytest.raises(ConfigError, match=r"torch sees 2 CUDA device\(s\): cuda:0 to cuda:1$"):
        check_values(make_config(tmp_path / "run", model_dirs["llama"], model={"device": "cuda:2"}))


def test_a_backend_that_does_not_run_on_the_models_device_is_a_config_error(model_dirs, tmp_path, monkeypatch):
    """source.backend had been checked for running in the process, not where the particles live (the model's
    device): `backend=cpu` with a CUDA model, or `cuda` with a CPU one, passed the checks and failed at the
    first SVGD step with the op's ValueError (after --overwrite had removed the stages). Now refused before
    anything is written, the device resolved as the run resolves it (auto: CUDA where there is one).
    Simulated: a machine with one GPU, where the CPU and CUDA extensions are built."""
    import torch

    from bmt_fast import backends
    from bmt_fast.transfer.config import check_values

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("cpu", "cuda"):
        monkeypatch.setattr(backends.get(name), "unavailable_reason", lambda: "")
    for backend, device, where in (("cpu", "cuda", "cuda"), ("cpu", "auto", "cuda"), ("cuda", "cpu", "cpu")):
        cfg = make_config(tmp_path / "run", model_dirs["llama"], model={"device": device}, source={"backend": backend})
        message = f"source.backend={backend} does not run on {where}, where model.device={device} puts the particles"
        with pytest.raises(ConfigError, match=message + "; choose auto or one of: torch, "):
            Run(cfg, "source")
        assert not (tmp_path / "run").exists()
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda:0"), ("cuda", "auto"), ("torch", "cuda"), ("auto", "cpu")):
        cfg = make_config(tmp_path / "run", model_dirs["llama"], model={"device": device}, source={"backend": backend})
        check_values(cfg)


def test_a_vocab_top_k_too_small_for_distinct_particles_is_a_config_error(model_dirs, tmp_path):
    """prompt.vocab_top_k that leaves one ordinary token (id 4 of the tiny tokenizer) had passed (only none was
    refused): every SVGD particle then started as the same prompt, and identical particles have the same
    scores and kernel rows, so they never separate: M particles trained as one, silently. Now refused before
    anything is written where the tokens cannot make the particles differ, or where the seed's draw did not
    (and by the init itself, for its other callers); one prompt (prompt_tuning, multitask) or SPoT's (one per
    task, trained apart) needs no second token."""
    import torch

    from bmt_fast.transfer.prompts import init_prompts

    def config(**changes):
        return make_config(tmp_path / "run", model_dirs["llama"], **changes)

    for command in ("source", "transfer"):
        message = r"prompt.vocab_top_k=5: 1 token\(s\) to initialise prompts from .* cannot make 3 distinct particles"
        with pytest.raises(ConfigError, match=message + r" of 4 token\(s\).*raise it"):
            Run(config(prompt={"vocab_top_k": 5}), command)
    with pytest.raises(ConfigError, match=r"vocab_top_k=6: 2 token\(s\) .* cannot make 3 distinct particles of 1 "):
        Run(config(prompt={"vocab_top_k": 6, "length": 1}), "source")
    short = {"prompt": {"vocab_top_k": 7, "length": 2}, "source": {"num_particles": 2}}
    with pytest.raises(ConfigError, match="vocab_top_k=7: the 2 particles drawn from 3 tokens with this seed include "
                                          "identical ones, which never separate under SVGD"):  # fmt: skip
        Run(config(**short), "source")  # (seed 0 draws tokens [2, 0] twice)
    with pytest.raises(ConfigError, match=r"prompt.init=vocab: 156 token\(s\) .* cannot make 157 distinct particles "
                                          r"of 1 token\(s\).*; use prompt.init=normal$"):  # fmt: skip
        Run(config(prompt={"length": 1}, source={"num_particles": 157}), "source")  # (the whole tiny vocabulary)
    assert not (tmp_path / "run").exists()
    particles = Run(config(**short, seed=1), "source").initial_prompts(2)
    assert not torch.equal(particles[0], particles[1])
    # one prompt, or SPoT's prompts (trained apart): no second token needed
    Run(config(prompt={"vocab_top_k": 5}, target={"methods": ["prompt_tuning"]}), "target")
    Run(config(prompt={"vocab_top_k": 5}, source={"method": "spot"}), "source").source_trainer("spot")
    weight = torch.randn(10, 8)
    with pytest.raises(ConfigError, match="prompt.vocab_top_k=5: 1 token"):
        init_prompts(weight, 2, 4, vocab_top_k=5, exclude_ids=[0, 1, 2, 3])
    assert init_prompts(weight, 2, 4, vocab_top_k=5, exclude_ids=[0, 1, 2, 3], distinct=False).shape == (2, 4, 8)
