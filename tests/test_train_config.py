"""Tests for the run configuration: precedence, typed overrides, errors, round trip."""

from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest
import yaml

from longtune.api import finetune
from longtune.model.args import ATTENTION_BACKENDS
from longtune.train.config import (
    FLAG_ALIASES,
    LORA_TARGETS,
    SETTINGS,
    ConfigError,
    Duration,
    JobConfig,
    LoraConfig,
    ModelConfig,
    choices,
    config_from_values,
    config_to_dict,
    flag_parser,
    flag_values,
    flat_settings,
    load_config,
    resolve_grad_accum,
    save_config,
)
from longtune.train.preflight import check_resume_config

REQUIRED = ["--model=/models/llama", "--data=train.jsonl"]


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_with_only_required_keys():
    cfg = load_config(None, REQUIRED)
    assert cfg.model.path == "/models/llama"
    assert cfg.data.train == ["train.jsonl"]
    assert cfg.data.eval == []
    assert cfg.optim.lr == 1e-5
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.duration == Duration(1, "ep")
    assert cfg.parallel.dp == -1
    assert cfg.checkpoint.resume == "auto"
    assert cfg.output.tensorboard is False


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "model": {"path": "/from/file"},
            "data": {"train": ["a.jsonl"], "context_length": 4096},
            "optim": {"lr": "2e-5", "schedule": "linear"},  # PyYAML reads 2e-5 as a string
        },
    )
    cfg = load_config(path, ["--optim.lr=3e-5", "--model", "/from/cli"])
    assert cfg.optim.lr == 3e-5  # CLI beats file
    assert cfg.model.path == "/from/cli"
    assert cfg.optim.schedule == "linear"  # file beats default
    assert cfg.data.context_length == 4096
    assert cfg.optim.weight_decay == 0.0  # default


def test_typed_overrides_and_all_syntaxes():
    cfg = load_config(
        None,
        [
            "--model",
            "m",
            "data.train=a.jsonl,b.jsonl",
            "--eval-data=e.jsonl",
            "--task-type",
            "text",
            "--context-length=1024",
            "--optim.betas=0.8,0.99",
            "--output.tensorboard",
            "--output.mlflow=false",
            "--train.batch-tokens",
            "65536",
            "--duration=100st",
            "--warmup",
            "10",
            "--data.cache_dir=none",
            "--seed=3",
        ],
    )
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.data.eval == ["e.jsonl"]
    assert cfg.data.task_type == "text"
    assert cfg.data.context_length == 1024
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.output.tensorboard is True and cfg.output.mlflow is False
    assert cfg.train.batch_tokens == 65536
    assert cfg.train.duration == Duration(100, "st")
    assert cfg.optim.warmup_steps == 10
    assert cfg.data.cache_dir is None
    assert cfg.train.seed == 3


