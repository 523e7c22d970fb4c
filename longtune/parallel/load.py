"""Filling a parallelized model from a checkpoint folder, each rank reading only its own rows.

:func:`load_parallel_model` is called once the model is sharded (:func:`parallelize`) and its
local shards allocated (``to_empty``). Every rank reads, for each parameter, only the dim-0 rows
its FSDP2 shard owns (``safe_open(...).get_slice(key)[start:stop]``) and copies them, cast to
the parameter's dtype, into the DTensor's local tensor; no rank ever holds the whole model, and
the peak beyond a rank's own shard is the rows of one tensor being copied (a safetensors slice is
a view of the memory-mapped file, unmapped once copied). A fused native tensor (``wqkv`` =
cat(q, k, v), ``w13`` = cat(gate, up) along dim 0) is assembled from its HF pieces: the owned row
range ``[start, stop)`` of the fused tensor is cut at the pieces' boundaries and each part read
from its piece (:func:`piece_rows`). Which rows a rank owns is DTensor's own placement math
(``compute_local_shape_and_global_offset``: ``torch.chunk`` sizes, so with a dim-0 size not
divisible by the world size the last ranks own fewer rows, or none; FSDP2's padding lies beyond
the local tensor and is never written).

Ranks that do not all see the same weight files (several nodes without a shared filesystem)
fall back to the broadcast path, :func:`load_by_broadcast`: rank 0 reads the whole model and
``set_model_state_dict(..., broadcast_from_rank0=True)`` fills every rank's shards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from longtune.model.checks import ModelFolderError, check_finite, open_safetensors
from longtune.model.convert import NATIVE_META, is_native_dir, load_model, read_native_meta
from longtune.model.hf import (
    HF_INDEX,
    CheckpointMismatchError,
    key_map,
    native_tensor_names,
    read_hf_source,
)
from longtune.model.lora import is_adapter

logger = logging.getLogger(__name__)

# Module wrappers that parallelize() inserts; their names are not in the checkpoint's keys.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")

Piece = tuple[str, str]
"""A tensor in a checkpoint folder: (file name, key)."""


def load_parallel_model(model: nn.Module, path: str | Path) -> str:
    """Fill ``model``'s parameters (sharded by :func:`parallelize` or plain, already
    materialized) from the HF or native checkpoint folder ``path``.

    With several ranks, every rank first checks that it sees the same weight files as rank 0
    (names and sizes, one ``all_gather_object``); then each reads only the rows it owns. If a
    rank does not see them, rank 0 logs one line naming it and the file, and rank 0 reads the
    whole model and broadcasts it (:func:`load_by_broadcast`). On one process every tensor is
    read whole.

    Args:
        model: the native ``Transformer`` after ``parallelize`` and ``to_empty`` (ties kept).
        path: HF checkpoint folder or ``longtune convert`` output.

    Returns:
        ``"sharded"`` (each rank read its own rows) or ``"broadcast"`` (the fallback).

    Raises:
        ModelFolderError: a tensor holds NaN/Inf or a file cannot be read (on every rank, the
            message of the lowest rank that met it).
        CheckpointMismatchError: the checkpoint does not match the model.
    """
    path = Path(path)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        load_own_rows(model, path)
        return "sharded"
    unseen = files_unseen_by_a_rank(path)
    if unseen is not None:
        if dist.get_rank() == 0:
            logger.warning(
                "rank %d does not see %s as rank 0 does (%s): rank 0 reads the whole model "
                "and broadcasts it",
                *unseen,
            )
        load_by_broadcast(model, path)
        return "broadcast"
    error = None
    try:
        load_own_rows(model, path)
    except (ValueError, OSError, SafetensorError) as e:  # ModelFolderError is a ValueError
        error = e
    # A rank that failed alone would leave the others waiting in their next collective: every
    # rank learns the first failure and raises.
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"rank {dist.get_rank()}: {error}")
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise ModelFolderError(first)
    return "sharded"


def load_own_rows(model: nn.Module, path: str | Path) -> None:
    """Copy into each parameter's local tensor the rows this rank owns, read from ``path``.

    Args:
        model: as for :func:`load_parallel_model`.
        path: HF checkpoint folder or native folder.
    """
    path = Path(path)
    sources = native_sources(path)
    params = dict(_clean_named_parameters(model))
    if set(params) != set(sources):
        missing, extra = sorted(set(params) - set(sources)), sorted(set(sources) - set(params))
        raise ValueError(
            f"the model's parameters do not match {path}: not in the checkpoint {missing}, "
            f"not in the model {extra}"
        )
    with torch.no_grad():
        for name, pieces in sources.items():
            _fill(params[name], name, pieces, path)


def native_sources(path: Path) -> dict[str, list[Piece]]:
    """Native tensor name -> the tensors it is made of, in fusion order (one for an unfused
    tensor, and for every tensor of a native folder). No ``output.weight`` when tied."""
    if is_native_dir(path):
        args, _, weight_map = read_native_meta(path)
        return {n: [(weight_map[n], n)] for n in native_tensor_names(args)}
    args, source = read_hf_source(path)
    kmap = key_map(args)
    return {n: [(source.weight_map[k], k) for k in kmap[n]] for n in native_tensor_names(args)}


def piece_rows(start: int, stop: int, piece_sizes: list[int]) -> Iterator[tuple[int, int, int]]:
    """Cut the rows ``[start, stop)`` of a tensor fused from pieces of ``piece_sizes`` rows.

    Yields:
        ``(piece, first, last)``: rows ``[first, last)`` of piece ``piece``, in order; together
        they are the rows asked for.
    """
    begin = 0
    for i, size in enumerate(piece_sizes):
        lo, hi = max(start, begin), min(stop, begin + size)
        if lo < hi:
            yield i, lo - begin, hi - begin
        begin += size


def _fill(param: torch.Tensor, name: str, pieces: list[Piece], root: Path) -> None:
    """Read the rows of native tensor ``name`` that ``param``'s local tensor holds."""
    if isinstance(param, DTensor):
        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(
                f"{name}: local shard {tuple(local.shape)} is not the {tuple(shape)} its "
                f"placements {param.placements} give"
            )
    else:
        local, offset = param, (0,) * param.ndim
    # One handle per file, for this tensor only: the mapped pages are let go when it is done.
    handles = {f: open_safetensors(root / f) for f in dict.fromkeys(f for f, _ in pieces)}
    slices = [handles[f].get_slice(k) for f, k in pieces]
    shapes = [tuple(s.get_shape()) for s in slices]
    rows = sum(s[0] for s in shapes)
    if any(s[1:] != tuple(param.shape[1:]) for s in shapes) or rows != param.shape[0]:
        raise CheckpointMismatchError(
            f"{root}: {name} is made of {[k for _, k in pieces]} with shapes {shapes}, but the "
            f"model's parameter has shape {tuple(param.shape)}"
        )
    start = offset[0]
    other_dims = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:], strict=True))
    for i, first, last in piece_rows(start, start + local.shape[0], [s[0] for s in shapes]):
        file, key = pieces[i]
        part = slices[i][(slice(first, last), *other_dims)]  # a view of the mapped file
        check_finite(key, part, root / file)
        dst = first + sum(s[0] for s in shapes[:i]) - start
        local[dst : dst + (last - first)].copy_(part)  # casts to the parameter's dtype
        del part
    del slices, handles


