"""Chunked linear + cross-entropy over the supervised tokens only.

Contract:

- The rows whose label is ``IGNORE_INDEX`` are dropped *before* the output projection, so their
  logits are never computed (in long-context chat data most tokens are prompt and carry no
  loss); their hidden-state gradient is zero.
- The output projection of each chunk of rows runs in the compute dtype (bf16 on tensor cores
  with float32 accumulation inside the matmul; float32 when the model is float32); the
  log-softmax, the loss and the gradient of the logits are float32, and the output matrix's
  gradient is accumulated in float32 over the chunks (in a bf16 step each chunk's product is
  a bf16 ``vocab x dim`` temporary, rounded once before it is added). No float32 matmul runs
  in a bf16 step.
- The gradients of the hidden states and of the output matrix are computed in the forward pass
  (the gradient of cross-entropy w.r.t. logits is ``softmax - onehot``), so neither pass ever
  holds more than ``chunk_size x vocab`` logits; the backward pass only scales them. This works
  unchanged under FSDP2: the weight used is the unsharded one of the forward, and its gradient
  flows back through autograd like any other.
- By default a chunk holds about as many logits as there are values in the supervised rows'
  hidden states (:func:`chunk_rows`): the loss's temporary grows with the tokens on this rank,
  like every activation, instead of being a fixed ``1024 x vocab`` block. Under sequence
  parallelism, where each rank holds ``1/sp`` of the tokens, a fixed block would not shrink
  with the group.
- The result is the float32 *sum* of token losses (the caller divides by the global count).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

IGNORE_INDEX = -100
MIN_CHUNK_ROWS = 32
MAX_CHUNK_ROWS = 1024


def chunk_rows(n: int, dim: int, vocab: int) -> int:
    """Rows per loss chunk for ``n`` rows of width ``dim`` and a ``vocab``-sized output.

    The smallest power of two at or above ``n * dim / vocab`` (a chunk's logits then take about as
    much memory as the ``n`` hidden states), within ``[MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]``: the
    floor keeps each matmul large enough to be efficient, the ceiling bounds the temporary
    (1024 rows of a 128K vocabulary are 0.5 GB in float32) when one rank holds many tokens.
    """
    want = max(1, -(-n * dim // vocab))
    return min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, 1 << (want - 1).bit_length()))


def chunk_starts(n: int, chunk_size: int) -> Iterable[int]:
    """The first row of each chunk (the memory planner's trace replaces it: every chunk but
    the last is the same work on the same shapes)."""
    return range(0, n, chunk_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):  # noqa: ANN001
        # hidden: (n, dim) supervised rows only; weight: (vocab, dim); labels: (n,), all valid
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        w = weight.to(hidden.dtype)
        for start in chunk_starts(n, chunk_size):
            end = min(start + chunk_size, n)
            h, lab = hidden[start:end], labels[start:end]
            logits = (h @ w.t()).float()  # (chunk, vocab): compute-dtype matmul, fp32 softmax
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, lab[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d(sum of token losses)/d(logits) = softmax - onehot, in place of the logits.
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(end - start, device=g.device), lab] -= 1.0
                g = g.to(h.dtype)
                if need_h:
                    grad_h[start:end] = g @ w
                if need_w and grad_w.dtype == h.dtype:
                    grad_w.addmm_(g.t(), h)  # float32: no (vocab, dim) temporary
                elif need_w:
                    grad_w += g.t() @ h  # bf16 product (a temporary), added in float32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def supervised_rows(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``hidden`` (flattened to ``(n, dim)``) and ``labels`` that carry a loss.

    Differentiable in ``hidden`` (the other rows get a zero gradient). One host sync for the
    count of supervised rows.
    """
    dim = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, dim), labels.reshape(-1).to(hidden.device)
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() == labels.numel():
        return hidden, labels
    return hidden.index_select(0, keep), labels.index_select(0, keep)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``labels``.

    Args:
        hidden: ``(..., dim)`` final hidden states.
        weight: ``(vocab, dim)`` output projection.
        labels: ``(...)`` target ids, already shifted; ``-100`` is ignored (and its logits
            are never computed).
        chunk_size: supervised tokens per chunk (peak extra memory about
            ``chunk_size x vocab`` floats); ``None``: :func:`chunk_rows` of the supervised
            rows.

    Returns:
        Scalar float32 sum over supervised tokens (divide by the global supervised-token count).
    """
    hidden, labels = supervised_rows(hidden, labels)
    if chunk_size is None:
        chunk_size = chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # Evaluation: the loss only. (Inside the autograd function, needs_input_grad is true
        # under no_grad too, and it would compute and store both gradients for nothing.)
        return _loss_sum(hidden, weight, labels, chunk_size)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size)


def _loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    w = weight.to(hidden.dtype)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start : start + chunk_size] @ w.t()).float()
        total += torch.nn.functional.cross_entropy(
            logits, labels[start : start + chunk_size], reduction="sum"
        )
    return total
