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

The MLP's norm (the block's ``ffn_norm``) can run inside the tiles too (``TiledMLP(norm=)``, as
``apply_tiled_mlp`` sets it up): its normalized rows then exist for one tile only instead of
being kept whole for the backward pass. The other RMSNorms are the rest of a block's
full-sequence float32 work: :class:`TiledRMSNormFunction` computes them in tiles, saving only
the input and each row's ``1 / rms`` (:func:`tile_norms`; the same lever, ``model.tiled_mlp``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from longtune.model.llama import RMSNorm


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

    With ``norm`` (the block's ``ffn_norm``, as :func:`~longtune.parallel.parallelize.apply_tiled_mlp`
    gives it) each tile is normalized first, by the plain formula: the block passes the norm's
    input (``TransformerBlock.forward``), and the normalized rows exist for one tile only, in
    both passes, instead of being kept whole for the backward pass. The norm stays where it is
    in the module tree (its weight keeps its name); it is held here outside it, like ``mlp``.

    Args:
        mlp: a row-wise module (each output token depends on that input token only), with
            parameters only in its submodules.
        tile: tokens per tile; None = :func:`tile_tokens` of the input (about ``dim`` tokens).
        norm: an :class:`~longtune.model.llama.RMSNorm` to apply to each tile first, or None.
    """

    def __init__(
        self, mlp: nn.Module, tile: int | None = None, norm: nn.Module | None = None
    ) -> None:
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
        self.__dict__["norm"] = norm  # the block's: named there
        self.tile = tile

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP (after the norm, if any) of ``(n, dim)`` rows: what each tile runs."""
        if self.norm is not None:
            x = RMSNorm.forward(self.norm, x)  # the plain formula, whatever the norm's class
        return self.mlp.forward(x)

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
    if module.norm is not None and module.norm.weight.requires_grad:
        params.append(module.norm.weight)
    saved_by = None
    if x.requires_grad and torch.is_grad_enabled():
        x = _KeepInput.apply(x)
        saved_by = x.grad_fn
    # (Else, e.g. LoRA on the MLP only, whose first input needs no gradient: the function
    # saves x itself.)
    return TiledMLPFunction.apply(module.rows, x, tile, preserve_rng, saved_by, *params)


class TiledRMSNormFunction(torch.autograd.Function):
    """RMSNorm as :class:`~longtune.model.llama.RMSNorm` computes it (float32, cast back before
    the weight), over the tokens in tiles, saving only its input and each row's ``1 / rms``.

    Autograd through the plain formula keeps several ``tokens x dim`` float32 tensors (the
    upcast input, its square, the normalized rows) and its backward makes as many again: at
    196K tokens of an 8B model, 3 GiB each, the largest transients of a checkpointed block's
    backward. Here the forward writes each tile's output (the same values: every row is
    computed by the same ops) and the backward recomputes each tile's normalized rows and
    applies ``dx = r (g_n - n mean(g_n n))`` (``n = x r``, ``g_n`` the gradient reaching the
    normalized rows), accumulating the weight's gradient in float32.

    Called as ``TiledRMSNormFunction.apply(x, weight, eps, tile)``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, tile: int
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (tokens, dim)
        out = torch.empty(flat.shape, dtype=torch.result_type(weight, x), device=x.device)
        rstd = torch.empty(flat.shape[0], 1, dtype=torch.float32, device=x.device)
        with torch.no_grad():
            for start in range(0, flat.shape[0], tile):
                h = flat[start : start + tile].float()
                r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
                rstd[start : start + tile] = r
                out[start : start + tile] = weight * (h * r).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.tile = tile
        return out.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        grads = grad_out.reshape(flat.shape)
        dx = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(flat.shape[-1], dtype=torch.float32, device=x.device)
        for start in range(0, flat.shape[0], ctx.tile):
            end = start + ctx.tile
            n = flat[start:end].float() * rstd[start:end]  # (tile, dim) normalized, float32
            g = grads[start:end]
            if ctx.needs_input_grad[1]:
                dw += (g * n.to(x.dtype)).float().sum(0)
            if dx is not None:
                g_n = (g * weight).to(x.dtype).float()  # through the cast back, as autograd
                dot = (g_n * n).mean(-1, keepdim=True)
                dx[start:end] = (rstd[start:end] * (g_n - n * dot)).to(x.dtype)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return (dx.view(x.shape) if dx is not None else None), dw, None, None


class TiledRMSNorm(RMSNorm):
    """An :class:`~longtune.model.llama.RMSNorm` (the same ``weight``) whose training forward
    runs :class:`TiledRMSNormFunction`; made by :func:`tile_norms`."""

    tile: int | None = None
    """Tokens per tile; None = :func:`norm_tile` of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)  # nothing to save: the plain formula, the same values
        return _OUT_OF_GRAPH["tiled_norm"](self, x)


def tile_norms(model: nn.Module, tile: int | None = None) -> None:
    """Make every RMSNorm of ``model`` a :class:`TiledRMSNorm` (in place: parameters, names and
    hooks unchanged)."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = TiledRMSNorm
            module.tile = tile


NORM_TILES = 8
"""A norm's tiles by default: at most this many while they stay under :data:`NORM_TILE_BYTES`
(its work is elementwise and cheap; fewer, larger tiles mean fewer kernel launches)."""

NORM_TILE_BYTES = 2**27
"""The most float32 bytes one tile's ``tile x dim`` work may take: its backward holds about four
such tensors at once, in the peak of a block's backward (128 MiB: 8,192 tokens of 8B's 4096;
eight tiles of 8B at 1M tokens would be 2 GiB each)."""


def norm_tile(tokens: int, dim: int) -> int:
    """Tokens per tile of a tiled norm: :data:`NORM_TILES` tiles, or more where a tile's
    float32 work would pass :data:`NORM_TILE_BYTES`; never fewer tokens than
    :func:`tile_tokens` (the MLP's tiles).

    Args:
        tokens: tokens the norm runs over (``bs * seq`` of this rank).
        dim: the model dimension.

    Returns:
        Tokens per tile, in ``[1, tokens]``.
    """
    cap = max(1, NORM_TILE_BYTES // (4 * dim))
    return max(tile_tokens(tokens, dim), min(-(-tokens // NORM_TILES), cap))


def _tiled_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tile = module.tile
    if tile is None:
        tile = norm_tile(x.numel() // x.shape[-1], x.shape[-1])
    return TiledRMSNormFunction.apply(x, module.weight, module.eps, tile)


# Called through this table, so that exclude_from_compile can swap in a twin that
# torch.compile leaves out of its graphs: the backward runs autograd itself, which no graph
# holds, and the input must be saved by _KeepInput's own node.
_OUT_OF_GRAPH: dict[str, Callable[..., Any]] = {
    "tiled_forward": _tiled_forward,
    "tiled_norm": _tiled_norm,
}


def exclude_from_compile() -> None:
    """Keep the tiled MLP out of ``torch.compile`` graphs: a block's graph breaks around it
    (called by ``apply_compile``; applying ``torch.compiler.disable`` at import time would
    import ``torch._dynamo``, a second of every process's start)."""
    for name, fn in _OUT_OF_GRAPH.items():
        if not getattr(fn, "_longtune_out_of_graph", False):
            wrapped = torch.compiler.disable(fn)
            wrapped._longtune_out_of_graph = True
            _OUT_OF_GRAPH[name] = wrapped
