"""LoRA on the native model against the real ``peft`` package on ``transformers``' Llama.

The same adapter values are put into a ``PeftModel`` and into the native model (fused
projections, one adapter pair per HF projection); logits and every adapter's gradient must
agree (float32, 1e-5 relative) on packed documents, on the SmolLM2 shape (9 heads, 3 KV heads,
tied embeddings), in one process and under Ulysses SP over 3 gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from helpers import make_hf_checkpoint, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from longtune.model.args import ModelArgs
from longtune.model.convert import load_model
from longtune.model.llama import Transformer, positions_from_cu_seqlens
from longtune.model.lora import (
    LORA_TARGETS,
    LoraSpec,
    add_lora,
    init_adapters,
    is_adapter,
    merged_weight,
    peft_key,
)
from longtune.parallel.parallelize import apply_activation_checkpointing, apply_compile
from longtune.parallel.ulysses import apply_sequence_parallel

peft = pytest.importorskip("peft")

SMOL_SHAPE = dict(
    num_attention_heads=9,
    num_key_value_heads=3,
    hidden_size=72,
    intermediate_size=96,
    tie_word_embeddings=True,
)
TINY = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, rope_theta=1e4
)  # weights (128, 64), (64, 64), (192, 64), (64, 96): no activation of 180 tokens has their shape
DOCS = [5, 9, 7, 3]  # packed documents, 24 tokens (divisible by 3 ranks)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("lora") / "smol", seed=3, **SMOL_SHAPE)


def _peft_model(path, spec: LoraSpec):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(spec.targets),
        use_rslora=spec.rslora,
    )
    model = get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B is zero at init: give both random values
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _native(path, spec: LoraSpec, peft_model):
    model = load_model(path, dtype=torch.float32)
    add_lora(model, spec)
    peft_sd = peft_model.state_dict()
    values = {
        name: peft_sd[peft_key(name).replace(".weight", ".default.weight")]
        for name, _ in model.named_parameters()
        if is_adapter(name)
    }
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert not unexpected and all(not is_adapter(k) for k in missing)
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(11)
    seq = sum(DOCS)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    weights = torch.randn(1, seq, vocab, generator=g)
    return ids, cu, weights


def _peft_logits(model, ids, cu):
    """transformers has no packed attention: each document on its own, concatenated."""
    bounds = cu.tolist()
    return torch.cat(
        [model(ids[:, a:b]).logits for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dim=1
    )


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if is_adapter(n)}


def _peft_grads(model, native_names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[peft_key(n).replace(".weight", ".default.weight")].grad for n in native_names}


@pytest.mark.parametrize(
    "targets, rslora",
    [(LORA_TARGETS, False), (("q_proj", "v_proj", "up_proj"), True)],
    ids=["all-projections", "some-parts-of-fused-rslora"],
)
def test_logits_and_adapter_gradients_equal_peft(smol, targets, rslora):
    spec = LoraSpec(rank=4, alpha=8.0, targets=targets, rslora=rslora)
    ref = _peft_model(smol, spec)
    model = _native(smol, spec, ref)
    ids, cu, w = _batch(model.args.vocab_size)

    ref_logits = _peft_logits(ref, ids, cu)
    logits = model(ids, cu_seqlens=cu)
    assert rel_err(logits, ref_logits) < 1e-5
    (ref_logits * w).sum().backward()
    (logits * w).sum().backward()
    grads = _adapter_grads(model)
    assert len(grads) == 2 * len(targets) * model.args.n_layers
    ref_grads = _peft_grads(ref, grads)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-5, name
    # The base is frozen: no gradient anywhere else.
    assert all(p.grad is None for n, p in model.named_parameters() if not is_adapter(n))


def test_merged_weights_give_the_adapted_logits(smol):
    """W + scale * B A per HF projection of a fused weight (some parts untargeted): the plain
    model with merged weights computes what the adapted one does."""
    spec = LoraSpec(rank=4, alpha=6.0, targets=("k_proj", "gate_proj", "o_proj"))
    model = _native(smol, spec, _peft_model(smol, spec))
    ids, cu, _ = _batch(model.args.vocab_size)
    with torch.no_grad():
        adapted = model(ids, cu_seqlens=cu)
    plain = load_model(smol, dtype=torch.float32)
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for i, block in plain.layers.items():
            for native in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
                prefix = f"layers.{i}.{native}"
                pairs = {
                    n.rsplit(".", 1)[1]: (sd[n], sd[n.replace(".lora_A.", ".lora_B.")])
                    for n in sd
                    if n.startswith(prefix + ".lora_A.")
                }
                w = block.get_submodule(native).weight
                w.copy_(merged_weight(w, plain.args, native, pairs, spec))
        merged = plain(ids, cu_seqlens=cu)
    assert rel_err(merged, adapted) < 1e-5


def test_initial_adapters_are_peft_init_and_the_same_everywhere(smol):
    """A Kaiming-uniform within PEFT's bound, B zero (so the adapted model starts as the
    base), the values fixed by seed and name."""
    spec = LoraSpec(rank=8, alpha=16.0)
    model = load_model(smol, dtype=torch.float32)
    add_lora(model, spec)
    shapes = {n: p for n, p in model.named_parameters() if is_adapter(n)}
    a = init_adapters(shapes, seed=5)
    b = init_adapters(shapes, seed=5)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a[next(iter(a))], init_adapters(shapes, seed=6)[next(iter(a))])
    for name, t in a.items():
        if ".lora_B." in name:
            assert not t.any()
        else:
            bound = 1 / t.shape[1] ** 0.5
            assert t.abs().max() <= bound and t.std() > bound / 3


def _sp_rank_run(rank, world, path, spec, values, ids, cu, w, ref_logits, ref_grads):
    model = load_model(path, dtype=torch.float32)
    add_lora(model, spec)
    model.load_state_dict(values, strict=False)
    apply_sequence_parallel(model, dist.group.WORLD)
    seq = ids.shape[1]
    lo, hi = rank * seq // world, (rank + 1) * seq // world
    pos = positions_from_cu_seqlens(cu, seq)[None]
    logits = model(ids[:, lo:hi], position_ids=pos[:, lo:hi], cu_seqlens=cu)
    (logits * w[:, lo:hi]).sum().backward()
    grads = _adapter_grads(model)
    for g in grads.values():
        dist.all_reduce(g)  # each rank's tokens give part of every adapter's gradient
    # Compared here: only two numbers cross the queue (large results fill its pipe while the
    # parent waits for the ranks to end).
    logit_err = rel_err(logits, ref_logits[:, lo:hi])
    grad_err = max((rel_err(g, ref_grads[n]), n) for n, g in grads.items())
    return float(logit_err), grad_err


def test_sequence_parallel_lora_equals_peft(smol):
    """Ulysses over 3 ranks (3 heads and 1 KV head each): each rank's logits and the summed
    adapter gradients equal PEFT's on the whole sequence."""
    spec = LoraSpec(rank=4, alpha=8.0)
    ref = _peft_model(smol, spec)
    model = _native(smol, spec, ref)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter(n)}
    ids, cu, w = _batch(model.args.vocab_size)
    ref_logits = _peft_logits(ref, ids, cu)
    (ref_logits * w).sum().backward()
    ref_grads = {n: g.detach().clone() for n, g in _peft_grads(ref, values).items()}

    args = (smol, spec, values, ids, cu, w, ref_logits.detach(), ref_grads)
    for logit_err, (grad_err, name) in run_ranks(3, _sp_rank_run, *args):
        assert logit_err < 1e-5
        assert grad_err < 1e-5, name


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _MatmulShapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func in MATMULS:
            self.shapes.append(tuple(out.shape))
        return out


