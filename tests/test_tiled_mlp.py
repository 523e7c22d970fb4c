"""The tiled MLP (ALST's TiledMLP) computes the untiled model's loss and gradients.

The same tiny model with and without ``apply_tiled_mlp``: equal loss and parameter gradients in
float32 (1e-6 relative) for tile sizes that divide the tokens and one that does not, on packed
documents, with every activation-checkpointing mode and compiled blocks; close in bfloat16;
LoRA adapters (frozen base) included; under Ulysses SP on 3 gloo ranks and FSDP2 on 2, against
one untiled process. A checkpoint's replay stops before a tiled MLP. And the point of it: no
MLP intermediate larger than one tile exists. (Also: parallel.cpu_offload reaches FSDP2.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_ranks
from helpers import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from longtune.model.args import ModelArgs
from longtune.model.llama import FeedForward, Transformer, positions_from_cu_seqlens
from longtune.model.lora import LoraSpec, add_lora, init_adapters, is_adapter
from longtune.model.tiled import TiledMLP, tile_tokens
from longtune.parallel.dims import ParallelDims
from longtune.parallel.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_tiled_mlp,
    parallelize,
)
from longtune.parallel.ulysses import apply_sequence_parallel

ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, rope_theta=1e4
)
SP_ARGS = ModelArgs(  # 6 query heads, 3 KV heads: one KV head per rank at SP=3
    dim=48, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=200, ffn_dim=80, rope_theta=1e4
)
WRAPPERS = ("._checkpoint_wrapped_module", "._orig_mod")


def _model(args: ModelArgs = ARGS, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    m = Transformer(args).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)  # nn.init leaves the norms at 1: vary them too
    return m


def _batch(args: ModelArgs = ARGS, bs: int = 2, seq: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (bs, seq), generator=g)
    labels = torch.randint(0, args.vocab_size, (bs, seq), generator=g)
    labels[:, ::5] = -100  # prompt tokens carry no loss
    n = bs * seq
    cu = torch.tensor([0, n // 6, n // 2, n // 2 + 3, n], dtype=torch.int32)  # packed documents
    return ids, labels, cu


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    out = {}
    for name, p in model.named_parameters():
        for part in WRAPPERS:
            name = name.replace(part, "")
        out[name] = p.grad
    return out


def _step(model: torch.nn.Module, ids, labels, cu) -> tuple[torch.Tensor, dict]:  # noqa: ANN001
    loss = model(ids, cu_seqlens=cu, labels=labels)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_close(got, want, tol: float) -> None:  # noqa: ANN001
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert rel_err(loss, ref_loss) < tol, (float(loss), float(ref_loss))
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        if g is None:
            assert grads[name] is None, name
        else:
            assert rel_err(grads[name], g) < tol, name


@pytest.fixture(scope="module")
def reference():
    ids, labels, cu = _batch()
    return _step(_model(), ids, labels, cu)


def test_tile_rule_and_names():
    """ALST's rule: ceil(tokens / dim) equal tiles; the state names do not change, so a
    checkpoint moves between tiled and untiled runs."""
    assert tile_tokens(1024, 64) == 64
    assert tile_tokens(1000, 64) == 63  # 16 tiles, the last one shorter
    assert tile_tokens(50, 64) == 50  # one tile
    assert tile_tokens(131072, 4096) == 4096
    plain, tiled = _model(), _model()
    apply_tiled_mlp(tiled)
    assert isinstance(tiled.layers["0"].feed_forward, TiledMLP)
    assert list(tiled.state_dict()) == list(plain.state_dict())
    tiled.load_state_dict(plain.state_dict())  # strict
    tiled.eval()
    assert not tiled.layers["1"].feed_forward.mlp.training


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
@pytest.mark.parametrize("tile", [None, 7, 96, 1000])
def test_float32_tiled_equals_untiled(reference, ac, tile):
    """Tiles of the rule's 64 tokens, 7 (does not divide the 192 tokens), 96 (one sequence
    of the micro-batch) and one tile: the untiled loss and gradients."""
    model = _model()
    apply_tiled_mlp(model, tile)
    apply_activation_checkpointing(model, ac)
    _assert_close(_step(model, *_batch()), reference, 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_compiled_blocks_with_tiled_mlp_equal_untiled(reference, ac):
    """Compiled blocks (parallelize's order: tiled MLP, checkpointing, compile): something is
    compiled, and the loss and gradients are the untiled eager model's."""
    from torch._dynamo.utils import counters

    model = _model()
    apply_tiled_mlp(model, 50)
    apply_activation_checkpointing(model, ac)
    apply_compile(model)
    torch._dynamo.reset()
    counters.clear()
    _assert_close(_step(model, *_batch()), reference, 1e-5)
    assert counters["stats"]["unique_graphs"] >= 2  # the block's graphs on both sides


def test_bfloat16_tiled_is_close_to_untiled():
    """bfloat16 (tiles run their own matmuls): the loss to 2e-2 and every gradient in the
    same direction."""
    batch = _batch()
    ref = _step(_model(dtype=torch.bfloat16), *batch)
    model = _model(dtype=torch.bfloat16)
    apply_tiled_mlp(model, 40)
    apply_activation_checkpointing(model, "selective")
    loss, grads = _step(model, *batch)
    assert rel_err(loss, ref[0]) < 2e-2
    for name, g in ref[1].items():
        assert grads[name].dtype == torch.bfloat16
        cos = F.cosine_similarity(grads[name].double().flatten(), g.double().flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))


