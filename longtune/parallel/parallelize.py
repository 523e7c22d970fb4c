"""Apply parallelism and memory savings to a native model from outside, in a fixed order:

0. sequence parallelism (when the mesh's ``sp`` dimension is > 1): every block's
   ``Attention.core`` wrapped in Ulysses all-to-alls over the ``sp`` group;
1. tiled MLP (optional, ``tiled_mlp``): every block's ``feed_forward`` runs over the (local)
   sequence in tiles of about ``dim`` tokens, forward and backward
   (:class:`~longtune.model.tiled.TiledMLP`), so its ``tokens x ffn_dim`` intermediates never
   exist whole; parameter names do not change;
2. activation checkpointing (none | selective | full) around each block; selective keeps the
   attention kernel's outputs (and the all-to-all outputs only with ``keep_exchanges``); with
   ``offload_activations`` the block inputs it keeps wait in host memory
   (:mod:`longtune.parallel.offload`);
3. ``torch.compile`` of each block (optional), so its elementwise work (RMSNorm, RoPE,
   SiLU * up, residual adds) fuses; the checkpointing wrapper is compiled with the block (with
   a tiled MLP, which runs eagerly between two graphs, the block inside the wrapper);
4. FSDP2 (``fully_shard``) of each block, then of the root, over all ranks of the mesh
   (dp x sp flattened), with bf16 compute / fp32 reduction on GPU; skipped on a single rank
   without mixed precision (a plain model: nothing to shard or cast). With ``cpu_offload``,
   FSDP2's ``CPUOffloadPolicy``: parameters, gradients and optimizer state in host memory.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from longtune.model.attention import exclude_from_compile
from longtune.model.llama import Transformer
from longtune.model.tiled import TiledMLP, tile_norms
from longtune.model.tiled import exclude_from_compile as exclude_tiled_mlp_from_compile
from longtune.parallel.offload import ActivationOffloader, OffloadingCheckpointWrapper
from longtune.parallel.ulysses import SAVE_OPS as _SP_SAVE_OPS
from longtune.parallel.ulysses import apply_sequence_parallel

AC_MODES = ("none", "selective", "full")

# Selective checkpointing keeps the outputs of the attention kernel (quadratic in the document
# length: the one op worth its memory) and recomputes everything else of a block in the
# backward pass: norms, RoPE, SiLU * up, the residual adds and every projection (w2's output is
# never needed again, the recompute stops before it). Every projection of a block reads a
# model-dimension (or attention-output) vector, so each frees the same memory per FLOP
# recomputed: the matmuls of full checkpointing, without recomputing attention.
# Under sequence parallelism the all-to-alls are replayed too, so that a rank keeps 1/sp of
# the activations; keeping their outputs (parallel.keep_exchanges) saves the replayed
# exchanges for more memory than one process keeps in all. Both measured in
# docs/benchmarks.md; test_model_perf.py pins what is kept.
_KEPT_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
# FlexAttention's higher-order op; the op behind torch.nn.attention.varlen.varlen_attn (the
# packed-sequence GPU path) is matched by name: it exists only once that module is imported,
# which longtune does on first use on CUDA (the import costs seconds).
if hasattr(torch.ops.higher_order, "flex_attention"):
    _KEPT_OPS.add(torch.ops.higher_order.flex_attention)
_KEPT_OP_NAMES = {"torch_attn::_varlen_attn"}


def _op_name(op: object) -> str:
    name = getattr(op, "name", None)
    return name() if callable(name) else ""


def _selective_context(keep_exchanges: bool = False):  # noqa: ANN202
    kept = _KEPT_OPS | set(_SP_SAVE_OPS) if keep_exchanges else _KEPT_OPS

    def policy(ctx, op, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        keep = op in kept or _op_name(op) in _KEPT_OP_NAMES
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_tiled_mlp(model: Transformer, tile: int | None = None) -> None:
    """Run every block's MLP over the sequence in tiles, forward and backward.

    Each ``feed_forward`` becomes a :class:`~longtune.model.tiled.TiledMLP` of itself: the same
    parameters under the same names (a checkpoint saved with tiling loads without, and back),
    computed ``tile`` tokens at a time so that the ``tokens x 2 ffn_dim`` gate/up
    intermediates exist for one tile only (their gradients too). The block's ``ffn_norm`` runs
    inside the tiles (its normalized rows are not kept whole for the backward pass); the other
    RMSNorms are tiled too (:func:`~longtune.model.tiled.tile_norms`: their float32 work one
    tile at a time, only the input and ``1 / rms`` saved). Apply after sequence parallelism
    (the tiles are over a rank's own tokens) and before activation checkpointing.

    Args:
        model: the native model (any device, the meta device included).
        tile: tokens per tile; None = ALST's rule, ``ceil(tokens / dim)`` equal tiles (about
            ``dim`` tokens each, :func:`~longtune.model.tiled.tile_tokens`).
    """
    for block in model.layers.values():
        if not isinstance(block.feed_forward, TiledMLP):
            block.feed_forward = TiledMLP(block.feed_forward, tile, norm=block.ffn_norm)
    tile_norms(model, tile)


def apply_activation_checkpointing(
    model: Transformer, mode: str, keep_exchanges: bool = False, offload: bool = False
) -> None:
    """Wrap every block for activation checkpointing.

    Args:
        mode: ``none``; ``full`` (keep only block inputs); ``selective`` (also keep the
            attention kernel's outputs; recompute the rest).
        keep_exchanges: with ``selective``, also keep the outputs of the SP all-to-alls (no
            exchange replayed in the backward pass, about twice the activation memory).
        offload: keep the block inputs in host memory between the forward pass and the
            block's recompute (:mod:`longtune.parallel.offload`); needs ``selective`` or
            ``full``.
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "none":
        if offload:
            raise ValueError(
                "activation offload moves what checkpointing keeps: needs selective or full"
            )
        return
    kw: dict = {"preserve_rng_state": False}
    if mode == "selective":
        kw["context_fn"] = functools.partial(_selective_context, keep_exchanges)
    offloader = ActivationOffloader() if offload else None
    blocks = list(model.layers.named_children())
    for i, (name, block) in enumerate(blocks):
        if offloader is None:
            wrapped = checkpoint_wrapper(block, **kw)
        else:
            wrapped = OffloadingCheckpointWrapper(
                block, offloader, index=i, last=i == len(blocks) - 1, **kw
            )
        model.layers.register_module(name, wrapped)


def apply_compile(model: Transformer) -> None:
    """Compile every block with ``torch.compile`` (after activation checkpointing, before FSDP).

    Blocks share their code, so one compiled graph serves them all. The per-document attention
    path and the flex block-mask builder stay outside the graphs (they follow each batch's
    document layout); ``varlen_attn`` and FlexAttention are traced into them. A tiled MLP runs
    eagerly between two graphs of its block (inside the checkpoint, when there is one).
    """
    exclude_from_compile()
    exclude_tiled_mlp_from_compile()
    for name, block in model.layers.named_children():
        inner = getattr(block, "_checkpoint_wrapped_module", None)
        if inner is not None and (
            isinstance(inner.feed_forward, TiledMLP)
            or isinstance(block, OffloadingCheckpointWrapper)
        ):
            # A tiled MLP stays out of the graphs (its backward runs autograd itself): the
            # block's graph breaks around it, and a checkpoint cannot be compiled across a break
            # (the whole block would run eagerly). Compile the block inside the checkpoint.
            # Likewise the offload's stash (streams and host copies are no graph's business).
            block.register_module("_checkpoint_wrapped_module", torch.compile(inner))
        else:
            model.layers.register_module(name, torch.compile(block))


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    cpu_offload: bool = False,
) -> None:
    """Shard parameters, gradients and optimizer state over every rank of ``mesh``.

    Args:
        cpu_offload: keep the shards (parameters, gradients, so optimizer state) in pinned
            host memory, copied to the device for each block's forward and backward; the
            optimizer step then runs on the CPU (FSDP2's ``CPUOffloadPolicy``; CUDA only).
    """
    flat = mesh if mesh.ndim == 1 else mesh._flatten("dp_sp")
    kw = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),  # (no offload)
    }
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block is needed again right away by the backward pass: keep it gathered.
        fully_shard(block, mesh=flat, reshard_after_forward=i < len(blocks) - 1, **kw)
    fully_shard(model, mesh=flat, **kw)


