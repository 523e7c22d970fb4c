"""Every bad input a user can give ends in one clear line, never a traceback.

Each case is a real ``longtune`` command line (run in its own process by
the session's :class:`cli_harness.CliServer`); the test of each item asserts exit code 2, exactly one
stderr line without ``Traceback``, and the text of that line. All command lines run in one
batch (module fixture), so the two dozen cases cost seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint, tiny_tokenizer
from safetensors.torch import load_file, save_file

from longtune.checkpoint import save_checkpoint
from longtune.data.validation import MAX_EXAMPLE_BYTES, expand_paths
from longtune.model.args import ModelArgs
from longtune.model.llama import Transformer
from longtune.run_dir import RunDir, mark_run
from longtune.train.config import load_config, save_config
from longtune.train.preflight import data_fingerprints
from longtune.train.schedule import build_lr_scheduler
from longtune.train.state import TrainState

GOOD = {
    "messages": [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
    ]
}
RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def variant(base: Path, dest: Path, edit) -> Path:
    """A copy of the model folder ``base`` changed by ``edit(folder)``."""
    shutil.copytree(base, dest)
    edit(dest)
    return dest


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


Cases = dict[str, tuple[list[str], Path, str]]


def build_cases(root: Path) -> Cases:
    """name -> (argv, cwd, text the error line must hold)."""
    model = make_hf_checkpoint(root / "model")
    good = write(root / "good.jsonl", json.dumps(GOOD) + "\n")
    out = root / "runs"

    runs = iter(range(1000))

    def train(data: Path | str, *extra: str, model_dir: Path | str = model) -> list[str]:
        name = f"run-{next(runs)}"
        return [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--context-length",
            "64",
            "--duration",
            "1st",
            "--output-dir",
            str(out / name),
            f"--data.cache_dir={root / 'cache'}",
            *extra,
        ]

    return {
        **_data_cases(root, train, model, good),
        **_format_cases(root, train, good),
        **_model_cases(root, train, model, good),
        **_weight_cases(root, train, model, good),
        **_run_folder_cases(root, train, good),
        **_config_cases(root, train, good),
    }


def _data_cases(root: Path, train, model: Path, good: Path) -> Cases:  # noqa: ANN001
    """Bad data files (and a chat template that refuses one)."""
    cases: Cases = {}
    surrogate = '{"messages": [{"role": "user", "content": "hi \\ud800 there"}, '
    surrogate += '{"role": "assistant", "content": "ok"}]}\n'
    f = write(root / "surrogate.jsonl", surrogate)
    cases["lone surrogate"] = (
        train(f),
        root,
        f"{f}:1: invalid-unicode: messages[0].content holds a lone surrogate '\\ud800' at "
        "character 4",
    )
    f = write(root / "nested.jsonl", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    cases["deeply nested JSON"] = (train(f), root, f"{f}:1: too-deeply-nested:")
    cut = json.dumps(GOOD)[:50]
    f = write(root / "cut.jsonl", json.dumps(GOOD) + "\n" + cut)
    cases["JSON cut short"] = (
        train(f),
        root,
        f"{f}:2: invalid-json: the line ends at column {len(cut)} before its JSON value is "
        "complete (was the file cut short?)",
    )
    huge = {"messages": [GOOD["messages"][0], {"role": "assistant", "content": "x" * 50 * 2**20}]}
    f = write(root / "huge.jsonl", json.dumps(GOOD) + "\n" + json.dumps(huge) + "\n")
    cases["50 MB line"] = (train(f), root, f"{f}:2: example-too-large: 50.0 MiB in one example")
    templ = variant(
        model,
        root / "model-template",
        lambda d: (d / "chat_template.jinja").write_text(RAISING_TEMPLATE),
    )
    sys_row = {"messages": [{"role": "system", "content": "be brief"}] + GOOD["messages"]}
    f = write(root / "system.jsonl", json.dumps(GOOD) + "\n" + json.dumps(sys_row) + "\n")
    cases["chat template raises"] = (
        train(f, model_dir=templ),
        root,
        f"{f}:2: chat-template-error: the model's chat template refused this conversation: "
        "System role not supported",
    )
    # Whole-file problems: no line number in the message.
    f = write(root / "empty.jsonl", "\n\n")
    cases["empty data file"] = (train(f), root, f"{f}: empty-file: the file holds no example")
    missing = root / "missing.jsonl"
    cases["missing data file (validate)"] = (
        ["validate", str(missing), "--model", str(model)],
        root,
        f"error: {missing}: file-not-found: no such file or folder",
    )
    comma = write(root / "a,b.jsonl", json.dumps(GOOD) + "\n")
    cases["comma in a data path"] = (
        train(comma),
        root,
        f"data.train (from --data): '{comma}' is one path whose name holds a comma, but commas "
        f"separate paths here; write it as '{root}/a\\,b.jsonl'",
    )
    return cases


def _format_cases(root: Path, train, good: Path) -> Cases:  # noqa: ANN001
    """A bad record in each file format, named by line (JSONL) or row (the others)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    cases: Cases = {}
    bad = {"messages": [{"role": "user", "content": "q"}]}  # no assistant turn
    rule = "last-not-assistant: the last message is 'user'"
    rows = [GOOD, GOOD, bad]
    f = root / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    cases["parquet bad row"] = (train(f), root, f"{f}: row 2: {rule}")
    f = write(root / "bad.json", json.dumps(rows))
    cases["JSON array bad element"] = (train(f), root, f"{f}: row 2: {rule}")
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = write(root / "bad.jsonl.zst", zstandard.ZstdCompressor().compress(text))
    cases["zstd JSONL bad line"] = (train(f), root, f"{f}:3: {rule}")
    f = root / "bad-saved"
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(f))
    cases["datasets folder bad row"] = (train(f), root, f"{f}: row 2: {rule}")
    f = root / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(f))
    cases["DatasetDict folder"] = (
        train(f),
        root,
        f"{f}: dataset-dict: a DatasetDict folder with splits ['train']; name the folder of one "
        f"split, e.g. {f / 'train'}",
    )
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    f = write(root / "sharegpt.jsonl", json.dumps(sharegpt) + "\n")
    cases["ShareGPT unknown from"] = (
        train(f),
        root,
        f"{f}:1: unknown-role: conversations[1].from='bot'; use one of ('system', 'human', "
        "'user', 'gpt', 'assistant', 'function_call', 'observation', 'tool')",
    )
    f = write(root / "alpaca.jsonl", json.dumps({"instruction": "say hi", "input": ""}) + "\n")
    cases["Alpaca without output"] = (
        [*train(f), "--task-type", "instruction"],
        root,
        f"{f}:1: missing-key: an instruction example needs 'prompt'+'response' or "
        "'prompt'+'completion' or 'instruction'+'output'; found ['input', 'instruction']",
    )
    cases["unknown data.columns name"] = (
        train(good, "--data.columns.dialogue=messages"),
        root,
        "data.columns (from --data.columns): 'dialogue' is not one of messages, conversations,",
    )
    return cases


