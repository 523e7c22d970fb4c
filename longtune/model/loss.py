"""Chunked linear + cross-entropy that never materializes ``[tokens, vocab]`` logits.

The output projection and the loss are computed chunk by chunk in the forward pass, and the
gradients of the hidden states and of the output matrix are computed right there (the gradient
of cross-entropy w.r.t. logits is ``softmax - onehot``), so neither pass ever holds more than
``chunk_size x vocab`` logits. The backward pass only scales the stored gradients. This works
unchanged under FSDP2: the weight used is the unsharded one of the forward, and its gradient
flows back through autograd like any other.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):  # noqa: ANN001
        # hidden: (n, dim); weight: (vocab, dim); labels: (n,)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            lab = labels[start:end]
            mask = lab != IGNORE_INDEX
            if not bool(mask.any()):
                continue
            h = hidden[start:end]
            logits = (h @ weight.t()).float()  # (chunk, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            safe = torch.where(mask, lab, 0)
            target = logits.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - target) * mask).sum()
            if need_h or need_w:
                # d(sum of token losses)/d(logits) = softmax - onehot, zero on ignored tokens.
                g = torch.exp(logits - lse[:, None])
                g[torch.arange(end - start, device=g.device), safe] -= 1.0
                g *= mask[:, None]
                if need_h:
                    grad_h[start:end] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += g.t() @ h.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``labels``.

    Args:
        hidden: ``(..., dim)`` final hidden states.
        weight: ``(vocab, dim)`` output projection.
        labels: ``(...)`` target ids, already shifted; ``-100`` is ignored.
        chunk_size: tokens per chunk (peak extra memory ``chunk_size x vocab`` floats).

    Returns:
        Scalar float32 sum over supervised tokens (divide by the global supervised-token count).
    """
    dim = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, dim), labels.reshape(-1)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # Evaluation: the loss only. (Inside the autograd function, needs_input_grad is true
        # under no_grad too, and it would compute and store both gradients for nothing.)
        return _loss_sum(hidden, weight, labels, chunk_size)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size)


def _loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start : start + chunk_size] @ weight.t()).float()
        total += torch.nn.functional.cross_entropy(
            logits, labels[start : start + chunk_size], ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total
