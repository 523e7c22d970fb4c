"""The command line: convert/export round trip, validate exit codes, the help of every command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import make_hf_checkpoint
from test_model import assert_same_checkpoint

from longtune.cli import main
from longtune.train.config import SETTINGS


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_convert_then_export_round_trip(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "hf", tie_word_embeddings=True, num_attention_heads=6)
    assert run(["convert", str(ckpt), str(tmp_path / "native")]) == 0
    assert (tmp_path / "native" / "longtune.json").is_file()
    assert run(["export", str(tmp_path / "native"), str(tmp_path / "out")]) == 0
    assert_same_checkpoint(ckpt, tmp_path / "out")


def test_convert_error_is_a_message_not_a_traceback(tmp_path, capsys):
    assert run(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Traceback" not in err


def test_validate_exit_codes(tmp_path, capsys):
    ckpt = make_hf_checkpoint(tmp_path / "hf")
    good = tmp_path / "good.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good.write_text(json.dumps({"messages": msgs}) + "\n")
    assert run(["validate", str(good), "--model", str(ckpt), "--context-length", "64"]) == 0
    assert "packed sequences" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": msgs[:1]}) + "\n")
    assert run(["validate", str(bad), "--model", str(ckpt)]) == 2
    assert f"{bad}:1" in capsys.readouterr().err


def test_help_of_the_commands(capsys):
    assert run(["convert", "--help"]) == 0
    assert "Hugging Face checkpoint folder" in capsys.readouterr().out
    assert run(["runs", "resume", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--runs-dir RUNS_DIR" in out and "(default: runs)" in out and "--nproc NPROC" in out


def test_train_help_lists_every_setting_within_the_width(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert run(["train", "--help"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for key in SETTINGS:
        assert f"--{key} " in out, key
    assert "--optim.schedule {cosine,linear,constant}" in out and "--context-length INT" in out
    assert "Peak learning rate (AdamW). (default: 1e-05)" in flat
    assert "Settings come from defaults, then CONFIG.yaml, then flags (flags win)." in flat
    assert max(len(line) for line in out.splitlines()) <= 100


def test_help_does_not_import_torch():
    code = (
        "import contextlib, io, sys\n"
        "from longtune.cli import main\n"
        "for argv in (['--help'], ['convert', '--help'], ['validate', '--help'], "
        "['train', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    import longtune.train.run as run_module
    from longtune.cli import train

    def out_of_memory(cfg, **kw):
        raise MemoryError("Unable to allocate 16.0 GiB for an array")

    monkeypatch.setattr(run_module, "run_training", out_of_memory)
    code = train(["--model", "m", "--data", "d.jsonl", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "stopped: out of memory (Unable to allocate 16.0 GiB for an array)" in err