def _tiny_lora(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    add_lora(model, LoraSpec(rank=4, alpha=8.0))
    values = init_adapters({n: p for n, p in model.named_parameters() if is_adapter(n)}, 0)
    g = torch.Generator().manual_seed(1)
    for name in values:  # B is zero at init: give it values so that A has a gradient
        if ".lora_B." in name:
            values[name] = torch.randn(values[name].shape, generator=g) * 0.05
    model.load_state_dict(values, strict=False)
    return model


@pytest.mark.parametrize("ac", ["none", "selective", "full", "selective+compile"])
def test_every_checkpointing_mode_and_compile_give_the_same_adapter_gradients(ac):
    """The same loss and adapter gradients with every activation-checkpointing mode (and
    compiled blocks); the backward pass never computes a gradient for a frozen weight (no
    matmul of a frozen weight's shape), the recompute included."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY.vocab_size, (2, 90), generator=g)
    labels = torch.randint(0, TINY.vocab_size, (2, 90), generator=g)
    cu = torch.tensor([0, 40, 90, 130, 180], dtype=torch.int32)
    ref = _tiny_lora()
    ref(ids, cu_seqlens=cu, labels=labels).backward()
    model = _tiny_lora()
    apply_activation_checkpointing(model, ac.split("+")[0])
    if ac.endswith("compile"):
        apply_compile(model)
    loss = model(ids, cu_seqlens=cu, labels=labels)
    with _MatmulShapes() as seen:
        loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if is_adapter(n)}
    got = {
        n.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", ""): p.grad
        for n, p in model.named_parameters()
        if is_adapter(n)
    }
    assert sorted(got) == sorted(want)
    for name, grad in want.items():
        assert rel_err(got[name], grad) < 1e-5, name
    frozen = {
        tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2 and not is_adapter(n)
    }
    if not ac.endswith("compile"):  # compiled graphs run as one kernel call: nothing to see
        assert seen.shapes and not frozen & set(seen.shapes), frozen & set(seen.shapes)


def test_the_config_lists_the_model_s_lora_targets():
    from longtune.train import config

    assert config.LORA_TARGETS == LORA_TARGETS


def test_a_missing_or_other_base_is_named_in_one_line(smol, tmp_path):
    """The base a checkpoint names is gone (it moved): say so and ask for its new folder; a
    folder given instead that is no model: say which, and what the adapters were trained on."""
    from longtune.model.lora import LoraRecord, check_record

    spec = LoraSpec(rank=4, alpha=8.0)
    record = LoraRecord(spec, smol).state_dict()
    gone = {**record, "base": str(tmp_path / "moved-away")}
    with pytest.raises(ValueError, match="is not there any more.*give its new folder as --base"):
        check_record(gone, None, tmp_path / "moved-away", "--base")
    with pytest.raises(ValueError, match=r"--base=.* is not a model folder.*trained on"):
        check_record(record, None, tmp_path, "--base")
    assert check_record(record, spec, smol, "model.path") == spec