def test_every_alias_targets_a_real_key():
    for flag, key in FLAG_ALIASES.items():
        section, name = key.split(".")
        assert name in config_to_dict(load_config(None, REQUIRED))[section], flag


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--optim.schedule=cosin"],
            "optim.schedule (from --optim.schedule): 'cosin' is not one of cosine, linear, constant",
        ),
        (
            ["--optim.lrr=1"],
            "--optim.lrr: unknown key 'optim.lrr' (known keys in optim: lr, weight_decay,",
        ),
        (["--optim.l=1"], "--optim.l: unknown key 'optim.l'"),  # no abbreviations
        (
            ["--optimizer.lr=1"],
            "--optimizer.lr: unknown section 'optimizer' in 'optimizer.lr' (known sections: model,",
        ),
        (["--bogus=1"], "--bogus: 'bogus' is not a config key; use section.key (sections: model,"),
        (["--lr=abc"], "optim.lr (from --lr): 'abc' is invalid; must be a valid number"),
        (["--lr=0"], "optim.lr (from --lr): '0' is invalid; must be greater than 0"),
        (
            ["--duration=3"],
            "train.duration (from --duration): '3' is not a duration; use e.g. '3ep'",
        ),
        (
            ["--context-length=1.5"],
            "data.context_length (from --context-length): '1.5' is invalid; must be a valid integer",
        ),
        (
            ["--output.tensorboard=maybe"],
            "output.tensorboard (from --output.tensorboard): 'maybe' is invalid; must be a valid "
            "boolean",
        ),
        (["--optim.betas=0.9"], "optim.betas (from --optim.betas): '0.9' is invalid; give two"),
        (
            ["--optim.betas=0.9,1"],
            "optim.betas (from --optim.betas): '0.9,1' is invalid; must be less than 1",
        ),
        (
            ["--checkpoint.keep_last=0"],
            "checkpoint.keep_last (from --checkpoint.keep_last): '0' is invalid; must be greater "
            "than or equal to 1",
        ),
        (
            ["--context-length=1"],
            "data.context_length (from --context-length): '1' is invalid; must be greater than or "
            "equal to 2",
        ),
        (
            ["--model.dtype=fp16"],
            "model.dtype (from --model.dtype): 'fp16' is not one of auto, float32, bfloat16",
        ),
        (
            ["--model.attention=fast"],
            "model.attention (from --model.attention): 'fast' is not one of auto, sdpa, varlen, flex",
        ),
        (["--compile=yes"], "--compile: 'compile' is not a config key"),
        (
            ["--train.compile=yes"],
            "train.compile (from --train.compile): 'yes' is not one of auto, true, false",
        ),
        (
            ["--parallel.timeout_s=0"],
            "parallel.timeout_s (from --parallel.timeout_s): '0' is invalid; must be greater than "
            "or equal to 1",
        ),
        (
            ["--parallel.dp=0"],
            "parallel.dp (from --parallel.dp): 0 is invalid; must be >= 1, or -1",
        ),
        (
            ["--batch-tokens=100", "--grad-accum=4"],
            "train.grad_accum (from --grad-accum): 4 is invalid; train.batch_tokens=100 derives "
            "grad_accum; set only one of the two",
        ),
        (
            ["--duration=5st", "--warmup=10"],
            "optim.warmup_steps (from --warmup): 10 is invalid; must be <= the 5 optimizer steps",
        ),
        (["--lr"], "argument --optim.lr/--lr: needs a value (--flag=VALUE)"),
        (["stray"], "unexpected argument 'stray'; overrides look like --section.key=value"),
        (["--model="], "model.path (from --model): '' is invalid; must have at least 1 character"),
        (["--data="], "data.train (from --data): '' is invalid; must have at least 1 item"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match="missing required key 'model.path'.*--model"):
        load_config(None, ["--data=a.jsonl"])
    with pytest.raises(ConfigError, match="missing required key 'data.train'"):
        load_config(None, ["--model=m"])


def test_file_errors(tmp_path):
    bad_key = write_yaml(tmp_path, {"model": {"path": "m", "pth": "x"}, "data": {"train": ["a"]}})
    with pytest.raises(ConfigError, match=r"config file .*unknown key 'model.pth'"):
        load_config(bad_key, [])
    bad_section = write_yaml(tmp_path, {"modle": {"path": "m"}})
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        load_config(bad_section, [])
    bad_type = write_yaml(
        tmp_path, {"model": {"path": "m"}, "data": {"train": ["a"]}, "train": {"seed": 1.5}}
    )
    with pytest.raises(
        ConfigError,
        match=r"train.seed \(from config file .*\): 1.5 is invalid; must be a valid int",
    ):
        load_config(bad_type, [])
    yes_seed = write_yaml(
        tmp_path, {"model": {"path": "m"}, "data": {"train": ["a"]}, "train": {"seed": True}}
    )
    with pytest.raises(
        ConfigError, match=r"train.seed \(from config file .*\): True is not a number"
    ):
        load_config(yes_seed, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"), [])


def test_save_round_trip(tmp_path):
    cfg = load_config(
        None,
        REQUIRED
        + [
            "--eval-data=e1,e2",
            "--optim.betas=0.5,0.6",
            "--duration=7st",
            "--data.cache_dir=/c",
            "--lr=1e-4",
            "--batch-tokens=4096",
            "--output.tensorboard=true",
            "--parallel.dp=2",
        ],
    )
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    again = load_config(str(path), [])
    # Paths are written absolute, so the file means the same from any folder (a UI resume).
    cwd = os.getcwd()
    assert again.data.train == [f"{cwd}/train.jsonl"] and again.data.eval == [
        f"{cwd}/e1",
        f"{cwd}/e2",
    ]
    assert again.output.dir == f"{cwd}/runs/longtune" and again.model.path == "/models/llama"
    assert again.checkpoint.resume == "auto" and again.data.cache_dir == "/c"
    assert again == dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, train=again.data.train, eval=again.data.eval),
        output=dataclasses.replace(cfg.output, dir=again.output.dir),
    )
    assert isinstance(again, JobConfig)
    # The saved file is plain YAML with every key, durations as strings.
    data = yaml.safe_load(path.read_text())
    assert data["train"]["duration"] == "7st"
    assert set(data["optim"]) >= {"lr", "betas", "warmup_steps", "min_lr_ratio"}