def _model_cases(root: Path, train, model: Path, good: Path) -> Cases:  # noqa: ANN001
    """Bad model folders: missing, without a tokenizer, a broken config.json."""
    cases: Cases = {}
    cases["missing model folder (train)"] = (
        train(good, model_dir="meta-llama/Llama-3.1-8B"),
        root,
        "model folder 'meta-llama/Llama-3.1-8B': no such folder (longtune reads local folders only",
    )
    cases["missing model folder (validate)"] = (
        ["validate", str(good), "--model", "meta-llama/Llama-3.1-8B"],
        root,
        "model folder 'meta-llama/Llama-3.1-8B': no such folder",
    )

    def no_tokenizer(d: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (d / name).unlink(missing_ok=True)

    bare = variant(model, root / "model-bare", no_tokenizer)
    cases["no tokenizer files (train)"] = (
        train(good, model_dir=bare),
        root,
        f"no tokenizer.json / tokenizer_config.json in {bare}",
    )
    cases["no tokenizer files (validate)"] = (
        ["validate", str(good), "--model", str(bare)],
        root,
        f"no tokenizer.json / tokenizer_config.json in {bare}",
    )
    bad_json = variant(
        model,
        root / "model-badjson",
        lambda d: (d / "config.json").write_text('{\n  "model_type": "llama",\n  "x": ,\n}'),
    )
    cases["config.json invalid"] = (
        train(good, model_dir=bad_json),
        root,
        f"{bad_json}/config.json:3: invalid JSON: Expecting value (column 8)",
    )

    def drop_key(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        del cfg["hidden_size"]
        (d / "config.json").write_text(json.dumps(cfg))

    incomplete = variant(model, root / "model-nokey", drop_key)
    cases["config.json incomplete"] = (
        train(good, model_dir=incomplete),
        root,
        f"{incomplete}/config.json: missing key 'hidden_size'",
    )
    return cases


def _weight_cases(root: Path, train, model: Path, good: Path) -> Cases:  # noqa: ANN001
    """Bad weight files of a model folder."""
    cases: Cases = {}

    def truncate(d: Path) -> None:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    short = variant(model, root / "model-truncated", truncate)
    cases["truncated safetensors"] = (
        train(good, model_dir=short),
        root,
        f"{short}/model.safetensors: not a readable safetensors file (",
    )

    def poison(d: Path) -> None:
        tensors = load_file(d / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})

    nan = variant(model, root / "model-nan", poison)
    cases["non-finite weights"] = (
        train(good, model_dir=nan),
        root,
        f"{nan}/model.safetensors: tensor model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf "
        "value(s) of 4608; the checkpoint is damaged",
    )
    small_vocab = make_hf_checkpoint(root / "model-smallvocab", vocab_size=64)
    tiny_tokenizer(128).save_pretrained(small_vocab)  # 102 ids: more than the 64 rows
    cases["tokenizer larger than the vocabulary"] = (
        train(good, model_dir=small_vocab),
        root,
        f"the tokenizer in {small_vocab} has ids up to 101, but config.json says vocab_size=64",
    )

    def shard_outside(d: Path) -> None:
        (d / "model.safetensors").rename(root / "outside.safetensors")
        keys = list(load_file(root / "outside.safetensors"))
        index = {"weight_map": dict.fromkeys(keys, "../outside.safetensors")}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    outside = variant(model, root / "model-outside", shard_outside)
    cases["index naming a file outside the model folder"] = (
        train(good, model_dir=outside),
        root,
        f"{outside}/model.safetensors.index.json: weight_map names '../outside.safetensors', "
        f"which is not a file of {outside} (shards are plain file names inside the model folder)",
    )
    return cases


def _run_folder_cases(root: Path, train, good: Path) -> Cases:  # noqa: ANN001
    """A run folder whose checkpoint is another model's; an output folder that is a user's."""
    cases: Cases = {}
    # A run whose model folder was replaced by another model (same settings, other shapes).
    argv = train(good)
    other = other_model_checkpoint(Path(argv[argv.index("--output-dir") + 1]), argv[1:])
    cases["checkpoint of another model"] = (
        argv,
        root,
        f"checkpoint {other} is for a different model (layers.0.attention.wo.weight has shape "
        "[32, 32] there, [48, 48] here)",
    )
    mine = root / "my-project"  # a user's folder, with a name a run also writes
    mine.mkdir()
    write(mine / "config.yaml", "experiment: 3\n")
    argv = train(good)
    argv[argv.index("--output-dir") + 1] = str(mine)
    cases["output folder holding a user's files"] = (
        argv,
        root,
        f"output.dir={mine} is not empty and is not a longtune run (it holds config.yaml); "
        "choose a new or empty folder",
    )
    return cases


def _config_cases(root: Path, train, good: Path) -> Cases:  # noqa: ANN001
    """Bad settings and config files."""
    cases: Cases = {}
    cases["a micro-batch larger than the data"] = (
        train(good, "--micro-batch-size", "64"),
        root,
        "train.micro_batch_size=64 on 1 data-parallel rank(s) takes 64 packed sequences per "
        "micro-step, but the training data packs into 1 sequences of 64 tokens",
    )
    cases["the demo with no steps"] = (
        ["demo", "--steps", "0", "--output-dir", str(root / "demo")],
        root,
        "--steps 0 is invalid; the demo needs at least 1 optimizer step",
    )
    cases["data.mix without one weight per file"] = (
        train(f"{good},{good}", "--data.mix", "3"),
        root,
        "data.mix (from --data.mix): '3' is invalid; give one weight per data.train entry (2), "
        "or none",
    )
    cases["data.mix with a zero weight"] = (
        train(f"{good},{good}", "--data.mix", "3,0"),
        root,
        "data.mix (from --data.mix): '3,0' is invalid; must be greater than 0",
    )
    cases["negative seed"] = (
        train(good, "--seed", "-1"),
        root,
        "train.seed (from --seed): '-1' is invalid; must be greater than or equal to 0",
    )
    bad_yaml = write(root / "bad.yaml", "model:\n  path: m\ndata:\n  train: [a.jsonl\n")
    cases["YAML syntax error"] = (
        ["train", str(bad_yaml)],
        root,
        f"config file {bad_yaml}:5: while parsing a flow sequence expected ',' or ']'",
    )
    tag = write(
        root / "tag.yaml",
        f'model:\n  path: !!python/object/apply:os.system ["touch {root}/pwned"]\n',
    )
    cases["YAML Python tag"] = (
        ["train", str(tag)],
        root,
        f"config file {tag}:2: 'tag:yaml.org,2002:python/object/apply:os.system' is not "
        "allowed (plain YAML values only)",
    )
    return cases


def other_model_checkpoint(run: Path, train_args: list[str]) -> Path:
    """A run folder with the settings of ``train_args`` (its config.yaml) and a complete
    checkpoint of a model with another width than the test model."""
    cfg = load_config(None, train_args)
    save_config(cfg, RunDir(run).config)
    mark_run(RunDir(run))
    args = ModelArgs.from_hf_config(json.loads(make_config_json(hidden_size=32)))
    model = Transformer(args)
    model.init_buffers(device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = build_lr_scheduler(opt, "cosine", 0, 10, 0.0)
    # The run's own global batch (one sequence per step) and data, so only the model differs.
    state = TrainState(batch_sequences=1, data_files=data_fingerprints(cfg))
    return save_checkpoint(
        RunDir(run).checkpoints,
        1,
        model=model,
        optimizer=opt,
        states={"train": state, "schedule": sched},
        keep_last=1,
    )


def make_config_json(**overrides) -> str:
    from helpers import llama_config

    return llama_config(**overrides).to_json_string()


@pytest.fixture(scope="module")
def results(tmp_path_factory, cli_server):
    root = tmp_path_factory.mktemp("errors")
    cases = build_cases(root)
    ran = [cli_server.run(argv, cwd) for argv, cwd, _ in cases.values()]
    return {name: (r, cases[name][2], root) for name, r in zip(cases, ran, strict=True)}


ITEMS = [
    "lone surrogate",
    "deeply nested JSON",
    "JSON cut short",
    "50 MB line",
    "chat template raises",
    "parquet bad row",
    "JSON array bad element",
    "zstd JSONL bad line",
    "datasets folder bad row",
    "DatasetDict folder",
    "ShareGPT unknown from",
    "Alpaca without output",
    "unknown data.columns name",
    "empty data file",
    "missing data file (validate)",
    "comma in a data path",
    "missing model folder (train)",
    "missing model folder (validate)",
    "no tokenizer files (train)",
    "no tokenizer files (validate)",
    "config.json invalid",
    "config.json incomplete",
    "truncated safetensors",
    "non-finite weights",
    "tokenizer larger than the vocabulary",
    "index naming a file outside the model folder",
    "checkpoint of another model",
    "output folder holding a user's files",
    "negative seed",
    "data.mix without one weight per file",
    "data.mix with a zero weight",
    "a micro-batch larger than the data",
    "the demo with no steps",
    "YAML syntax error",
    "YAML Python tag",
]


@pytest.mark.parametrize("item", ITEMS)
def test_one_clear_line(results, item):
    result, expected, _ = results[item]
    line = result.error_line()
    assert expected in line, line
    if item == "50 MB line":  # bounded memory: the line was never read whole, nor tokenized
        baseline = results["negative seed"][0].maxrss_mb
        assert result.maxrss_mb < baseline + 200, (result.maxrss_mb, baseline)
    if item == "YAML Python tag":
        assert not (results[item][2] / "pwned").exists()
    if item == "output folder holding a user's files":  # nothing written among them
        mine = results[item][2] / "my-project"
        assert [p.name for p in mine.iterdir()] == ["config.yaml"]
        assert (mine / "config.yaml").read_text() == "experiment: 3\n"


def test_every_item_is_covered(results):
    assert sorted(results) == sorted(ITEMS)


def test_max_example_size_is_what_the_message_says():
    assert MAX_EXAMPLE_BYTES == 8 * 2**20


def test_a_run_folder_inside_a_data_folder_is_never_read_as_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    (data / "more").mkdir()
    (data / "more" / "eval.jsonl").write_text(json.dumps(GOOD) + "\n")
    run = data / "runs" / "first"  # a run folder, as `--output-dir data/runs/first` leaves it
    (run / "hf").mkdir(parents=True)
    mark_run(RunDir(run))
    for name in ("config.yaml", "metrics.jsonl", "export_check.json"):
        (run / name).write_text("{}\n")
    (run / "hf" / "config.json").write_text("{}")
    exported = data / "exported"  # `longtune export ... data/exported`
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    (exported / ".longtune-output").write_text('{"written_by": "longtune"}')
    (data / "more" / "config.yaml").write_text("a user's file: not what makes a run\n")
    assert expand_paths([str(data)], "chat") == [
        str(data / "more" / "eval.jsonl"),
        str(data / "train.jsonl"),
    ]
