"""The chunked loss equals plain cross-entropy over full logits, values and gradients."""

import pytest
import torch
from helpers import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from longtune.model.loss import MAX_CHUNK_ROWS, MIN_CHUNK_ROWS, chunk_rows, chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, None])
def test_chunked_loss_matches_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 40), generator=g)
    labels[0, :10] = -100
    labels[2, -5:] = -100
    ref = torch.nn.functional.cross_entropy(
        (h @ w.t()).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
    (loss * 0.37).backward()
    assert rel_err(loss, ref) < 1e-6
    assert rel_err(h.grad, gh * 0.37) < 1e-6
    assert rel_err(w.grad, gw * 0.37) < 1e-6


def test_all_ignored_gives_zero_loss_and_grads():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = chunked_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert not h.grad.any() and not w.grad.any()


def test_no_grad_path_computes_no_gradients(monkeypatch):
    """Under no_grad (evaluation) the loss comes without the gradient work, even for
    parameters that require grad."""
    import longtune.model.loss as loss_module

    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    labels = torch.randint(0, 10, (5,))
    labels[1] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="sum")

    def forbidden(*args):
        raise AssertionError("the gradient-computing path ran under no_grad")

    monkeypatch.setattr(loss_module._ChunkedLinearCrossEntropy, "apply", forbidden)
    with torch.no_grad():
        assert rel_err(chunked_cross_entropy(h, w, labels, chunk_size=2), ref) < 1e-6


def test_bf16_loss_matches_fp32_full_logits_within_bf16_tolerance():
    """Logits in bf16 (fp32 accumulation), softmax and loss in fp32: the loss and both
    gradients stay within bf16 rounding of the float32 full-logit reference."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 64, generator=g)
    w = torch.randn(500, 64, generator=g) * 0.2
    labels = torch.randint(0, 500, (300,), generator=g)
    labels[::3] = -100
    h32, w32 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h32 @ w32.t(), labels, reduction="sum")
    ref.backward()
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = chunked_cross_entropy(hb, wb, labels, chunk_size=64)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    assert rel_err(loss, ref) < 1e-2
    assert rel_err(hb.grad, h32.grad) < 2e-2
    assert rel_err(wb.grad, w32.grad) < 2e-2
    assert not hb.grad[::3].any()  # unsupervised rows: zero gradient


class MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matmul (``mm``, ``addmm_``) run under it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default):
            self.shapes.append(tuple(out.shape))
        return out


def test_logits_only_for_supervised_rows():
    """The output projection runs on the supervised rows only: no matmul of the loss has more
    rows than there are supervised tokens."""
    h = torch.randn(2, 200, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    labels = torch.full((2, 200), -100)
    labels[0, 10:15] = 3
    labels[1, 190:] = 7
    with MatmulShapes() as mode:
        chunked_cross_entropy(h, w, labels).backward()
    # logits (15, vocab), hidden-state gradient (15, dim), weight gradient (vocab, dim)
    assert sorted(mode.shapes) == [(15, 16), (15, 1000), (1000, 16)]
    assert not h.grad[0, :10].any() and h.grad[0, 10:15].any()


def test_default_chunk_holds_about_as_many_logits_as_hidden_values():
    """The loss's temporary follows the tokens on the rank (a quarter of the tokens: a quarter
    of the logits per chunk), within the floor and ceiling."""
    assert chunk_rows(4096, 576, 49152) == 64  # SmolLM2 at 4K tokens: 48 -> 64 rows
    assert chunk_rows(16384, 576, 49152) == 256
    assert chunk_rows(16384, 4096, 128256) == 1024  # Llama 3 8B at 16K: 523 -> 1024
    assert chunk_rows(131072, 4096, 128256) == MAX_CHUNK_ROWS
    assert chunk_rows(10, 576, 49152) == MIN_CHUNK_ROWS
    for n, dim, vocab in [(4096, 576, 49152), (5000, 64, 1000), (777, 128, 32000)]:
        rows = chunk_rows(n, dim, vocab)
        assert rows * vocab >= n * dim or rows == MAX_CHUNK_ROWS
        assert rows == MIN_CHUNK_ROWS or (rows // 2) * vocab < n * dim


def test_default_chunking_runs_logits_in_chunks_sized_to_the_tokens():
    h = torch.randn(1000, 64, requires_grad=True)
    w = torch.randn(2000, 64, requires_grad=True)
    labels = torch.randint(0, 2000, (1000,))
    with MatmulShapes() as mode:
        loss = chunked_cross_entropy(h, w, labels)
    logits = [rows for rows, cols in mode.shapes if cols == 2000]
    assert logits == [32] * 31 + [8]  # 1000 x 64 / 2000 = 32 rows per chunk
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="sum")
    assert rel_err(loss, ref) < 1e-5
