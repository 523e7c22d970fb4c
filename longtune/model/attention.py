"""Causal attention for packed documents: one metadata record, one function per backend.

Contract:

- Every backend is ``fn(q, k, v, meta) -> out`` with ``q`` ``(bs, seq, n_heads, head_dim)``,
  ``k``/``v`` ``(bs, seq, n_kv_heads, head_dim)`` (``n_heads`` a multiple of ``n_kv_heads``)
  and ``out`` ``(bs, seq, n_heads, head_dim)``. Head counts come from the tensors, so a
  sequence-parallel wrapper may hand a backend a subset of the heads.
- :class:`AttentionMeta` describes the WHOLE packed micro-batch: its document offsets index the
  flattened ``bs * seq`` token stream of the full sequence, and every length a backend needs
  (total tokens, longest document, the flex block mask's size) comes from the record, never
  from a caller's local shape. Under sequence parallelism the model holds ``seq / sp`` tokens
  per rank, but attention runs (after an all-to-all) over the full sequence with the same
  record, so ``bs * seq == meta.total`` holds where a backend runs.
- Documents never attend to each other; every sequence boundary is a document boundary.
- Things built per forward (the flex block mask) are built lazily, for the shapes the kernel
  sees, and cached on the record, so all layers of one forward share them.

Backends (``model.attention``):

- ``sdpa``: ``F.scaled_dot_product_attention``; one batched causal call when every sequence of
  the micro-batch is one document, else one call per document (the reference path, and the
  CPU path: it runs everywhere, in every dtype).
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, bf16/fp16): PyTorch's
  FlashAttention-2 kernels, or FlashAttention-3 when the ``flash_attn_interface`` module is
  installed (activated once with ``torch.nn.attention.activate_flash_attention_impl("FA3")``).
- ``flex``: compiled FlexAttention with a document-causal block mask built directly from the
  offsets (no ``seq x seq`` mask is ever materialized). CUDA for training; its forward also
  runs on CPU.
- ``auto``: single-document micro-batches → ``sdpa`` (cuDNN / flash); packed micro-batches on
  CUDA in bf16/fp16 → ``varlen``; otherwise ``sdpa``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from longtune.model.args import ATTENTION_BACKENDS

# varlen_attn (torch >= 2.10; importing it costs seconds, so only on first use on CUDA) and how
# this release spells causality: 2.10/2.11 take is_causal=True, later releases
# window_size=(-1, 0); enable_gqa came later too. Read once by load_varlen (called from
# AttentionMeta.prepare, outside compiled code), so compiled code sees constants.
HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None
_VARLEN: dict[str, Any] = {}


def load_varlen() -> dict[str, Any]:
    """``{"fn": varlen_attn, "causal": kwargs, "gqa": bool}`` (imported on the first call)."""
    if not _VARLEN:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        _VARLEN.update(fn=varlen_attn, causal=causal, gqa="enable_gqa" in params)
    return _VARLEN


logger = logging.getLogger(__name__)

FLEX_BLOCK = 128
"""Block size of the flex block mask (FlexAttention's default tile)."""


# ---------------------------------------------------------------------------------------------
# The metadata record
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class AttentionMeta:
    """Document layout of one packed micro-batch, shared by every layer of one forward.

    Build it with :meth:`from_cu_seqlens`. ``cu_seqlens is None`` means no packing: every
    sequence is one causal document (its length is then the kernel's own sequence length).

    Under ``torch.compile`` the kernels read only fields that stay the same from batch to batch
    at a given sequence length (``total``, ``rows``) or that compile as dynamic
    (``cu_seqlens``, ``max_seqlen``, ``block_mask``), so a new document layout does not
    recompile the blocks; ``bounds`` is read only by code kept out of the graphs.
    """

    cu_seqlens: torch.Tensor | None = None
    """``(n_docs + 1,)`` int32 offsets into the flattened ``bs * seq`` stream (model device)."""
    bounds: tuple[int, ...] | None = None
    """The same offsets as Python ints (the per-document path and the block mask)."""
    max_seqlen: int | None = None
    """Longest document."""
    total: int | None = None
    """Tokens of the whole micro-batch (``None`` when unpacked)."""
    rows: int = 0
    """The number of documents when they all have the same length (one per sequence when that
    is the batch size), else 0."""
    block_mask: Any = None
    """The flex block mask of the offsets, once built (:meth:`prepare`)."""
    backend: str = "auto"
    """The attention kernel of this forward (``model.attention``: one of
    :data:`~longtune.model.args.ATTENTION_BACKENDS`)."""
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> AttentionMeta:
        """The record of a micro-batch (one host read of the offsets, no other device sync).

        Args:
            cu_seqlens: document offsets of the whole micro-batch, or ``None`` (unpacked).
            max_seqlen: longest document, if known.
            device: where the kernels run (default: where ``cu_seqlens`` is).
            backend: the attention kernel (``ATTENTION_BACKENDS``).

        Returns:
            The record.

        Raises:
            ValueError: offsets that do not start at 0 or decrease; an unknown backend.
        """
        check_backend(backend)
        if cu_seqlens is None:
            return cls(backend=backend)
        bounds = tuple(int(b) for b in cu_seqlens.tolist())
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if not lengths or bounds[0] != 0 or min(lengths) < 0:
            raise ValueError(
                f"cu_seqlens must start at 0 and never decrease, got {list(bounds)[:8]}..."
            )
        return cls(
            cu_seqlens=cu_seqlens.to(device=device or cu_seqlens.device, dtype=torch.int32),
            bounds=bounds,
            max_seqlen=max_seqlen or max(lengths),
            total=bounds[-1],
            rows=len(lengths) if len(set(lengths)) == 1 else 0,
            backend=backend,
        )

    def one_document_per_sequence(self, bs: int) -> bool:
        """True when every sequence of the ``bs`` sequences is exactly one document."""
        return self.total is None or self.rows == bs

    def check(self, q: torch.Tensor) -> None:
        """The kernel's tokens must be the record's whole micro-batch."""
        bs, seq = q.shape[:2]
        if self.total is not None and bs * seq != self.total:
            raise ValueError(
                f"attention got {bs} x {seq} = {bs * seq} tokens but the document offsets "
                f"describe {self.total}: the kernel must see the whole micro-batch (under "
                "sequence parallelism, run it after the all-to-all)"
            )

    def offsets_for(self, q: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(cu_seqlens, max_seqlen)`` for a varlen kernel; one document per row if unpacked."""
        if self.cu_seqlens is not None:
            return self.cu_seqlens, self.max_seqlen
        bs, seq = q.shape[:2]
        return torch.arange(0, (bs + 1) * seq, seq, dtype=torch.int32, device=q.device), seq

    def flex_block_mask(self, q: torch.Tensor) -> Any:
        """The document-causal block mask over the flattened micro-batch the kernel sees."""
        if self.block_mask is not None:
            return self.block_mask
        return _OUT_OF_GRAPH["lazy_block_mask"](self, q)

    def prepare(self, device: torch.device | str) -> None:
        """Set up what the backend needs before the blocks run, outside compiled code: the flex
        block mask of a packed micro-batch (compiled blocks read it from the record; the same
        mask as the lazy one, its size depends on no local shape), and FlashAttention-3 for
        ``varlen_attn`` on CUDA when it is installed."""
        device, backend = torch.device(device), self.backend
        if backend == "flex":
            load_flex()
            if self.bounds is not None and self.block_mask is None:
                self.block_mask = document_block_mask(self.bounds, device)
        if backend in ("auto", "varlen") and device.type == "cuda" and HAS_VARLEN:
            load_varlen()
            activate_fa3()


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on ``(b, len, heads, d)`` tensors; returns the same layout."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta
) -> torch.Tensor:
    """SDPA: one batched call for one document per sequence, else one call per document."""
    meta.check(q)
    if meta.one_document_per_sequence(q.shape[0]):
        return _sdpa(q, k, v)
    return _OUT_OF_GRAPH["per_document_attention"](q, k, v, meta)


def per_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta
) -> torch.Tensor:
    """The reference path: one causal SDPA call per document, in any dtype on any device.

    Kept out of ``torch.compile`` graphs (:func:`exclude_from_compile`): its loop follows the
    document layout of each batch.
    """
    bs, seq, n_heads, head_dim = q.shape
    qf = q.reshape(1, bs * seq, n_heads, head_dim)
    kf = k.reshape(1, bs * seq, k.shape[2], head_dim)
    vf = v.reshape(1, bs * seq, v.shape[2], head_dim)
    # Each call keeps a batch dimension of 1: without one, CPU SDPA falls back to the math
    # kernel, which materializes and saves the (heads, len, len) attention matrix. split, not
    # indexing: its backward is one concatenation, where each slice's backward would write
    # into a zeroed full-length gradient of its own.
    lengths = [b - a for a, b in zip(meta.bounds[:-1], meta.bounds[1:], strict=True)]
    splits = (t.split(lengths, 1) for t in (qf, kf, vf))
    pieces = zip(*splits, lengths, strict=True)
    outs = [_sdpa(qd, kd, vd) for qd, kd, vd, n in pieces if n]
    return torch.cat(outs, dim=1).reshape(bs, seq, n_heads, head_dim)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta
) -> torch.Tensor:
    """``varlen_attn`` over the flattened micro-batch (CUDA, bf16/fp16; FA2, or FA3)."""
    meta.check(q)
    bs, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    qf = q.reshape(bs * seq, n_heads, head_dim)
    kf = k.reshape(bs * seq, n_kv, head_dim)
    vf = v.reshape(bs * seq, n_kv, head_dim)
    varlen = _VARLEN or load_varlen()
    kwargs = varlen["causal"]
    if n_kv != n_heads:
        if varlen["gqa"]:
            kwargs = {**kwargs, "enable_gqa": True}
        else:
            kf = kf.repeat_interleave(n_heads // n_kv, dim=1)
            vf = vf.repeat_interleave(n_heads // n_kv, dim=1)
    cu, max_seqlen = meta.offsets_for(q)
    out = varlen["fn"](qf, kf, vf, cu, cu, max_seqlen, max_seqlen, **kwargs)
    return out.reshape(bs, seq, n_heads, head_dim)


def document_block_mask(bounds: tuple[int, ...], device: torch.device | str) -> Any:
    """FlexAttention ``BlockMask``: causal within each document of a flattened stream.

    Built from the offsets at block granularity (``FLEX_BLOCK`` tokens): query block ``i``
    sees key blocks from the one holding the start of its first document up to ``i``; a block
    is "full" (no per-element mask needed) when it lies strictly below the diagonal and both
    blocks lie inside one document. No ``total x total`` mask is built; the block tables are
    ``n_blocks x n_blocks`` (at 128-token blocks: 64 M entries at a million tokens, built on
    the CPU for every micro-batch — not measured at that size).

    Args:
        bounds: document offsets ``(0, ..., total)``.
        device: where the kernel runs.

    Returns:
        A ``torch.nn.attention.flex_attention.BlockMask`` of batch 1, one head (broadcast).
    """
    total, blk = bounds[-1], FLEX_BLOCK
    cu = torch.tensor(bounds, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    n_blocks = -(-total // blk)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # (total,)
    starts = torch.arange(n_blocks) * blk
    ends = torch.clamp(starts + blk, max=total) - 1
    first_doc, last_doc = doc[starts], doc[ends]
    lo = cu[first_doc] // blk  # first key block any query of the block sees
    hi = torch.arange(n_blocks)  # the diagonal block
    # Full blocks (no per-element mask): the query block is complete and inside one document,
    # the key block lies strictly below the diagonal and wholly inside that document.
    whole = (first_doc == last_doc) & (starts + blk <= total)
    full_lo = -(-cu[first_doc] // blk)
    n_full = torch.where(whole, (hi - full_lo).clamp(min=0), torch.zeros_like(hi))
    cols = torch.arange(n_blocks)[None, :]
    full_idx = full_lo[:, None] + cols
    # Partial blocks: the rest of [lo, hi], in ascending order (then padding, ignored).
    is_full = (cols >= full_lo[:, None]) & (cols < (full_lo + n_full)[:, None])
    partial = (cols >= lo[:, None]) & (cols <= hi[:, None]) & ~is_full
    n_partial = partial.sum(1)
    partial_idx = torch.argsort((~partial).to(torch.int8), dim=1, stable=True)
    doc_ids = torch.full((n_blocks * blk,), -1, dtype=torch.int32)
    doc_ids[:total] = doc.to(torch.int32)
    doc_ids = doc_ids.to(device)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    def as_mask(n: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.clamp(max=n_blocks - 1)
        return n.to(torch.int32)[None, None].to(device), idx.to(torch.int32)[None, None].to(device)

    kv_num, kv_idx = as_mask(n_partial, partial_idx)
    full_num, full_kv_idx = as_mask(n_full, full_idx)
    return load_flex()["BlockMask"].from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_kv_idx,
        BLOCK_SIZE=blk,
        mask_mod=mask_mod,
        seq_lengths=(total, total),
    )


def _lazy_block_mask(meta: AttentionMeta, q: torch.Tensor) -> Any:
    """The block mask built on first use and cached on the record, so every layer of a forward
    shares it; its size comes from the offsets or, unpacked, from the kernel's own ``q``."""
    bs, seq = q.shape[:2]
    bounds = meta.bounds if meta.bounds is not None else tuple(range(0, bs * seq + 1, seq))
    key = (bounds, q.device)
    if key not in meta._cache:
        meta._cache[key] = document_block_mask(bounds, q.device)
    return meta._cache[key]


# Code whose loops follow each batch's document layout: called through this table, so that
# exclude_from_compile can swap in twins that torch.compile leaves out of its graphs.
_OUT_OF_GRAPH: dict[str, Callable[..., Any]] = {
    "per_document_attention": per_document_attention,
    "lazy_block_mask": _lazy_block_mask,
}


def exclude_from_compile() -> None:
    """Keep the per-document path and the lazy block-mask builder out of ``torch.compile``
    graphs (called by ``apply_compile``; applying ``torch.compiler.disable`` at import time
    would import ``torch._dynamo``, seconds of every process's start)."""
    for name, fn in list(_OUT_OF_GRAPH.items()):
        if not getattr(fn, "_longtune_out_of_graph", False):
            wrapped = torch.compiler.disable(fn)
            wrapped._longtune_out_of_graph = True
            _OUT_OF_GRAPH[name] = wrapped


# FlexAttention (importing it costs seconds, so only when the flex backend is used).
_FLEX: dict[str, Any] = {}


def load_flex() -> dict[str, Any]:
    """``{"fn": flex_attention, "BlockMask": BlockMask, "compiled": None}`` (imported once)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import BlockMask
        from torch.nn.attention.flex_attention import flex_attention as fn

        _FLEX.update(fn=fn, BlockMask=BlockMask, compiled=None)
    return _FLEX


def _compiled_flex() -> Callable[..., torch.Tensor]:
    flex = load_flex()
    if flex["compiled"] is None:
        flex["compiled"] = torch.compile(flex["fn"], dynamic=False)
    return flex["compiled"]


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMeta,
    compiled: bool = True,
) -> torch.Tensor:
    """FlexAttention over the flattened micro-batch with the document-causal block mask.

    Args:
        compiled: the fused kernel (``torch.compile``; inside a compiled block, the block's
            compilation makes it); ``False`` runs FlexAttention's unfused eager reference
            (tests on CPU).
    """
    meta.check(q)
    bs, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    fn = (_FLEX or load_flex())["fn"]
    if compiled and not torch.compiler.is_compiling():
        fn = _compiled_flex()
    out = fn(
        q.reshape(1, bs * seq, n_heads, head_dim).transpose(1, 2),
        k.reshape(1, bs * seq, n_kv, head_dim).transpose(1, 2),
        v.reshape(1, bs * seq, n_kv, head_dim).transpose(1, 2),
        block_mask=meta.flex_block_mask(q),
        enable_gqa=n_kv != n_heads,
    )
    return out.transpose(1, 2).reshape(bs, seq, n_heads, head_dim)


# ---------------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------------


def varlen_available(q: torch.Tensor) -> bool:
    """``varlen_attn`` can run on these inputs (CUDA, bf16/fp16, torch with the module)."""
    return HAS_VARLEN and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


@functools.cache
def activate_fa3() -> bool:
    """Route PyTorch's flash kernels (SDPA flash, ``varlen_attn``) to FlashAttention-3 once,
    when a ``flash_attn_interface`` module is installed and this torch can use it.

    Returns:
        Whether FA3 is active.
    """
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn_interface") is None:
        return False
    if torch.cuda.get_device_capability()[0] != 9:  # FA3 kernels are Hopper-only; no fallback
        logger.info("flash_attn_interface is installed but FA3 needs a Hopper GPU (sm_90)")
        return False
    attn = torch.nn.attention
    if "FA3" not in getattr(attn, "list_flash_attention_impls", lambda: [])():
        logger.info("flash_attn_interface is installed but this torch cannot route to FA3")
        return False
    try:
        attn.activate_flash_attention_impl("FA3")
    except (ImportError, RuntimeError, ValueError) as e:  # a broken or mismatched build
        logger.warning("FlashAttention-3 not activated (%s); using FlashAttention-2", e)
        return False
    logger.info("FlashAttention-3 activated for varlen_attn and SDPA flash")
    return True


BACKEND_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flex": flex_attention,
}
assert set(BACKEND_FUNCTIONS) | {"auto"} == set(ATTENTION_BACKENDS)


def resolve_backend(name: str, q: torch.Tensor, meta: AttentionMeta) -> str:
    """The backend that runs for ``name`` on these inputs (``auto`` → a concrete one)."""
    if name != "auto":
        return name
    if meta.one_document_per_sequence(q.shape[0]):
        return "sdpa"
    if varlen_available(q):
        return "varlen"
    return "sdpa"


def check_backend(
    name: str,
    device_type: str | None = None,
    training: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """Fail early, with the choices, when ``name`` is unknown or cannot run on ``device_type``
    in ``dtype``.

    Args:
        name: the ``model.attention`` setting.
        device_type: ``cuda`` / ``cpu``; ``None`` checks the name only.
        training: whether gradients are needed (FlexAttention has no CPU backward).
        dtype: the compute dtype (``varlen`` needs bfloat16 or float16); ``None``: unchecked.

    Raises:
        ValueError: unknown name, a CUDA-only backend without CUDA, or ``varlen`` in float32.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention={name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if device_type not in (None, "cuda") and (name == "varlen" or (name == "flex" and training)):
        raise ValueError(
            f"model.attention={name} needs a CUDA GPU (this run is on {device_type}); "
            "use model.attention=auto or sdpa"
        )
    if name == "varlen" and dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(
            f"model.attention=varlen needs model.dtype=bfloat16 (the run computes in "
            f"{str(dtype).removeprefix('torch.')}); use model.attention=auto or sdpa"
        )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta
) -> torch.Tensor:
    """Causal attention within each document of ``meta``, with the record's backend.

    Args:
        q: ``(bs, seq, n_heads, head_dim)``.
        k, v: ``(bs, seq, n_kv_heads, head_dim)``.
        meta: the micro-batch's :class:`AttentionMeta`.

    Returns:
        ``(bs, seq, n_heads, head_dim)``.
    """
    return BACKEND_FUNCTIONS[resolve_backend(meta.backend, q, meta)](q, k, v, meta)