def _lora(seed: int = 0, dropout: float = 0.0, targets=None) -> Transformer:  # noqa: ANN001
    model = _model(seed=seed)
    spec = LoraSpec(rank=4, alpha=8.0, dropout=dropout)
    if targets is not None:
        spec = LoraSpec(rank=4, alpha=8.0, dropout=dropout, targets=targets)
    add_lora(model, spec)
    values = init_adapters({n: p for n, p in model.named_parameters() if is_adapter(n)}, 0)
    g = torch.Generator().manual_seed(1)
    for name in values:  # B is zero at init: give it values so that A has a gradient
        if ".lora_B." in name:
            values[name] = torch.randn(values[name].shape, generator=g) * 0.05
    model.load_state_dict(values, strict=False)
    return model


@pytest.mark.parametrize("ac", ["none", "full"])
@pytest.mark.parametrize("targets", [None, ("up_proj", "down_proj")], ids=["all", "mlp-only"])
def test_lora_adapter_gradients_equal_untiled(ac, targets):
    """The frozen base gets no gradient, the adapters the untiled ones; with MLP-only targets
    the MLP's input needs no gradient in the first block (nothing before it is trained)."""
    batch = _batch()
    ref = _step(_lora(targets=targets), *batch)
    model = _lora(targets=targets)
    apply_tiled_mlp(model, 11)
    apply_activation_checkpointing(model, ac)
    got = _step(model, *batch)
    _assert_close(got, ref, 1e-6)  # the same gradients, None where the reference has None
    assert all(g is None for n, g in got[1].items() if not is_adapter(n))


def test_lora_dropout_is_replayed_in_the_backward_recompute():
    """With dropout on the adapters the recompute must draw the forward's masks: with one tile
    (the same draws as the untiled model) the gradients are the untiled ones."""
    batch = _batch()
    ref_model = _lora(dropout=0.3)
    torch.manual_seed(5)
    ref = _step(ref_model, *batch)
    model = _lora(dropout=0.3)
    apply_tiled_mlp(model, 10_000)
    torch.manual_seed(5)
    _assert_close(_step(model, *batch), ref, 1e-6)


