"""The real SmolLM2-135M-Instruct weights: same function as transformers, exact round trip."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from test_model import assert_same_checkpoint, hf_reference, native_grads_as_hf

import longtune

pytestmark = pytest.mark.slow


def test_smollm2_logits_and_grads_match_transformers(smollm2_dir):
    ref = hf_reference(smollm2_dir)
    model = longtune.load_model(smollm2_dir, dtype=torch.float32)
    assert model.args.n_heads == 9 and model.args.n_kv_heads == 3 and model.args.tie_embeddings
    assert model.output.weight is model.tok_embeddings.weight
    tok_ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    ref_logits = ref(tok_ids).logits
    logits = model(tok_ids)
    assert rel_err(logits, ref_logits) < 1e-5

    labels = tok_ids[:, 1:]
    torch.nn.functional.cross_entropy(ref_logits[0, :-1], labels[0]).backward()
    torch.nn.functional.cross_entropy(logits[0, :-1], labels[0]).backward()
    theirs = {n: p.grad for n, p in ref.named_parameters()}
    ours = native_grads_as_hf(model, model.args)
    checked = 0
    for key, g in ours.items():
        if key in theirs:
            assert rel_err(g, theirs[key]) < 1e-5, f"grad of {key}: {rel_err(g, theirs[key]):.2e}"
            checked += 1
    assert checked == len(theirs)


def test_smollm2_round_trip_is_bit_identical(smollm2_dir, tmp_path):
    model = longtune.load_model(smollm2_dir)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    out = longtune.save_model(model, tmp_path / "out")
    assert_same_checkpoint(smollm2_dir, out)
    assert (out / "chat_template.jinja").read_text() == (
        smollm2_dir / "chat_template.jinja"
    ).read_text()