def is_fsdp_sharded(model: nn.Module) -> bool:
    """Whether :func:`parallelize` sharded ``model`` with FSDP (it does not on one rank
    without mixed precision)."""
    return isinstance(model, FSDPModule)


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    ac_mode: str,
    param_dtype: torch.dtype | None,
    compile: bool = False,
    keep_exchanges: bool = False,
    tiled_mlp: bool = False,
    cpu_offload: bool = False,
    offload_activations: bool = False,
) -> nn.Module:
    """Apply sequence parallelism, tiled MLP (optional), activation checkpointing, compile
    (optional), then FSDP2.

    Args:
        model: the native model, usually still on the meta device.
        mesh: the ``("dp", "sp")`` device mesh of :meth:`ParallelDims.build_mesh`.
        ac_mode: ``none``, ``selective`` or ``full``.
        param_dtype: compute dtype of the gathered parameters (None = as stored).
        compile: ``torch.compile`` each block.
        keep_exchanges: selective checkpointing keeps the SP all-to-all outputs
            (``parallel.keep_exchanges``).
        tiled_mlp: run every MLP in tiles of about ``dim`` tokens, forward and backward
            (:func:`apply_tiled_mlp`).
        cpu_offload: FSDP2 keeps parameters, gradients and optimizer state in host memory
            (``parallel.cpu_offload``; CUDA only). FSDP2 is applied even on one rank then.
        offload_activations: the block inputs checkpointing keeps go to host memory
            (``model.offload_activations``; needs ``selective`` or ``full``).

    Returns:
        The same model, now sharded.
    """
    if mesh["sp"].size() > 1:
        apply_sequence_parallel(model, mesh["sp"].get_group())
    if tiled_mlp:
        apply_tiled_mlp(model)
    apply_activation_checkpointing(model, ac_mode, keep_exchanges, offload_activations)
    if compile:
        apply_compile(model)
    if mesh.size() > 1 or param_dtype is not None or cpu_offload:
        apply_fsdp(model, mesh, param_dtype, cpu_offload)
    # else: one rank and no mixed precision, nothing for FSDP to do but copies (its all-gathers
    # through gloo cost a measurable part of a CPU step, docs/benchmarks.md); checkpoints stay
    # DCP, so a run resumed on more ranks reshards them like any other.
    return model
