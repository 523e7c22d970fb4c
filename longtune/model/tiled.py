"""The MLP run over the sequence in tiles, forward and backward (ALST's TiledMLP, arXiv 2506.13996).

A SwiGLU MLP's intermediates are ``(tokens, 2 * ffn_dim)`` (gate and up) and ``(tokens,
ffn_dim)`` (SiLU(gate) * up), with ``ffn_dim = 3.5 dim`` in Llama 3.1 8B: at long sequences the
largest tensors of a block. Every token's MLP output depends on that token alone, so
:class:`TiledMLPFunction` runs the MLP over a few thousand tokens at a time: the forward pass
writes each tile's output into one preallocated tensor (no graph kept), the backward pass
recomputes each tile with gradients on and back-propagates it at once. The intermediates never
exist for more than one tile; the layer keeps only its input, as activation checkpointing does,
and an activation checkpoint's replay of the block stops before the MLP (:class:`_KeepInput`).

Parameter gradients are accumulated by the nested ``torch.autograd.backward`` of each tile into
the parameters' ``.grad`` (as ALST / DeepSpeed's ``TiledMLP`` does); the function returns only
the input's gradient. Under FSDP2 the parameters are the block's gathered ones at that point
(FSDP gathers them before the block's backward starts and reduce-scatters their ``.grad`` after
it ends). Frozen parameters (LoRA's base weights) get no gradient.

Tile size: ALST's rule, ``ceil(tokens / dim)`` tiles (:func:`tile_tokens`): about ``dim``
tokens per tile, so a tile's intermediates are about ``dim x 3 ffn_dim`` values, of the order of
the layer's own weights. Like the model, nothing here knows about distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states


def tile_tokens(tokens: int, dim: int) -> int:
    """Tokens per tile by ALST's rule: ``ceil(tokens / dim)`` tiles of equal size (the last
    one shorter), so about ``dim`` tokens each.

    Args:
        tokens: tokens the MLP runs over (``bs * seq`` of this rank).
        dim: the model dimension (the MLP's input width).

    Returns:
        Tokens per tile, in ``[1, tokens]``.
    """
    n_tiles = max(1, -(-tokens // dim))
    return max(1, -(-tokens // n_tiles))


class _KeepInput(torch.autograd.Function):
    """The identity, saving its input for the :class:`TiledMLPFunction` that follows it.

    Saved here rather than by the tiled function, the input is the last tensor a block's
    forward saves, packed before the MLP runs: an activation checkpoint's replay (which stops
    once every saved tensor is recomputed) then ends before the MLP instead of running it
    whole, whose output the backward pass does not need (the tiles recompute what they use).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class TiledMLPFunction(torch.autograd.Function):
    """``fn(x)`` computed tile by tile over the tokens of ``x``, in both passes.

    Called as ``TiledMLPFunction.apply(fn, x, tile, preserve_rng, saved_by, *params)``:

    - ``fn``: a row-wise function ``(n, dim) -> (n, out)`` (the MLP's forward), whose output
      row ``i`` depends on input row ``i`` only;
    - ``x``: ``(..., dim)``, flattened to ``(tokens, dim)`` and cut into tiles of ``tile`` rows;
    - ``preserve_rng``: replay the forward's random numbers (dropout) in the recompute;
    - ``saved_by``: the graph node of the :class:`_KeepInput` that made ``x``, which holds
      ``x`` for the backward pass; None: this function saves ``x`` itself;
    - ``params``: the trainable parameters ``fn`` uses, passed so that autograd calls the
      backward when only they need a gradient; their gradients are accumulated into ``.grad``
      by the backward itself, not returned.
    """

    @staticmethod
    def forward(
        ctx: Any,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        tile: int,
        preserve_rng: bool,
        saved_by: Any,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        ctx.fn, ctx.tile, ctx.preserve_rng, ctx.saved_by = fn, tile, preserve_rng, saved_by
        if preserve_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.devices, ctx.device_rng = get_device_states(x)
        flat = x.reshape(-1, x.shape[-1])  # (tokens, dim)
        out = None
        with torch.no_grad():
            for start in range(0, flat.shape[0], tile):
                y = fn(flat[start : start + tile])  # (tile, out)
                if out is None:
                    out = y.new_empty(flat.shape[0], y.shape[-1])
                out[start : start + y.shape[0]] = y
        if saved_by is None:
            ctx.save_for_backward(x)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors if ctx.saved_by is None else ctx.saved_by.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])  # (tokens, dim)
        grads = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        need_dx = ctx.needs_input_grad[1]
        dx = torch.empty_like(flat) if need_dx else None
        device_type = x.device.type if x.device.type != "cpu" else None
        with torch.random.fork_rng(
            devices=ctx.devices if ctx.preserve_rng else [],
            enabled=ctx.preserve_rng,
            device_type=device_type or "cuda",
        ):
            if ctx.preserve_rng:
                torch.set_rng_state(ctx.cpu_rng)
                set_device_states(ctx.devices, ctx.device_rng, device_type=device_type)
            for start in range(0, flat.shape[0], ctx.tile):
                x_tile = flat[start : start + ctx.tile].detach().requires_grad_(need_dx)
                with torch.enable_grad():
                    y = ctx.fn(x_tile)  # (tile, out): this tile's graph only
                # Accumulates the parameters' .grad, and x_tile's.
                torch.autograd.backward(y, grads[start : start + y.shape[0]])
                if need_dx:
                    dx[start : start + y.shape[0]] = x_tile.grad
        dx = dx.view_as(x) if need_dx else None
        return (None, dx) + (None,) * (len(ctx.needs_input_grad) - 2)