def test_resolve_grad_accum():
    cfg = load_config(None, REQUIRED + ["--grad-accum=3"])
    assert resolve_grad_accum(cfg, dp_size=4) == 3
    cfg = load_config(
        None, REQUIRED + ["--context-length=1000", "--micro-batch-size=2", "--batch-tokens=10001"]
    )
    # 10001 / (2 * 1000 * 2) = 2.5 -> 3 (rounded up); never below 1.
    assert resolve_grad_accum(cfg, dp_size=2) == 3
    assert resolve_grad_accum(cfg, dp_size=100) == 1


def test_every_field_has_a_docstring():
    assert list(flat_settings(load_config(None, REQUIRED))) == list(SETTINGS)
    for key, info in SETTINGS.items():
        assert info.description, f"{key} has no docstring"
    assert ModelConfig.__pydantic_fields__["lora"].description  # a group's own field


def test_typed_values_build_the_same_config_as_flags(tmp_path):
    """The Python API's typed values give what the equivalent command line gives, with the
    same precedence over a file and the same errors (no round trip through strings)."""
    path = write_yaml(tmp_path, {"optim": {"lr": 1e-3, "warmup_steps": 5}})
    typed = config_from_values(
        {
            "model.path": "/models/llama",
            "data.train": "a,b.jsonl",  # one path, comma and all
            "optim.lr": 3e-5,
            "optim.betas": (0.8, 0.9),
            "train.duration": "2ep",
            "output.tensorboard": True,
        },
        path,
    )
    flags = load_config(
        path,
        REQUIRED[:1]
        + ["--data.train=x", "--lr=3e-5", "--optim.betas=0.8,0.9", "--duration=2ep"]
        + ["--output.tensorboard"],
    )
    assert typed.data.train == ["a,b.jsonl"]
    typed.data.train = flags.data.train
    assert typed == flags and typed.optim.warmup_steps == 5
    with pytest.raises(
        ConfigError,
        match=r"optim.schedule \(from argument optim.schedule\): 'cosin' is not one of cosine",
    ):
        config_from_values({"model.path": "m", "data.train": ["t"], "optim.schedule": "cosin"})
    with pytest.raises(ConfigError, match="data.context_length .*must be a valid integer"):
        config_from_values({"model.path": "m", "data.train": ["t"], "data.context_length": 9.5})
    with pytest.raises(ConfigError, match="unknown key 'optim.lrate'"):
        config_from_values({"model.path": "m", "data.train": ["t"], "optim.lrate": 1.0})


def test_resume_compares_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    new = load_config(None, ["--model=m", "--data=train.jsonl"])
    save_config(new, tmp_path / "config.yaml")
    old = load_config(str(tmp_path / "config.yaml"), [])
    assert old.data.train == [str(tmp_path / "train.jsonl")]
    check_resume_config(old, new, 1, 1, tmp_path)  # the same files, spelled two ways
    other = load_config(None, ["--model=m", "--data=other.jsonl"])
    with pytest.raises(ConfigError, match=r"data.train: .*/train.jsonl → .*/other.jsonl"):
        check_resume_config(old, other, 1, 1, tmp_path)


