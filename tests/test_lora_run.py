"""LoRA runs end to end: `longtune train --model.lora.rank=8` on the SmolLM2 shape (9 heads,
3 KV heads, tied embeddings), its merged and PEFT exports checked with ``transformers`` and
``peft``, kill -9 and resume, and a resume from SP=3 to one process.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint, rel_err
from test_model import read_all
from test_train_run import _kill_when, env, run_cli
from test_train_sp import _resume_copy, assert_same_run, launch, train_records, write_sums

from longtune.checkpoint import CheckpointTensors
from longtune.checkpoint.dcp_safe import read_metadata
from longtune.model.convert import load_model
from longtune.model.lora import LoraSpec, add_lora, is_adapter

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")
SMOL_SHAPE = dict(
    vocab_size=128,
    hidden_size=72,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)
SPEC = LoraSpec(rank=8, alpha=16.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    write_sums(root / "train.jsonl")
    return {
        "root": root,
        "model": make_hf_checkpoint(root / "model", seed=1, **SMOL_SHAPE),
        "other": make_hf_checkpoint(root / "other", seed=2, **{**SMOL_SHAPE, "vocab_size": 130}),
        "train": root / "train.jsonl",
        "cache": root / "cache",
    }


def lora_args(setup, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model", str(setup["model"]),
        "--data", str(setup["train"]),
        "--context-length", "96",
        "--duration", "4st",
        "--lr", "3e-3",
        "--output-dir", str(out),
        f"--data.cache_dir={setup['cache']}",
        "--checkpoint.every=1",
        "--checkpoint.keep_last=5",
        "--model.lora.rank=8",
        "--export.lora_adapter",
        *extra,
    ]  # fmt: skip


def run(nproc: int, args: list) -> Path:
    r = subprocess.run(launch(nproc, args), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return Path(args[args.index("--output-dir") + 1])


@pytest.fixture(scope="module")
def lora_run(setup):
    return run(1, lora_args(setup, setup["root"] / "lora", "--grad-accum", "2"))


def _native_logits(setup, ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(setup["model"], dtype=torch.float32)
    add_lora(model, SPEC)
    trained = CheckpointTensors(ckpt)
    model.load_state_dict({n: trained[n] for n in trained}, strict=False)
    with torch.no_grad():
        return model(ids)


def test_a_lora_run_checkpoints_adapters_and_exports_merged_and_peft(setup, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    losses = {s: r["loss"] for s, r in train_records(lora_run).items()}
    assert losses[4] < losses[1]
    ckpt = lora_run / "checkpoints" / "step-4"
    names = list(CheckpointTensors(ckpt))
    assert names and all(is_adapter(n) for n in names)  # the base is not in the checkpoint
    assert len(names) == 2 * 7 * 2  # A and B for 7 projections in 2 layers

    # Every tensor without an adapter is the source's, bit for bit; the adapted ones moved.
    source, merged = read_all(setup["model"]), read_all(lora_run / "hf")
    assert sorted(source) == sorted(merged)
    for key in source:
        same = torch.equal(source[key], merged[key])
        assert same == ("proj" not in key), key

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(lora_run / "hf", dtype=torch.float32)
        merged_logits = hf(ids).logits
        base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
        peft_logits = PeftModel.from_pretrained(base, lora_run / "adapter")(ids).logits
    native = _native_logits(setup, ckpt, ids)
    assert rel_err(peft_logits, merged_logits) < 1e-5
    assert rel_err(native, merged_logits) < 1e-5
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(setup["model"].resolve())
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)

    # `longtune export` of the checkpoint writes both again, the same.
    out = setup["root"] / "exported"
    r = run_cli(["export", str(ckpt), str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    again = read_all(out)
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    a = (out.parent / "exported-adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (lora_run / "adapter" / "adapter_model.safetensors").read_bytes()

    # Another base model under these adapters is refused in one line.
    r = run_cli(["export", str(ckpt), str(setup["root"] / "x"), "--base", str(setup["other"])])
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "is not the base model these LoRA adapters" in lines[0], r.stderr


def test_kill9_then_the_same_command_gives_identical_adapters(setup, lora_run):
    out = setup["root"] / "killed"
    args = [sys.executable, "-m", "longtune", *lora_args(setup, out, "--grad-accum", "2")]
    ckpts = out / "checkpoints"
    rng = random.Random(7)

    def steps_done() -> int:
        return len(train_records(out)) if (out / "metrics.jsonl").exists() else 0

    def writing_checkpoint() -> bool:
        return ckpts.exists() and any(".tmp-" in p.name for p in ckpts.iterdir())

    kills = 0
    for ready in (writing_checkpoint, lambda: steps_done() >= 2 and rng.random() < 0.05):
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        kills += _kill_when(proc, ready)
    assert kills >= 1
    final = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in (out / "train.log").read_text()
    a, b = (
        CheckpointTensors(ckpts / "step-4"),
        CheckpointTensors(lora_run / "checkpoints" / "step-4"),
    )
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # No optimizer state but the adapters' (their two Adam moments and step counts).
    keys = read_metadata(ckpts / "step-4").state_dict_metadata
    optim = {k[12:].rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}
    assert optim and all(is_adapter(n) for n in optim), sorted(optim)[:3]


def test_sp3_lora_equals_one_process_and_resumes_on_one(setup, lora_run):
    """SP=3 (3 heads and 1 KV head per rank) trains the same adapters; its checkpoint of step 2
    resumed by one process finishes the same run."""
    sp3 = run(3, lora_args(setup, setup["root"] / "lora-sp3", "--sp", "3", "--grad-accum", "2"))
    assert_same_run(sp3, lora_run, steps=(1, 2, 3, 4))
    out = _resume_copy(sp3, setup["root"] / "lora-sp3-resumed", keep_step=2)
    run(1, lora_args(setup, out, "--grad-accum", "2"))
    assert "resumed from" in (out / "train.log").read_text()
    assert_same_run(out, lora_run, steps=(1, 2, 3, 4))


def test_trained_embeddings_with_tied_output_export_for_peft(setup):
    """train_embeddings on a tied model: the embedding (= output) matrix is trained in full;
    PEFT's folder (modules_to_save, weight tying kept) gives the merged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run(
        1,
        lora_args(
            setup,
            setup["root"] / "lora-embed",
            "--model.lora.targets=q_proj,v_proj",
            "--model.lora.train_embeddings",
            "--duration=2st",
        ),
    )
    source, merged = read_all(setup["model"]), read_all(out / "hf")
    embed = "model.embed_tokens.weight"
    assert not torch.equal(source[embed], merged[embed])
    assert torch.equal(
        source["model.layers.0.self_attn.k_proj.weight"],
        merged["model.layers.0.self_attn.k_proj.weight"],
    )
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
        got = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert rel_err(got, want) < 1e-5


def test_bfloat16_lora_under_fsdp_keeps_the_base_in_bfloat16(setup):
    """Two data-parallel ranks (FSDP2), bf16 compute: the frozen base is stored in bf16 (no
    float32 copy), the adapters in float32; the run trains and exports."""
    out = run(
        2,
        lora_args(setup, setup["root"] / "lora-bf16", "--model.dtype=bfloat16", "--duration=2st"),
    )
    log = (out / "train.log").read_text()
    assert "in float32, the frozen base in torch.bfloat16" in log
    losses = [r["loss"] for r in train_records(out).values()]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
