"""Activation offload (``model.offload_activations``): the checkpoint no longer holds a block's
input, and the loss and gradients do not change.

On CPU the "host" copy lives in the same memory (the trainer refuses the setting there), so
what these tests check is the bookkeeping the CUDA path shares: after the forward pass only the
stash holds each block input (the plain checkpoint's closure holds it: the check fails without
offload), the recompute reads a copy with the same values (losses and gradients bit-identical
to checkpointing without offload, under selective and full checkpointing, with a tiled MLP and
LoRA adapters, and with FSDP2 on 2 ranks), and the last block keeps its input. The transfers
on a side CUDA stream are measured by ``benchmarks/gpu.sh`` (stage ``offload``).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from dist_utils import run_ranks

from longtune.model.args import ModelArgs
from longtune.model.llama import Transformer
from longtune.model.lora import LoraSpec, add_lora
from longtune.parallel.dims import ParallelDims
from longtune.parallel.offload import OffloadingCheckpointWrapper
from longtune.parallel.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_tiled_mlp,
    parallelize,
)

ARGS = ModelArgs(
    dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, rope_theta=1e4
)


def _model(seed: int = 0, lora: bool = False) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ARGS)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    if lora:
        spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
        add_lora(m, spec)
        with torch.no_grad():  # B != 0 (PEFT's init has B = 0): the adapters count
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.05)
    return m


def _batch(seed: int = 0, bs: int = 2, seq: int = 80):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARGS.vocab_size, (bs, seq), generator=g)
    labels = torch.randint(0, ARGS.vocab_size, (bs, seq), generator=g)
    labels[:, ::4] = -100
    n = bs * seq
    cu = torch.tensor([0, n // 5, n // 2, n], dtype=torch.int32)
    return ids, labels, cu


def _step(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    ids, labels, cu = batch
    loss = model(ids, cu_seqlens=cu, labels=labels)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n.replace("._checkpoint_wrapped_module", "")] = p.grad
    return loss.detach(), grads


@pytest.mark.parametrize("ac", ["selective", "full"])
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_offload_gives_the_same_loss_and_gradients(ac, tiled, lora):
    """Bit-identical to the same checkpointing without offload (the recompute reads the same
    values)."""
    batch = _batch()
    results = []
    for offload in (False, True):
        model = _model(lora=lora)
        if tiled:
            apply_tiled_mlp(model, 48)
        apply_activation_checkpointing(model, ac, offload=offload)
        results.append(_step(model, batch))
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    assert torch.equal(loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads) and grads
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


def _block_inputs_alive(offload: bool) -> list[bool]:
    """After the forward pass, which block inputs something still holds."""
    model = _model()
    apply_activation_checkpointing(model, "full", offload=offload)
    ids, labels, cu = _batch()
    seen: list[weakref.ref] = []

    def keep_ref(module, args):  # noqa: ANN001, ANN202
        seen.append(weakref.ref(args[0]))

    for block in model.layers.values():
        block.register_forward_pre_hook(keep_ref)
    loss = model(ids, cu_seqlens=cu, labels=labels)
    gc.collect()
    alive = [r() is not None for r in seen]
    loss.backward()  # the recompute still works after the inputs went
    assert all(p.grad is not None for p in model.parameters())
    return alive


def test_the_checkpoint_no_longer_holds_the_block_inputs():
    """Without offload every block's input is held by its checkpoint until the backward pass;
    with it, none but the last block's (the backward pass starts there)."""
    assert _block_inputs_alive(offload=False) == [True, True, True]
    assert _block_inputs_alive(offload=True) == [False, False, True]


def test_names_and_no_grad_pass_through():
    """The wrapper keeps checkpoint_wrapper's state-dict names (checkpoints load either way);
    without gradients (evaluation) nothing is stashed; compile takes the block inside the
    wrapper; offload needs checkpointing."""
    plain, offloaded = _model(), _model()
    apply_activation_checkpointing(plain, "full")
    apply_activation_checkpointing(offloaded, "full", offload=True)
    assert isinstance(offloaded.layers["0"], OffloadingCheckpointWrapper)
    assert list(offloaded.state_dict()) == list(plain.state_dict())
    ids, labels, cu = _batch()
    with torch.no_grad():
        assert torch.equal(offloaded(ids, cu_seqlens=cu), plain(ids, cu_seqlens=cu))
    assert offloaded.layers["0"]._offloader.last is None
    apply_compile(offloaded)  # the block inside the wrapper (the stash stays out of graphs)
    assert isinstance(offloaded.layers["0"], OffloadingCheckpointWrapper)
    assert type(offloaded.layers["0"]._checkpoint_wrapped_module).__name__ == "OptimizedModule"
    with pytest.raises(ValueError, match="needs selective or full"):
        apply_activation_checkpointing(_model(), "none", offload=True)


def _fsdp_rank(rank: int, world: int, batches) -> list[bool]:  # noqa: ANN001
    results = []
    for offload in (False, True):
        model = _model()
        dims = ParallelDims.build(world, 1, n_heads=ARGS.n_heads, n_kv_heads=ARGS.n_kv_heads)
        parallelize(model, dims.build_mesh("cpu"), "selective", None, offload_activations=offload)
        loss, grads = _step(model, batches[rank])
        results.append((loss, {n: g.full_tensor() for n, g in grads.items()}))
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    return [bool(torch.equal(loss, ref_loss))] + [
        bool(torch.equal(grads[n], g)) for n, g in ref_grads.items()
    ]


@pytest.mark.slow
def test_fsdp2_with_offload_equals_fsdp2_without():
    """Under FSDP2 (2 gloo ranks; the block's parameters gathered again for the recompute) the
    offloaded run's loss and gathered gradients are the plain one's, bit for bit."""
    batches = [_batch(seed=s) for s in (1, 2)]
    for same in run_ranks(2, _fsdp_rank, batches):
        assert all(same) and len(same) > 1


@pytest.mark.parametrize(
    ("settings", "device", "message"),
    [
        (["--model.offload_activations=true"], "cpu", "this run has no GPU"),
        (["--parallel.cpu_offload"], "cpu", "this run has no GPU"),
        (
            ["--model.offload_activations=true", "--model.activation_checkpointing=none"],
            "cuda",
            "activation_checkpointing=none keeps none",
        ),
    ],
)
def test_offload_settings_a_run_cannot_use_are_one_line(settings, device, message):
    """Offloads need a GPU; activation offload needs checkpointing: refused by the preflight
    in one line (before any process group)."""
    from longtune.train.config import ConfigError, load_config
    from longtune.train.preflight import check_offload

    cfg = load_config(None, ["--model=/models/llama", "--data=train.jsonl", *settings])
    with pytest.raises(ConfigError, match=message) as e:
        check_offload(cfg, device)
    assert "\n" not in str(e.value)
    for fine in (["--model.offload_activations=true"], ["--model.offload_activations=auto"]):
        check_offload(load_config(None, ["--model=m", "--data=d", *fine]), "cuda")
    check_offload(
        load_config(None, ["--model=m", "--data=d", "--model.offload_activations=auto"]), "cpu"
    )
