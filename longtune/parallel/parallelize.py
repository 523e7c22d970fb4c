"""Apply parallelism and memory savings to a native model from outside, in a fixed order:

0. sequence parallelism (when the mesh's ``sp`` dimension is > 1): every block's
   ``Attention.core`` wrapped in Ulysses all-to-alls over the ``sp`` group;
1. activation checkpointing (none | selective | full) around each block; selective keeps the
   all-to-all outputs, so recomputing a block repeats no communication;
2. FSDP2 (``fully_shard``) of each block, then of the root, over all ranks of the mesh
   (dp x sp flattened), with bf16 compute / fp32 reduction on GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from longtune.model.llama import Transformer
from longtune.parallel.ulysses import SAVE_OPS as _SP_SAVE_OPS
from longtune.parallel.ulysses import apply_sequence_parallel

AC_MODES = ("none", "selective", "full")

# Outputs worth keeping under selective checkpointing: matmuls and attention. Norms, RoPE,
# SiLU and the residual adds are recomputed (cheap, and they hold most activation bytes).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    *_SP_SAVE_OPS,
}
# The op behind torch.nn.attention.varlen.varlen_attn (the packed-sequence GPU path).
if hasattr(torch.ops, "torch_attn") and hasattr(torch.ops.torch_attn, "_varlen_attn"):
    _SAVE_OPS.add(torch.ops.torch_attn._varlen_attn.default)


def _selective_policy(ctx, op, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Wrap every block for activation checkpointing.

    Args:
        mode: ``none``; ``full`` (keep only block inputs); ``selective`` (keep matmul and
            attention outputs, recompute the elementwise ops).
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "none":
        return
    for name, block in model.layers.named_children():
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block, preserve_rng_state=False, context_fn=_selective_context
            )
        model.layers.register_module(name, wrapped)


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """Shard parameters, gradients and optimizer state over every rank of ``mesh``."""
    flat = mesh if mesh.ndim == 1 else mesh._flatten("dp_sp")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block is needed again right away by the backward pass: keep it gathered.
        fully_shard(block, mesh=flat, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=flat, mp_policy=mp)


def parallelize(
    model: Transformer, mesh: DeviceMesh, ac_mode: str, param_dtype: torch.dtype | None
) -> nn.Module:
    """Apply sequence parallelism, activation checkpointing, then FSDP2 (in that order).

    Args:
        model: the native model, usually still on the meta device.
        mesh: the ``("dp", "sp")`` device mesh of :meth:`ParallelDims.build_mesh`.
        ac_mode: ``none``, ``selective`` or ``full``.
        param_dtype: compute dtype of the gathered parameters (None = as stored).

    Returns:
        The same model, now sharded.
    """
    if mesh["sp"].size() > 1:
        apply_sequence_parallel(model, mesh["sp"].get_group())
    apply_activation_checkpointing(model, ac_mode)
    apply_fsdp(model, mesh, param_dtype)
    return model