def test_help_lists_every_setting_with_its_type_default_and_doc(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = flag_parser("Fine-tune a model.").format_help()
    flat = "".join(text.split())  # argparse wraps the docs to the width, also after a dash
    saved = flat_settings(load_config(None, REQUIRED))
    for key, info in SETTINGS.items():
        container = key.rpartition(".")[0]  # model, model.lora, ...
        assert f"--{key} " in text and f"\n{container} settings:" in text, key
        assert "".join(info.description.split()) in flat, key
        default = info.get_default(call_default_factory=True)  # as given, not as saved
        if isinstance(default, tuple | Duration):
            default = saved[key]
        if info.is_required():
            assert "(required)" in flat
        elif isinstance(default, list | dict):
            assert f"(default:{','.join(map(str, default)) or 'empty'})" in flat, key
        else:
            shown = (
                str(default).lower() if default is None or isinstance(default, bool) else default
            )
            assert f"(default:{shown})" in flat, key
    for flag in FLAG_ALIASES:
        assert f", --{flag} " in text, flag
    assert "--model.dtype {auto,float32,bfloat16}" in text and "--optim.lr FLOAT" in text
    assert "--output.tensorboard [BOOL]" in text and "--train.duration DURATION" in text
    assert "--train.batch-tokens" not in text  # accepted, not listed twice
    assert max(len(line) for line in text.splitlines()) <= 100


ALIAS_VALUES = {
    "model": "/other/model",
    "data": "x.jsonl,y.jsonl",
    "eval-data": "e.jsonl",
    "task-type": "text",
    "context-length": "1024",
    "duration": "5st",
    "lr": "3e-5",
    "warmup": "2",
    "batch-tokens": "4096",
    "micro-batch-size": "2",
    "grad-accum": "3",
    "seed": "7",
    "output-dir": "runs/other",
    "resume": "never",
    "sp": "2",
}


@pytest.mark.parametrize("flag", sorted(FLAG_ALIASES))
def test_an_alias_and_its_dotted_key_give_the_same_value(flag):
    key, value = FLAG_ALIASES[flag], ALIAS_VALUES[flag]
    section, name = key.split(".")
    by_alias = load_config(None, REQUIRED + [f"--{flag}", value])
    by_key = load_config(None, REQUIRED + [f"--{key}={value}"])
    assert by_alias == by_key
    assert (
        config_to_dict(by_alias)[section][name]
        != config_to_dict(load_config(None, REQUIRED))[section][name]
    )


def test_flag_values_keep_the_value_and_the_flag_as_typed():
    tokens = ["--lr", "1", "optim.eps=2", "--train.batch-tokens=5", "--output.tensorboard"]
    assert flag_values(tokens + ["--output.mlflow", "false", "--seed=1", "--train.seed", "2"]) == {
        "optim.lr": ("1", "--lr"),
        "optim.eps": ("2", "--optim.eps"),
        "train.batch_tokens": ("5", "--train.batch-tokens"),
        "output.tensorboard": ("true", "--output.tensorboard"),
        "output.mlflow": ("false", "--output.mlflow"),
        "train.seed": ("2", "--train.seed"),  # later ones win
    }
    with pytest.raises(ConfigError, match="--train.batch-tokens\\): '0' is invalid"):
        load_config(None, REQUIRED + ["--train.batch-tokens", "0"])
    assert choices("model.attention") == ATTENTION_BACKENDS and choices("optim.lr") == ()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--context-length", "99999999999"],
            "data.context_length (from --context-length): '99999999999' is invalid; must be less "
            "than or equal to 2147483647",
        ),
        (["--optim.eps=inf"], "optim.eps (from --optim.eps): 'inf' is invalid; must be a finite"),
        (
            ["--parallel.timeout_s=inf"],
            "parallel.timeout_s (from --parallel.timeout_s): 'inf' is invalid; must be a finite "
            "number",
        ),
        (["--parallel.timeout_s=0.5"], "'0.5' is invalid; must be greater than or equal to 1"),
        (["--optim.weight_decay=nan"], "'nan' is invalid; must be a finite number"),
        (["--lr=-inf"], "optim.lr (from --lr): '-inf' is invalid; must be a finite number"),
        (["--seed=4294967296"], "train.seed (from --seed): '4294967296' is invalid"),
    ],
)
def test_numbers_out_of_range_are_refused_in_one_line(flags, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + flags)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_yaml_booleans_for_compile_are_its_words(tmp_path):
    for value, word in ((True, "true"), (False, "false"), ("auto", "auto")):
        path = write_yaml(
            tmp_path,
            {"model": {"path": "m"}, "data": {"train": ["a"]}, "train": {"compile": value}},
        )
        assert load_config(path, []).train.compile == word