def _clean_named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``named_parameters`` under the checkpoint's names (a tied matrix once, as the
    embedding); LoRA adapters, which no base checkpoint holds, are left out."""
    for name, p in model.named_parameters():
        if is_adapter(name):
            continue
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        yield name, p


def weight_files(path: str | Path) -> dict[str, int]:
    """The files of ``path`` the loader reads (safetensors, index, native metadata) -> size in
    bytes; empty when this process does not see the folder."""
    folder = Path(path)
    if not folder.is_dir():
        return {}
    read = {HF_INDEX, NATIVE_META, "config.json"}
    return {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.suffix == ".safetensors" or p.name in read)
    }


def files_unseen_by_a_rank(path: Path) -> tuple[int, str, str] | None:
    """The first rank (and file) that does not see a weight file of ``path`` as rank 0 sees it,
    or None when every rank sees them all. A collective: every rank calls it.

    Returns:
        ``(rank, file, what that rank sees instead)`` or None.
    """
    seen: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, weight_files(path))
    reference = seen[0] or {}  # none at all: every rank's read fails and says why
    for rank, files in enumerate(seen[1:], start=1):
        for name, size in reference.items():
            if name not in files:
                return rank, str(path / name), "no such file"
            if files[name] != size:
                return rank, str(path / name), f"{files[name]} bytes, not {size}"
    return None


def load_by_broadcast(model: nn.Module, path: str | Path) -> None:
    """Rank 0 reads the whole model (in the parameters' dtype) and broadcasts it into every
    rank's shards: the path when ranks do not share the files.

    Args:
        model: as for :func:`load_parallel_model`; every rank calls this.
        path: the checkpoint folder, read on rank 0 only.
    """
    dtype = next(model.parameters()).dtype
    full = {}
    if dist.get_rank() == 0:
        full = load_model(path, dtype=dtype, device="cpu").state_dict()
    adapters = any(is_adapter(name) for name, _ in model.named_parameters())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not adapters)
    set_model_state_dict(model, full, options=options)
