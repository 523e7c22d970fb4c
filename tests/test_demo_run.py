"""The demo path on the bundled demo data: 20+ steps lower the eval loss, export loads and generates.

Uses the real SmolLM2 tokenizer and chat template with a small randomly initialised Llama (the
real 135M model takes minutes per run on 2 cores; `longtune demo` runs it, see
docs/benchmarks.md for its numbers)."""

from __future__ import annotations

import pytest
import torch
from helpers import llama_config

import longtune
from longtune.demo.run import DATA_DIR, generate_answer

pytestmark = pytest.mark.slow


def test_twenty_steps_on_demo_data_lower_eval_loss(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path / "model")
    run = longtune.finetune(
        model=str(tmp_path / "model"),
        train_data=str(DATA_DIR / "train.jsonl"),
        eval_data=str(DATA_DIR / "eval.jsonl"),
        context_length=1024,
        duration="20st",
        learning_rate=3e-3,
        output_dir=str(tmp_path / "run"),
        train__eval_batches=4,
        data__cache_dir=str(tmp_path / "cache"),
    )
    assert run.status == "succeeded" and run.final_step == 20
    before, after = run.eval_losses[0], run.eval_losses[-1]
    assert after < before - 0.5, (before, after)
    assert run.export_check["passed"]
    heldout_prompt = [
        {"role": "user", "content": "According to the documents, what does `os.getcwd` do?"}
    ]
    assert isinstance(generate_answer(run.export_dir, heldout_prompt, max_new_tokens=4), str)