def test_memory_settings_defaults_words_and_errors(tmp_path):
    """The memory levers: defaults, YAML booleans read as their words, one-line errors."""
    cfg = load_config(None, REQUIRED)
    assert cfg.model.activation_checkpointing == "selective"
    assert (cfg.model.tiled_mlp, cfg.model.offload_activations) == ("auto", "false")
    assert cfg.parallel.cpu_offload is False and cfg.train.plan_check is True
    cfg = load_config(
        None,
        REQUIRED
        + ["--model.activation_checkpointing=auto", "--model.tiled_mlp=true"]
        + [
            "--model.offload_activations=auto",
            "--parallel.cpu_offload",
            "--train.plan_check=false",
        ],
    )
    assert cfg.model.activation_checkpointing == "auto" and cfg.model.tiled_mlp == "true"
    assert cfg.model.offload_activations == "auto"
    assert cfg.parallel.cpu_offload is True and cfg.train.plan_check is False
    for value, word in ((True, "true"), (False, "false")):
        model = {"path": "m", "tiled_mlp": value, "offload_activations": value}
        path = write_yaml(tmp_path, {"model": model, "data": {"train": ["a"]}})
        cfg = load_config(path, [])
        assert cfg.model.tiled_mlp == cfg.model.offload_activations == word
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + ["--model.tiled_mlp=yes"])
    assert str(info.value) == (
        "model.tiled_mlp (from --model.tiled_mlp): 'yes' is not one of auto, true, false"
    )


