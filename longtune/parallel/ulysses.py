"""Ulysses sequence parallelism: attention over the whole sequence, heads split across ranks.

Every rank of a sequence-parallel (SP) group holds a contiguous slice ``[r·L/sp, (r+1)·L/sp)``
of one packed micro-batch. Everything but attention is position-wise and runs on the slice.
Around attention, an all-to-all turns the sequence-sharded q/k/v ``(bs, L/sp, heads, d)`` into
head-sharded ``(bs, L, heads/sp, d)`` (gather the sequence, scatter the heads), the model's own
attention kernel runs over the full sequence for the local heads with the *global* document
boundaries, and the inverse all-to-all brings the output back to ``(bs, L/sp, heads, d)``.

Grouped-query attention: when the KV heads divide by ``sp`` they are scattered like the query
heads; when ``sp`` is a multiple of the KV heads each KV head is first repeated ``sp / kv``
times (autograd sums the copies' gradients), so every rank receives the one KV head its query
heads use. Any other combination is refused by :class:`~longtune.parallel.dims.ParallelDims`
before anything is allocated.

The pieces, each testable alone against a single-process reference:

- :func:`all_to_all` — the exchange, with its backward (the inverse exchange);
- :func:`seq_to_heads` / :func:`heads_to_seq` — the two layouts of attention's inputs/outputs;
- :class:`UlyssesAttention` — wraps a model's ``Attention.core`` module (installed from outside
  by :func:`apply_sequence_parallel`, so the model file has no distributed code).

The exchange is built on PyTorch's functional collectives (``_c10d_functional.all_to_all_single``),
which are ordinary dispatcher ops: selective activation checkpointing can keep their outputs,
so the recomputation of a block never repeats the communication.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

from longtune.model.llama import Transformer

# Ops whose outputs selective activation checkpointing keeps (no second exchange in recompute).
SAVE_OPS = (
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops._c10d_functional.wait_tensor.default,
)


def _exchange(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Rank ``r`` sends ``x[j]`` to rank ``j`` and receives rank ``j``'s ``x[r]`` as ``out[j]``."""
    sizes = [1] * x.shape[0]
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), sizes, sizes, group))


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):  # noqa: ANN001
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        # The inverse exchange routes every gradient piece back to the rank that sent it.
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _all_to_all(
    x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int
) -> torch.Tensor:
    n = dist.get_world_size(group)
    # Split the scattered dim into n pieces and bring the piece index to the front.
    shape = list(x.shape)
    split = x.reshape(*shape[:scatter_dim], n, shape[scatter_dim] // n, *shape[scatter_dim + 1 :])
    received = _exchange(split.movedim(scatter_dim, 0), group)  # piece j came from rank j
    # The pieces go, in rank order, in front of the gathered dim, then merge with it.
    gathered = received.movedim(0, gather_dim)
    out_shape = list(shape)
    out_shape[scatter_dim] //= n
    out_shape[gather_dim] *= n
    return gathered.reshape(out_shape)


def all_to_all(
    x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int
) -> torch.Tensor:
    """Scatter ``x`` along ``scatter_dim`` over the ranks of ``group``, gather along ``gather_dim``.

    Rank ``r`` ends with piece ``r`` of every rank's ``scatter_dim``, concatenated in rank order
    along ``gather_dim``. Differentiable: the backward pass is the inverse exchange.

    Args:
        x: this rank's tensor; ``x.shape[scatter_dim]`` must divide by the group size.
        group: the sequence-parallel process group.
        scatter_dim: the dimension split across ranks (e.g. heads).
        gather_dim: the dimension concatenated from all ranks (e.g. sequence).

    Returns:
        ``x`` with ``shape[scatter_dim] / n`` and ``shape[gather_dim] * n``.
    """
    if x.shape[scatter_dim] % dist.get_world_size(group):
        raise ValueError(
            f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} does not divide by the "
            f"group size {dist.get_world_size(group)}"
        )
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(bs, L/sp, heads, d)`` sequence-sharded → ``(bs, L, heads/sp, d)`` head-sharded."""
    return all_to_all(x, group, scatter_dim=2, gather_dim=1)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(bs, L, heads/sp, d)`` head-sharded → ``(bs, L/sp, heads, d)`` sequence-sharded."""
    return all_to_all(x, group, scatter_dim=1, gather_dim=2)


class UlyssesAttention(nn.Module):
    """Sequence-parallel wrapper around an attention kernel module.

    Called exactly like the wrapped module, ``(q, k, v, *meta)`` with this rank's slice
    ``q: (bs, L/sp, n_heads, d)``, ``k, v: (bs, L/sp, n_kv_heads, d)``; the remaining arguments
    (document boundaries and the like) describe the *whole* sequence and are passed through.

    Args:
        inner: the attention kernel (the model's ``Attention.core``).
        group: the sequence-parallel process group.
    """

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self.sp = dist.get_world_size(group)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *meta: Any, **kw: Any
    ) -> torch.Tensor:
        n_kv = k.shape[2]
        if n_kv % self.sp:
            # Fewer KV heads than ranks: one copy per rank, in rank order.
            k = k.repeat_interleave(self.sp // n_kv, dim=2)
            v = v.repeat_interleave(self.sp // n_kv, dim=2)
        q, k, v = (seq_to_heads(t, self.group) for t in (q, k, v))  # (bs, L, heads/sp, d)
        out = self.inner(q, k, v, *meta, **kw)
        return heads_to_seq(out, self.group)  # (bs, L/sp, n_heads, d)


def apply_sequence_parallel(model: Transformer, group: dist.ProcessGroup) -> None:
    """Wrap every block's attention kernel in :class:`UlyssesAttention` over ``group``.

    Also makes the model refuse a forward without ``position_ids``: on a slice of the sequence
    the model's fallback (positions derived from the document offsets) would be wrong.
    """
    for block in model.layers.values():
        block.attention.core = UlyssesAttention(block.attention.core, group)
    model.register_forward_pre_hook(_require_positions, with_kwargs=True)


def _require_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    if position_ids is None:
        raise ValueError(
            "under sequence parallelism the model needs position_ids: every token's position in "
            "its document, computed on the whole sequence before slicing"
        )
