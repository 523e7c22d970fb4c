"""The fast paths compute the same function as the plain path: no float32 matmul in a bf16 step,
and ``torch.compile`` of the blocks (with activation checkpointing) leaves values and gradients
unchanged."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from longtune.model.args import ModelArgs
from longtune.model.llama import Transformer
from longtune.parallel.parallelize import apply_activation_checkpointing, apply_compile

ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, rope_theta=1e4
)
MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.addbmm.default,
    torch.ops.aten.mv.default,
    torch.ops.aten.addmv.default,
    torch.ops.aten.dot.default,
}
ATTENTION_OPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def batch(seed: int = 0, bs: int = 2, seq: int = 96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARGS.vocab_size, (bs, seq), generator=g)
    labels = torch.randint(0, ARGS.vocab_size, (bs, seq), generator=g)
    labels[:, ::4] = -100  # prompt tokens carry no loss
    cu = torch.tensor([0, 30, 96, 100, 192], dtype=torch.int32)  # 4 packed documents
    return ids, labels, cu


def model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ARGS).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)  # nn.init defaults leave the norms at 1: vary them too
    return m


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in MATMULS:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.seen.append((str(func), dtypes))
        return func(*args, **(kwargs or {}))


def test_bf16_training_step_runs_no_float32_matmul():
    """On a GPU a float32 matmul runs without tensor cores (the loss's output projection once
    took over a quarter of a bf16 step that way): every matmul of a bf16 forward + backward,
    activation checkpointing and the chunked loss included, takes bf16 inputs."""
    m = model(dtype=torch.bfloat16)
    apply_activation_checkpointing(m, "selective")
    ids, labels, cu = batch()
    with MatmulDtypes() as mode:
        loss = m(ids, cu_seqlens=cu, labels=labels)
        loss.backward()
    assert loss.dtype == torch.float32
    float32 = [(op, d) for op, d in mode.seen if torch.float32 in d]
    assert len(mode.seen) > 20 and not float32, float32


@pytest.mark.slow
@pytest.mark.parametrize(
    "ac, packed",
    [
        ("selective", False),  # the whole checkpointed block is one compiled graph
        ("none", True),  # the per-document attention runs between two compiled graphs
    ],
)
def test_compiled_blocks_equal_eager(ac, packed):
    """torch.compile of every block (after activation checkpointing, as parallelize does):
    same loss and gradients as the eager model."""
    from torch._dynamo.utils import counters

    ids, labels, cu = batch()
    cu = cu if packed else None
    eager, compiled = model(), model()
    for m in (eager, compiled):
        apply_activation_checkpointing(m, ac)
    apply_compile(compiled)
    torch._dynamo.reset()
    counters.clear()
    losses = []
    for m in (eager, compiled):
        loss = m(ids, cu_seqlens=cu, labels=labels)
        loss.backward()
        losses.append(loss.detach())
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled
    assert rel_err(losses[1], losses[0]) < 1e-5
    grads = {n.replace("._orig_mod", ""): p.grad for n, p in compiled.named_parameters()}
    for name, p in eager.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-4, name
    if packed:  # another document layout at the same length: no recompilation
        graphs = counters["stats"]["unique_graphs"]
        other = torch.tensor([0, 50, 96, 150, 160, 192], dtype=torch.int32)
        compiled(ids, cu_seqlens=other, labels=labels).backward()
        assert counters["stats"]["unique_graphs"] == graphs


class OpCount(TorchDispatchMode):
    """Counts the matmuls and the attention-kernel calls dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls = self.attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.matmuls += func in MATMULS
        self.attention += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_every_projection_but_not_attention():
    """Selective checkpointing gives the gradients of no checkpointing; in the backward pass it
    recomputes the block's projections as full checkpointing does (q/k/v, wo, gate/up: three
    per block; w2's output is never needed again, the recompute stops before it) but not the
    attention kernel, which full checkpointing runs again for every document."""
    ids, labels, cu = batch()
    grads, counts = {}, {}
    for ac in ("none", "selective", "full"):
        m = model()
        apply_activation_checkpointing(m, ac)
        loss = m(ids, cu_seqlens=cu, labels=labels)
        with OpCount() as mode:
            loss.backward()
        counts[ac] = (mode.matmuls, mode.attention)
        grads[ac] = {
            n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in m.named_parameters()
        }
    for ac in ("selective", "full"):
        for name, g in grads["none"].items():
            assert rel_err(grads[ac][name], g) < 1e-5, (ac, name)
    n_docs = len(cu) - 1
    assert counts["selective"][0] - counts["none"][0] == 3 * ARGS.n_layers
    assert counts["full"][0] - counts["none"][0] == 3 * ARGS.n_layers
    assert counts["none"][1] == counts["selective"][1] == 0  # backward kernels are other ops
    assert counts["full"][1] == n_docs * ARGS.n_layers


def _sharding_of_parallelized(rank: int, world: int, param_dtype) -> str:  # noqa: ANN001
    from torch.distributed.device_mesh import init_device_mesh

    from longtune.parallel.parallelize import parallelize

    m = model()
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "sp"))
    parallelize(m, mesh, "selective", param_dtype)
    return type(m.layers["0"].attention.wqkv.weight).__name__


def test_fsdp_only_where_there_is_something_to_shard_or_cast():
    """One rank in float32: a plain model (FSDP would only copy); mixed precision or more
    ranks: FSDP's DTensor parameters."""
    from dist_utils import run_ranks

    assert run_ranks(1, _sharding_of_parallelized, None) == ["Parameter"]
    assert run_ranks(1, _sharding_of_parallelized, torch.bfloat16) == ["DTensor"]
    assert run_ranks(2, _sharding_of_parallelized, None) == ["DTensor", "DTensor"]