def test_commas_in_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a,b.jsonl").write_text("{}\n")
    assert load_config(None, ["--model=m", "--data", "a\\,b.jsonl,c"]).data.train == [
        "a,b.jsonl",
        "c",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--model=m", "--data", "a,b.jsonl"])
    assert str(info.value) == (
        "data.train (from --data): 'a,b.jsonl' is one path whose name holds a comma, but commas "
        "separate paths here; write it as 'a\\,b.jsonl' or list it in the YAML file"
    )
    # The Python API: a string is one path, a Path object is a string.
    cfg = config_from_values({"model.path": tmp_path, "data.train": "a,b.jsonl"})
    assert cfg.model.path == str(tmp_path) and cfg.data.train == ["a,b.jsonl"]


# ---------------------------------------------------------------------------------------------
# A group of settings inside a section: model.lora
# ---------------------------------------------------------------------------------------------


def test_lora_defaults_are_full_fine_tuning():
    lora = load_config(None, REQUIRED).model.lora
    assert lora == LoraConfig() and lora.rank == 0 and lora.alpha is None
    assert lora.targets == list(LORA_TARGETS) and not lora.rslora and not lora.train_embeddings
    assert "model.lora" not in SETTINGS and "model.lora.rank" in SETTINGS


def test_lora_flags_in_every_form():
    cfg = load_config(
        None,
        REQUIRED
        + ["--model.lora.rank", "16", "--model.lora.alpha=32", "model.lora.dropout=0.05"]
        + ["--model.lora.train-embeddings", "--model.lora.rslora", "--lr=1e-4"],
    )
    assert cfg.model.lora == LoraConfig(
        rank=16, alpha=32.0, dropout=0.05, rslora=True, train_embeddings=True
    )
    assert cfg.optim.lr == 1e-4  # a bare boolean flag takes no value from the next one
    assert load_config(None, REQUIRED + ["--model.lora.rank=8"]).model.lora.rank == 8
    off = load_config(None, REQUIRED + ["--model.lora.rslora=false", "--model.lora.alpha=none"])
    assert off.model.lora == LoraConfig()
    assert flag_values(["--model.lora.train-embeddings", "--model.lora.rank", "4"]) == {
        "model.lora.train_embeddings": ("true", "--model.lora.train-embeddings"),
        "model.lora.rank": ("4", "--model.lora.rank"),
    }


@pytest.mark.parametrize(
    ("given", "targets"),
    [
        ("all", LORA_TARGETS),
        ("all-linear", LORA_TARGETS),
        ("attention", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ("v_proj,q_proj,v_proj", ("q_proj", "v_proj")),  # each once, in LORA_TARGETS order
        ("down_proj, attention", ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")),
    ],
)
def test_lora_targets_and_their_shorthands(given, targets):
    by_flag = load_config(None, REQUIRED + [f"--model.lora.targets={given}"])
    by_value = config_from_values(
        {"model.path": "m", "data.train": ["t"], "model.lora.targets": given}
    )
    by_list = config_from_values(
        {"model.path": "m", "data.train": ["t"], "model.lora.targets": given.split(",")}
    )
    assert by_flag.model.lora.targets == by_value.model.lora.targets == list(targets)
    assert by_list.model.lora.targets == list(targets)


def test_lora_in_a_yaml_file(tmp_path):
    lora = {"rank": 16, "targets": ["q_proj", "v_proj"], "rslora": True, "alpha": 8}
    path = write_yaml(tmp_path, {"model": {"path": "m", "lora": lora}, "data": {"train": ["a"]}})
    cfg = load_config(path, ["--model.lora.rank=4"])  # a flag beats the file
    assert cfg.model.lora == LoraConfig(
        rank=4, alpha=8.0, targets=["q_proj", "v_proj"], rslora=True
    )
    assert load_config(path, []).model.lora.rank == 16
    for bad, message in (
        (
            16,
            f"config file {tmp_path}/run.yaml: group 'model.lora' must be a mapping of keys "
            "(rank, alpha, dropout, targets, rslora, train_embeddings), got 16",
        ),
        (
            {"rnak": 4},
            f"config file {tmp_path}/run.yaml: unknown key 'model.lora.rnak' (known "
            "keys in model.lora: rank, alpha, dropout, targets, rslora, train_embeddings)",
        ),
        (
            {"rank": 1.5},
            f"model.lora.rank (from config file {tmp_path}/run.yaml): 1.5 is "
            "invalid; must be a valid integer, got a number with a fractional part",
        ),
    ):
        path = write_yaml(tmp_path, {"model": {"path": "m", "lora": bad}, "data": {"train": ["a"]}})
        with pytest.raises(ConfigError) as info:
            load_config(path, [])
        assert str(info.value) == message


def test_lora_from_python_values_and_the_api(monkeypatch):
    typed = config_from_values(
        {"model.path": "m", "data.train": ["t"], "model.lora.rank": 16, "model.lora.rslora": True}
    )
    flags = ["--model=m", "--data=t", "--model.lora.rank=16", "--model.lora.rslora"]
    assert typed == load_config(None, flags)
    seen = []
    fake_run = types.SimpleNamespace(run_training=lambda cfg: seen.append(cfg))
    monkeypatch.setitem(sys.modules, "longtune.train.run", fake_run)  # no training, no torch
    finetune("m", "t", model__lora__rank=16, model__lora__targets="attention")
    assert seen[0].model.lora == LoraConfig(rank=16, targets=list(LORA_TARGETS[:4]))
    with pytest.raises(ConfigError, match=r"^argument model.lora.bogus: unknown key 'model.lora"):
        finetune("m", "t", model__lora__bogus=1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--model.lora.rank=-1"],
            "model.lora.rank (from --model.lora.rank): '-1' is invalid; must be greater than or "
            "equal to 0",
        ),
        (
            ["--model.lora.rank", "5000"],
            "model.lora.rank (from --model.lora.rank): '5000' is invalid; must be less than or "
            "equal to 4096",
        ),
        (
            ["--model.lora.targets=q_proj,qproj"],
            "model.lora.targets (from --model.lora.targets): 'qproj' is not one of q_proj, "
            "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all, all-linear, attention, "
            "mlp",
        ),
        (
            ["--model.lora.targets="],
            "model.lora.targets (from --model.lora.targets): '' is invalid; must have at least 1 "
            "item, not 0",
        ),
        (
            ["--model.lora.dropout=1"],
            "model.lora.dropout (from --model.lora.dropout): '1' is invalid; must be less than 1",
        ),
        (
            ["--model.lora.alpha=0"],
            "model.lora.alpha (from --model.lora.alpha): '0' is invalid; must be greater than 0",
        ),
        (
            ["--model.lora.foo=1"],
            "--model.lora.foo: unknown key 'model.lora.foo' (known keys in model.lora: rank, "
            "alpha, dropout, targets, rslora, train_embeddings)",
        ),
        (
            ["--model.foo=1"],
            "--model.foo: unknown key 'model.foo' (known keys in model: path, dtype, "
            "activation_checkpointing, offload_activations, tiled_mlp, attention, lora)",
        ),
        (
            ["--model.lora=16"],
            "--model.lora: 'model.lora' is a group of settings; set its keys (model.lora.rank, "
            "model.lora.alpha, model.lora.dropout, model.lora.targets, model.lora.rslora, "
            "model.lora.train_embeddings)",
        ),
        (["--model.lora.rank"], "argument --model.lora.rank: needs a value (--flag=VALUE)"),
    ],
)
def test_lora_errors_are_one_exact_line(flags, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + flags)
    assert str(info.value) == message


def test_lora_settings_with_rank_0_are_ignored_not_refused():
    cfg = load_config(
        None,
        REQUIRED + ["--model.lora.alpha=8", "--model.lora.dropout=0.1", "--model.lora.targets=mlp"],
    )
    assert cfg.model.lora.rank == 0 and cfg.model.lora.alpha == 8.0


def test_lora_scale():
    from longtune.train.config import lora_spec

    def spec(*flags: str):  # noqa: ANN202
        return lora_spec(load_config(None, REQUIRED + list(flags)))

    assert spec("--model.lora.rank=16").scale == 2.0  # alpha defaults to 2 x rank
    assert LoraConfig(rank=16).effective_alpha() == 32.0
    assert spec("--model.lora.rank=16", "--model.lora.alpha=8").scale == 0.5
    assert spec("--model.lora.rank=16", "--model.lora.alpha=8", "--model.lora.rslora").scale == 2.0
    assert spec() is None  # rank 0: full fine-tuning, no adapters


def test_lora_save_round_trip_and_flat_settings(tmp_path):
    cfg = load_config(
        None,
        REQUIRED
        + ["--model.lora.rank=16", "--model.lora.alpha=8", "--model.lora.targets=mlp,q_proj"]
        + ["--model.lora.train-embeddings"],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text())["model"]["lora"] == {
        "rank": 16,
        "alpha": 8.0,
        "dropout": 0.0,
        "targets": ["q_proj", "gate_proj", "up_proj", "down_proj"],
        "rslora": False,
        "train_embeddings": True,
    }
    again = load_config(str(path), [])
    assert again.model.lora == cfg.model.lora
    assert again == dataclasses.replace(cfg, data=again.data, output=again.output)  # paths absolute
    flat = flat_settings(again)
    assert list(flat) == list(SETTINGS)
    assert flat["model.lora.rank"] == 16 and flat["optim.lr"] == 1e-5
    assert flat["model.lora.targets"] == ["q_proj", "gate_proj", "up_proj", "down_proj"]
    assert flat["data.columns"] == {}  # a mapping setting is one value


def test_resume_refuses_a_changed_lora_setting(tmp_path):
    old = load_config(None, REQUIRED)
    new = load_config(None, REQUIRED + ["--model.lora.rank=16", "--model.attention=sdpa"])
    with pytest.raises(ConfigError) as info:
        check_resume_config(old, new, 1, 1, tmp_path)
    message = str(info.value)
    assert (
        "changed settings: model.lora.rank: 0 → 16 (these change the data or the model)" in message
    )
    assert "model.attention" not in message  # still free to change
    targets = load_config(None, REQUIRED + ["--model.lora.targets=attention"])
    with pytest.raises(
        ConfigError,
        match=r"model.lora.targets: q_proj,k_proj,.*,down_proj → q_proj,k_proj,v_proj,o_proj \(",
    ):
        check_resume_config(old, targets, 1, 1, tmp_path)
    check_resume_config(new, dataclasses.replace(new), 1, 1, tmp_path)
