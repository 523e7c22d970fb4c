"""The native, training-optimized Llama model.

Same function as ``transformers``' ``LlamaForCausalLM``, laid out for training: fused q/k/v and
gate/up projections, attention that takes document boundaries (``cu_seqlens``, turned once per
forward into an :class:`~longtune.model.attention.AttentionMeta` record shared by every layer)
so packed documents never see each other, and a forward that can stop before the output
projection so the loss is computed in chunks, on the supervised tokens only. No distributed
code here: sequence parallelism wraps ``Attention.core`` from outside (``longtune.parallel``),
and every head count is read from tensor shapes, so the model does not know it is sharded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longtune.model.args import ModelArgs
from longtune.model.attention import AttentionMeta, attention
from longtune.model.loss import chunked_cross_entropy

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse RoPE frequencies, with ``llama3`` frequency scaling when configured.

    Returns:
        ``(head_dim // 2,)`` float32 tensor.
    """
    dim = args.head_dim
    inv_freq = 1.0 / (
        args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    # wavelen < high_freq_wavelen: unchanged; wavelen > low_freq_wavelen: divided by factor;
    # in between: interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, computed in float32 then cast.

    Args:
        inv_freq: ``(head_dim // 2,)``.
        position_ids: ``(bs, seq)`` integer positions.

    Returns:
        cos, sin of shape ``(bs, seq, head_dim)`` (rotate-half layout, as in HF).
    """
    freqs = position_ids[..., None].float() * inv_freq.float()  # (bs, seq, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (bs, seq, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``(bs, seq, n_heads, head_dim)`` and k ``(bs, seq, n_kv_heads, head_dim)``."""
    cos = cos.unsqueeze(2)  # (bs, seq, 1, head_dim)
    sin = sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions restarting at 0 at every document start.

    Args:
        cu_seqlens: ``(n_docs + 1,)`` offsets into a flat token stream of length ``total``.

    Returns:
        ``(total,)`` int64 positions.
    """
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(total, device=cu.device) - starts


class CoreAttention(nn.Module):
    """The attention kernel as a module, so parallelism can wrap or replace it.

    Called as ``core(q, k, v, meta)``: q ``(bs, seq, n_heads, head_dim)``, k/v
    ``(bs, seq, n_kv_heads, head_dim)``, ``meta`` the :class:`AttentionMeta` of the whole
    micro-batch (which names the kernel); returns ``(bs, seq, n_heads, head_dim)``.
    """

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta
    ) -> torch.Tensor:
        return attention(q, k, v, meta)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as HF Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.q_size = args.q_size
        self.kv_size = args.kv_size
        self.wqkv = nn.Linear(args.dim, args.q_size + 2 * args.kv_size, bias=args.attention_bias)
        self.wo = nn.Linear(args.q_size, args.dim, bias=args.attention_bias)
        self.core = CoreAttention()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        bs, seq, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(bs, seq, -1, self.head_dim)  # (bs, seq, n_heads, head_dim)
        k = k.view(bs, seq, -1, self.head_dim)  # (bs, seq, n_kv_heads, head_dim)
        # v in its own storage: as a view it would keep the whole fused output alive until the
        # attention's backward (q and k are rotated into new tensors; 8B at 1M tokens: 12 GiB
        # kept where v needs 2).
        v = v.view(bs, seq, -1, self.head_dim).contiguous()
        q, k = apply_rope(q, k, cos, sin)
        out = self.core(q, k, v, meta)  # (bs, seq, n_heads, head_dim)
        return self.wo(out.reshape(bs, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP with gate and up projections fused into one matmul."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, meta)
        if getattr(self.feed_forward, "norm", None) is self.ffn_norm:  # a tiled MLP normalizes
            return h + self.feed_forward(h)  # each of its tiles (model/tiled.py)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama decoder. ``forward`` returns logits or the loss; ``hidden`` stops before the
    output layer."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # ModuleDict with string indices: stable FQNs when layers are wrapped or pruned.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output matrix with the embedding when the config says so."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute non-persistent buffers, e.g. after building on the meta device."""
        self.inv_freq = rope_inv_freq(self.args, device=device)

    def hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        attention: str = "auto",
    ) -> torch.Tensor:
        """Final normalized hidden states ``(bs, seq, dim)``.

        Args:
            input_ids: ``(bs, seq)`` token ids.
            position_ids: ``(bs, seq)``; default ``0..seq-1``, or restarting at each document
                when ``cu_seqlens`` is given.
            cu_seqlens: ``(n_docs + 1,)`` document offsets into the flattened ``bs * seq``
                tokens; attention never crosses them.
            max_seqlen: longest document, if known (saves a device sync on GPU).
            attention: the attention kernel of this forward (``model.attention``: one of
                ``ATTENTION_BACKENDS``); it rides on the forward's ``AttentionMeta``.
        """
        bs, seq = input_ids.shape
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, bs * seq).view(bs, seq)
            else:
                position_ids = torch.arange(seq, device=input_ids.device).expand(bs, seq)
        h = self.tok_embeddings(input_ids)  # (bs, seq, dim)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids.to(h.device), h.dtype)
        meta = AttentionMeta.from_cu_seqlens(cu_seqlens, max_seqlen, h.device, attention)
        meta.prepare(h.device)
        for layer in self.layers.values():
            h = layer(h, cos, sin, meta)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        loss_chunk_size: int | None = None,
        attention: str = "auto",
    ) -> torch.Tensor:
        """Logits ``(bs, seq, vocab)``, or with ``labels`` the summed token loss.

        Args:
            input_ids, position_ids, cu_seqlens, max_seqlen, attention: see :meth:`hidden`.
            labels: ``(bs, seq)`` targets already shifted (``-100`` ignored). When given, the
                output projection and cross-entropy run in chunks of ``loss_chunk_size``
                tokens (``None``: sized to the tokens, see :func:`~longtune.model.loss.chunk_rows`)
                and the float32 *sum* of token losses is returned; full logits are never
                built. (The loss is computed here, inside ``forward``, so that wrappers such as
                FSDP see every parameter use.)
        """
        h = self.hidden(input_ids, position_ids, cu_seqlens, max_seqlen, attention)
        if labels is None:
            return self.output(h)
        return chunked_cross_entropy(h, self.output.weight, labels, loss_chunk_size)