def _errors(got, want) -> dict[str, float]:  # noqa: ANN001
    """Relative errors by name (small results: run_ranks sends them through a pipe)."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    errs = {name: rel_err(grads[name], g) for name, g in ref_grads.items()}
    return {"loss": rel_err(loss, ref_loss), **errs}


def _sp_rank(rank: int, world: int, ids, labels, cu) -> dict[str, float]:  # noqa: ANN001
    ref = _step(_model(SP_ARGS), ids, labels, cu)  # one untiled process, the whole sequence
    model = _model(SP_ARGS)
    apply_sequence_parallel(model, dist.group.WORLD)
    apply_tiled_mlp(model, 5)  # 16 tokens per rank: tiles of 5, 5, 5, 1
    apply_activation_checkpointing(model, "selective")
    seq = ids.shape[1]
    lo, hi = rank * seq // world, (rank + 1) * seq // world
    pos = positions_from_cu_seqlens(cu, seq)[None]
    loss = model(ids[:, lo:hi], position_ids=pos[:, lo:hi], cu_seqlens=cu, labels=labels[:, lo:hi])
    loss.backward()
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)  # each rank's tokens give part of every gradient
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return _errors((loss, grads), ref)


@pytest.mark.slow
def test_sequence_parallel_3_with_tiled_mlp_equals_one_untiled_process():
    """Ulysses over 3 ranks with tiled MLPs (tiles of a rank's own tokens) and selective
    checkpointing: the summed loss and gradients of one untiled process."""
    ids, labels, _ = _batch(SP_ARGS, bs=1, seq=48)
    cu = torch.tensor([0, 7, 20, 33, 48], dtype=torch.int32)  # documents cross every slice
    for errs in run_ranks(3, _sp_rank, ids, labels, cu):
        assert max(errs.values()) < 1e-5, errs


def _fsdp_rank(rank: int, world: int, batches) -> dict[str, float]:  # noqa: ANN001
    ref = _model()  # one untiled process, both ranks' batches
    sum(ref(ids, cu_seqlens=cu, labels=labels) for ids, labels, cu in batches).div(2).backward()
    model = _model()
    dims = ParallelDims.build(world, 1, n_heads=ARGS.n_heads, n_kv_heads=ARGS.n_kv_heads)
    parallelize(model, dims.build_mesh("cpu"), "selective", None, tiled_mlp=True)
    assert type(model.layers["0"].feed_forward.w13.weight).__name__ == "DTensor"
    ids, labels, cu = batches[rank]
    model(ids, cu_seqlens=cu, labels=labels).backward()
    # FSDP averages the ranks' gradients; full tensors gathered from the shards.
    grads = {n: g.full_tensor() for n, g in _grads(model).items()}
    return {n: rel_err(grads[n], g) for n, g in _grads(ref).items()}


@pytest.mark.slow
def test_fsdp2_with_tiled_mlp_equals_one_untiled_process():
    """FSDP2 gathers a block's parameters before its backward and reduce-scatters their .grad
    after it: the gradients the tiles accumulate there (block 0 resharded after its forward
    and gathered again) are the untiled model's, on the mean loss of the two ranks."""
    batches = [_batch(seed=s) for s in (1, 2)]
    for errs in run_ranks(2, _fsdp_rank, batches):
        assert max(errs.values()) < 1e-5, errs


def _fsdp_calls(rank: int, world: int) -> list[str]:
    import longtune.parallel.parallelize as P

    calls = []

    def record(module, **kwargs):  # noqa: ANN001, ANN003
        calls.append(type(kwargs.get("offload_policy")).__name__)
        return module

    P.fully_shard, real = record, P.fully_shard
    try:
        dims = ParallelDims.build(world, 1, n_heads=ARGS.n_heads, n_kv_heads=ARGS.n_kv_heads)
        parallelize(_model(), dims.build_mesh("cpu"), "none", None, cpu_offload=True)
    finally:
        P.fully_shard = real
    return calls


def test_cpu_offload_reaches_every_fully_shard_call():
    """parallel.cpu_offload: FSDP2's CPUOffloadPolicy on every block and the root, FSDP applied
    even on one rank in float32 (FSDP itself needs CUDA for it: only the calls are checked)."""
    assert run_ranks(1, _fsdp_calls) == [["CPUOffloadPolicy"] * (ARGS.n_layers + 1)]


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def test_checkpoint_replay_stops_before_a_tiled_mlp():
    """The tiles recompute what the MLP's backward needs; the checkpoint's replay of the block
    stops before the MLP (its input is saved before it runs): with selective and full
    checkpointing the backward pass adds only the two attention projections per block to the
    matmuls of no checkpointing (untiled: three, w13's too)."""
    counts = {}
    for ac in ("none", "selective", "full"):
        model = _model()
        apply_tiled_mlp(model, 50)
        apply_activation_checkpointing(model, ac)
        loss = model(*_batch()[:1], labels=_batch()[1])
        with _CountMatmuls() as seen:
            loss.backward()
        counts[ac] = seen.count
    assert counts["selective"] - counts["none"] == 2 * ARGS.n_layers
    assert counts["full"] - counts["none"] == 2 * ARGS.n_layers


class _LargestOutputs(TorchDispatchMode):
    """The largest output (in elements) of any op, and of the MLP's own intermediates (the
    outputs whose last dimension is ffn_dim or 2 ffn_dim)."""

    def __init__(self, ffn_dim: int) -> None:
        super().__init__()
        self.widths = {ffn_dim, 2 * ffn_dim}
        self.any = self.inner = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.any = max(self.any, t.numel())
                if t.dim() == 2 and t.shape[-1] in self.widths:
                    self.inner = max(self.inner, t.numel())
        return out


def _largest(mlp: torch.nn.Module, x: torch.Tensor, ffn: int) -> _LargestOutputs:
    with _LargestOutputs(ffn) as seen:
        y = mlp(x)
        y.backward(torch.ones_like(y))
    return seen


def test_no_mlp_intermediate_larger_than_a_tile_exists():
    """seq 1024, dim 64, ffn 256: the rule's tiles of 64 tokens; no intermediate, forward or
    backward, is larger than 64 x 2 ffn (the untiled MLP's are 1024 x 2 ffn), and nothing is
    larger than the layer's input or output (tokens x dim) or a tile's gate/up."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=8, ffn_dim=256)
    torch.manual_seed(0)
    x = torch.randn(1, 1024, 64, requires_grad=True)
    plain = FeedForward(args)
    untiled = _largest(plain, x, 256)
    assert untiled.inner == 1024 * 512
    tiled_mlp = TiledMLP(FeedForward(args))
    tiled_mlp.load_state_dict(plain.state_dict())
    tiled = _largest(tiled_mlp, x, 256)
    tile = tile_tokens(1024, 64)
    assert tile == 64 and tiled.inner == tile * 512
    assert tiled.any <= max(tile * 512, 1024 * 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [None, 7, 1000])
def test_tiled_rmsnorm_equals_the_plain_formula(dtype, tile):
    """The tiled RMSNorm: the plain formula's output bit for bit (every row by the same ops),
    its input and weight gradients within float rounding (its own formula, float32; the
    weight's accumulated in float32 over the tiles)."""
    from longtune.model.llama import RMSNorm
    from longtune.model.tiled import TiledRMSNorm, tile_norms

    torch.manual_seed(0)
    plain = RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        plain.weight.normal_(1, 0.1)
    tiled = RMSNorm(64, 1e-5).to(dtype)
    tiled.load_state_dict(plain.state_dict())
    tile_norms(tiled, tile)
    assert isinstance(tiled, TiledRMSNorm) and list(tiled.state_dict()) == ["weight"]
    x = torch.randn(3, 50, 64, dtype=dtype) * 3
    g = torch.randn(3, 50, 64, dtype=dtype)
    results = []
    for norm in (plain, tiled):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, norm.weight.grad))
    (y0, dx0, dw0), (y1, dx1, dw1) = results
    assert torch.equal(y1, y0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(dx1.float(), dx0.float()) < tol
    assert rel_err(dw1.float(), dw0.float()) < tol


def test_norm_tiles_bound_their_float32_work_at_any_length(monkeypatch):
    """A tiled norm runs in NORM_TILES tiles, more where one tile's float32 work would pass
    NORM_TILE_BYTES: a long sequence gets more tiles (8B at 1M tokens: eight tiles would make
    2 GiB float32 temporaries, four at once in the backward). Checked on every float32 tensor
    made in forward and backward, with the cap lowered to 128 rows of 64."""
    import longtune.model.tiled as tiled
    from longtune.model.llama import RMSNorm
    from longtune.model.tiled import norm_tile, tile_norms

    assert norm_tile(2**20, 4096) == 8192  # 128 tiles of 128 MiB of float32
    assert norm_tile(1024, 64) == 128 and norm_tile(50, 64) == 50  # eight tiles, one
    assert norm_tile(131072, 4096) == 8192 and norm_tile(16384, 4096) == 4096  # ALST's floor
    monkeypatch.setattr(tiled, "NORM_TILE_BYTES", 128 * 64 * 4)
    assert norm_tile(4096, 64) == 128
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    tile_norms(norm)
    x = torch.randn(1, 4096, 64, dtype=torch.bfloat16, requires_grad=True)
    largest = 0

    class Float32Outputs(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2:
                    largest = max(largest, t.numel())
            return out

    with Float32Outputs():
        y = norm(x)
        y.backward(torch.ones_like(y))
    assert largest == 128 * 64  # the untiled formula's: 4096 x 64


def test_the_mlp_norm_runs_inside_the_tiles():
    """With a tiled MLP a block's ``ffn_norm`` runs inside each tile (its weight keeps its name
    and gets its gradient from the tiles, see the equality tests above): the normalized rows
    are never saved for the backward pass, only the norm's input, which the block has anyway
    (8B at 1M tokens: 8 GiB less in every block's backward, and in what each block keeps
    without checkpointing). Checked against the untiled model's ffn_norm outputs."""
    ids, labels, cu = _batch()
    plain, tiled = _model(), _model()
    apply_tiled_mlp(tiled, 50)
    normed = []
    for block in plain.layers.values():
        block.ffn_norm.register_forward_hook(lambda m, i, out: normed.append(out.detach()))
    with torch.no_grad():
        plain(ids, cu_seqlens=cu)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.detach())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tiled(ids, cu_seqlens=cu, labels=labels)
    assert len(normed) == ARGS.n_layers and saved
    for out in normed:
        assert not any(s.shape == out.shape and torch.equal(s, out) for s in saved)