class TiledMLP(nn.Module):
    """Runs ``mlp``'s forward through :class:`TiledMLPFunction`, keeping its parameter names.

    The wrapper takes over ``mlp``'s submodules as its own (``w13``, ``w2``), so the names of
    the parameters under it stay those of ``mlp`` (``layers.0.feed_forward.w13.weight``, with
    or without tiling: checkpoints move between the two); ``mlp`` itself is held outside the
    module tree, for its forward.

    Args:
        mlp: a row-wise module (each output token depends on that input token only), with
            parameters only in its submodules.
        tile: tokens per tile; None = :func:`tile_tokens` of the input (about ``dim`` tokens).
    """

    def __init__(self, mlp: nn.Module, tile: int | None = None) -> None:
        super().__init__()
        own = [n for n, _ in mlp.named_parameters(recurse=False)]
        own += [n for n, _ in mlp.named_buffers(recurse=False)]
        if own:
            raise ValueError(
                f"TiledMLP takes over the submodules of {type(mlp).__name__}, which holds "
                f"tensors of its own ({', '.join(own)}) that would lose their names"
            )
        if tile is not None and tile < 1:
            raise ValueError(f"tile must be >= 1 token (or None for the rule), got {tile}")
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.__dict__["mlp"] = mlp  # not a submodule: no name level added
        self.tile = tile

    def train(self, mode: bool = True) -> TiledMLP:
        self.mlp.training = mode
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OUT_OF_GRAPH["tiled_forward"](self, x)

    def extra_repr(self) -> str:
        return f"tile={self.tile if self.tile is not None else 'about dim tokens'}"


def _tiled_forward(module: TiledMLP, x: torch.Tensor) -> torch.Tensor:
    tokens = x.numel() // x.shape[-1]
    tile = module.tile if module.tile is not None else tile_tokens(tokens, x.shape[-1])
    preserve_rng = module.training and any(
        isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()
    )
    params = [p for p in module.parameters() if p.requires_grad]
    saved_by = None
    if x.requires_grad and torch.is_grad_enabled():
        x = _KeepInput.apply(x)
        saved_by = x.grad_fn
    # (Else, e.g. LoRA on the MLP only, whose first input needs no gradient: the function
    # saves x itself.)
    return TiledMLPFunction.apply(module.mlp.forward, x, tile, preserve_rng, saved_by, *params)


# Called through this table, so that exclude_from_compile can swap in a twin that
# torch.compile leaves out of its graphs: the backward runs autograd itself, which no graph
# holds, and the input must be saved by _KeepInput's own node.
_OUT_OF_GRAPH: dict[str, Callable[..., Any]] = {"tiled_forward": _tiled_forward}


def exclude_from_compile() -> None:
    """Keep the tiled MLP out of ``torch.compile`` graphs: a block's graph breaks around it
    (called by ``apply_compile``; applying ``torch.compiler.disable`` at import time would
    import ``torch._dynamo``, a second of every process's start)."""
    fn = _OUT_OF_GRAPH["tiled_forward"]
    if not getattr(fn, "_longtune_out_of_graph", False):
        wrapped = torch.compiler.disable(fn)
        wrapped._longtune_out_of_graph = True
        _OUT_OF_GRAPH["tiled_forward"] = wrapped
