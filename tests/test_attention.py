"""Every attention backend computes causal attention within each packed document: values and
gradients against a dense masked reference (float64), on CPU where the backend runs there,
on CUDA otherwise (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from longtune.model.attention import (
    FLEX_BLOCK,
    AttentionMeta,
    attention,
    check_backend,
    document_block_mask,
    flex_attention,
    resolve_backend,
)

CUDA = torch.cuda.is_available()
# Two packed rows of 150 tokens; documents cross no row boundary; one of 1 token, lengths not
# multiples of the flex block; a row that is a single document.
LAYOUTS = {
    "packed": [0, 1, 37, 150, 300],
    "one-doc-per-row": [0, 150, 300],
}


def dense_reference(q, k, v, bounds):
    """Explicit softmax(q k^T / sqrt(d) + mask) v in float64 over the flattened stream."""
    bs, seq, h, d = q.shape
    qf, kf, vf = (t.double().reshape(bs * seq, t.shape[2], d) for t in (q, k, v))
    kf = kf.repeat_interleave(h // k.shape[2], dim=1)
    vf = vf.repeat_interleave(h // k.shape[2], dim=1)
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())
    pos = torch.arange(bs * seq)
    allowed = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    scores = torch.einsum("qhd,khd->hqk", qf, kf) / d**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).reshape(bs, seq, h, d)


def inputs(device="cpu", dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 150, 6, 16, generator=g)
    k = torch.randn(2, 150, 2, 16, generator=g)
    v = torch.randn(2, 150, 2, 16, generator=g)
    return [t.to(device, dtype).requires_grad_(grad) for t in (q, k, v)]


def check_against_reference(backend, bounds, device, dtype, tol, **kw):
    q, k, v = inputs(device, dtype, grad=kw.get("compiled") is not False)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    meta = AttentionMeta.from_cu_seqlens(cu, backend=backend)
    out = flex_attention(q, k, v, meta, **kw) if kw else attention(q, k, v, meta)
    ref = dense_reference(q, k, v, bounds)
    assert rel_err(out.float().cpu(), ref) < tol
    if not q.requires_grad:
        return
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (out.float() * w).sum().backward()
    grads = [t.grad.float().cpu() for t in (q, k, v)]
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    (dense_reference(*refs, bounds) * w.double().cpu()).sum().backward()
    for got, r in zip(grads, refs, strict=True):
        assert rel_err(got, r.grad) < tol


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sdpa_backend_matches_dense_reference(layout):
    check_against_reference("sdpa", LAYOUTS[layout], "cpu", torch.float32, 1e-5)


def test_unpacked_sequences_are_causal_per_row():
    q, k, v = inputs()
    out = attention(q, k, v, AttentionMeta.from_cu_seqlens(None))
    assert rel_err(out, dense_reference(q, k, v, [0, 150, 300])) < 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flex_forward_on_cpu_matches_dense_reference(layout):
    """FlexAttention's unfused reference runs on CPU (no backward there): the block mask and
    mask function are what this checks; the compiled kernel is checked on CUDA below."""
    check_against_reference("flex", LAYOUTS[layout], "cpu", torch.float32, 1e-5, compiled=False)


@pytest.mark.parametrize(
    "bounds",
    [
        [0, 1, 37, 150, 300],  # partial last block, an unaligned document start
        [0, 128, 256, 384],  # block-aligned documents: full blocks below the diagonal
        [0, 500, 700, 1000],  # long documents spanning several blocks
        [0, 20, 40, 60, 80, 1024],  # many documents in the first block
    ],
)
def test_document_block_mask_equals_create_block_mask(bounds):
    """The block mask built from the offsets has exactly the partial and full blocks that
    ``create_block_mask`` finds by evaluating the mask everywhere."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = bounds[-1]
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    ref = create_block_mask(mask_mod, None, None, total, total, device="cpu", BLOCK_SIZE=FLEX_BLOCK)
    ours = document_block_mask(tuple(bounds), "cpu")

    def block_sets(num, idx):
        return [set(idx[0, 0, i, : int(num[0, 0, i])].tolist()) for i in range(num.shape[-1])]

    assert block_sets(ours.kv_num_blocks, ours.kv_indices) == block_sets(
        ref.kv_num_blocks, ref.kv_indices
    )
    assert block_sets(ours.full_kv_num_blocks, ours.full_kv_indices) == block_sets(
        ref.full_kv_num_blocks, ref.full_kv_indices
    )


def test_meta_describes_the_whole_micro_batch():
    meta = AttentionMeta.from_cu_seqlens(torch.tensor([0, 5, 12, 16], dtype=torch.int32))
    assert meta.total == 16 and meta.max_seqlen == 7 and meta.bounds == (0, 5, 12, 16)
    assert not meta.one_document_per_sequence(2)
    assert AttentionMeta.from_cu_seqlens(torch.tensor([0, 8, 16])).one_document_per_sequence(2)
    # A kernel that sees only a slice (e.g. before a sequence-parallel all-to-all) is refused.
    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match="8 tokens but the document offsets describe 16"):
        attention(q, q, q, meta)
    with pytest.raises(ValueError, match="never decrease"):
        AttentionMeta.from_cu_seqlens(torch.tensor([0, 9, 4]))


def test_backend_choice_and_clear_errors():
    q = torch.zeros(1, 16, 2, 4)
    packed = AttentionMeta.from_cu_seqlens(torch.tensor([0, 5, 16]))
    assert resolve_backend("auto", q, packed) == "sdpa"  # CPU
    assert resolve_backend("auto", q, AttentionMeta()) == "sdpa"
    check_backend("flex", "cpu", training=False)  # the forward runs on CPU
    with pytest.raises(ValueError, match="needs a CUDA GPU.*model.attention=auto or sdpa"):
        check_backend("varlen", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_backend("flex", "cpu")
    with pytest.raises(ValueError, match="model.attention=varlen needs model.dtype=bfloat16"):
        check_backend("varlen", "cuda", dtype=torch.float32)
    check_backend("varlen", "cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'fa9' is not one of auto, sdpa, varlen, flex"):
        check_backend("fa9")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flex"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_backends_match_dense_reference(backend, layout):
    check_against_reference(backend, LAYOUTS[layout], "cuda", torch.bfloat16, 2e-2)
