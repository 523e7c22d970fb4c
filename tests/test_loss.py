"""The chunked loss equals plain cross-entropy over full logits, values and gradients."""

import pytest
import torch
from helpers import rel_err

from longtune.model.loss import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
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
