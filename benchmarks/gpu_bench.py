"""longtune vs transformers on one CUDA GPU: speed, memory and longest context, from one command.

Run it through ``benchmarks/gpu.sh`` (``--quick``: the same on CPU with a tiny model, in
seconds; CI runs that). Nothing is downloaded: models are random-weight ``LlamaConfig``
models of the Llama-3.2-1B and Llama-3.1-8B shapes, the tokenizer of the end-to-end run is a
character-level one built here, its data is made from the bundled demo data.

Sections, in order (each configuration in its own process; a section that would not start
before ``--budget-s`` is listed as skipped, so the whole run stays within the budget):

1. ``table``: one forward + backward step (no optimizer) of the 1B shape, bf16, on one
   sequence of random tokens, transformers (SDPA, its gradient checkpointing) against
   longtune (chunked loss, ``model.attention=auto``, ``train.compile`` default), same weights
   and tokens; at each length each side runs at its fastest setting that fits (no AC first,
   then selective (longtune) and full). Median step time, tokens/s, peak GB
   (``max_memory_allocated``), speed ratio, longtune's compile time (first step).
   Extra longtune rows: the same tokens packed as 8 documents; labels on 5 % of the tokens
   (chat answers); compile off.
2. ``mfu``: model FLOPs utilisation of those rows: FLOPs/token = 6·N (matmul weights, the
   output layer included) + 6·layers·S·dim (causal attention over S tokens; for packed
   documents S = Σ len² / total), against the card's dense bf16 peak.
3. ``attention``: the attention backends alone (fwd + bwd, 1B shape's heads, 32K tokens as 8
   documents): per-document SDPA, varlen (FA2 / FA3), flex; what ``auto`` should pick.
4. ``longest``: the longest context one forward + backward step reaches with full activation
   checkpointing, 1B and 8B shapes: peak memory measured at two lengths, extrapolated linearly
   to the card's memory (labelled "extrapolated").
5. ``train``: ``longtune train`` end to end at 32K (1B shape, defaults: selective AC, FSDP2
   on one rank, bf16, AdamW, compile, ~5 documents per sequence): tokens/s and peak GB of the
   steps after the warm-up; the run is stopped once those steps are logged (export not timed).
6. ``plan``: the memory planner (``longtune.plan``, device preset h100-80 or h200-141 by the
   card's memory) against one real training step built as the trainer does (meta ->
   ``parallelize``, FSDP2 on one rank in bf16 -> random init, fused AdamW with its state, no
   compile): predicted allocated bytes (traced tensors + FlashAttention's dq accumulator) vs
   ``max_memory_allocated``, 1B shape at 8K, 32K, 128K and 8B at 32K, 128K (an OOM is a
   result when the planner says it does not fit); the planner's longest 8B context on the card
   with full AC, tiled MLP and activation offload (a prediction). Last in the budget:
   ``--only plan --budget-s 540`` runs it alone.
7. ``offload``: activation offload, 1B shape at 128K and 8B at 32K: one fwd+bwd step with full
   AC without and with ``model.offload_activations`` (same random weights): peak GB, step time,
   loss and gradient norm of both (the numerics must not change).

Everything printed also goes to ``--results`` (default ``$OUT/gpu_bench.txt`` when ``OUT`` is
set, else ``./gpu_bench.txt``), raw records to the same name with ``.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("table", "mfu", "attention", "longest", "train", "plan", "offload")
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "llama3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}

# What each mode runs. GPU: the lengths that matter on a GPU; quick: the same code paths, tiny
# and short.
PLANS: dict[str, dict[str, Any]] = {
    "gpu": dict(
        shape="llama3.2-1b",
        table=[8192, 32768, 65536],
        repeats={8192: 3, 32768: 3, 65536: 2},
        hf_settings=["none", "full"],
        lt_settings=["none", "selective", "full"],
        attention_tokens=32768,
        longest={"llama3.2-1b": [65536, 131072], "llama3.1-8b": [16384, 32768]},
        train_context=32768,
        train_steps=6,
        train_warmup=2,
        plan_rows=[
            ("llama3.2-1b", 8192, "selective", False),
            ("llama3.2-1b", 32768, "selective", False),
            ("llama3.2-1b", 131072, "full", True),
            ("llama3.1-8b", 32768, "full", False),
            ("llama3.1-8b", 131072, "full", True),
        ],
        plan_longest=("llama3.1-8b", "full", True, 2**26),
        offload={"llama3.2-1b": [131072], "llama3.1-8b": [32768]},
    ),
    "quick": dict(
        shape="tiny",
        table=[256],
        repeats={256: 2},
        hf_settings=["none", "full"],
        lt_settings=["none", "selective", "full"],
        attention_tokens=512,
        longest={"tiny": [1024, 4096]},
        train_context=512,
        train_steps=3,
        train_warmup=1,
        plan_rows=[("tiny", 512, "full", True)],
        plan_longest=("tiny", "full", False, 2048),  # (tiled MLP traces slowly on tiny shapes)
        offload={"tiny": [512]},
    ),
}


class Report:
    """Prints and keeps every line, and the raw records, in the results files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")

    def record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self.path.with_suffix(".json").write_text(json.dumps(self.records, indent=1))


# ---------------------------------------------------------------------------------------------
# Worker side: one process per configuration group
# ---------------------------------------------------------------------------------------------


def _device_and_dtype() -> tuple[Any, Any]:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _cu_seqlens(length: int, docs: int, device: Any) -> Any:
    import torch

    bounds = [round(i * length / docs) for i in range(docs + 1)]
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _build(spec: dict[str, Any], setting: dict[str, Any], device: Any, dtype: Any) -> Any:
    """The model of one setting: transformers or longtune, from the checkpoint folder or random."""
    import torch

    if spec["impl"] == "transformers":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(
            spec["model_dir"], dtype=dtype, attn_implementation="sdpa"
        ).to(device)
        model.config.use_cache = False
        if setting["ac"] != "none":
            model.gradient_checkpointing_enable({"use_reentrant": False})
        return model.train()
    from longtune.model.args import ModelArgs
    from longtune.model.convert import load_model
    from longtune.model.llama import Transformer
    from longtune.parallel.parallelize import apply_activation_checkpointing, apply_compile

    if spec.get("model_dir"):
        model = load_model(spec["model_dir"], dtype=dtype, device=device)
    else:  # random weights of a named shape, built on the device in the compute dtype
        args = ModelArgs.from_hf_config({"model_type": "llama", **SHAPES[spec["shape"]]})
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        torch.manual_seed(0)  # every setting the same weights
        try:
            with torch.device(device):
                model = Transformer(args)
        finally:
            torch.set_default_dtype(default)
        model.init_buffers(device=device)
    apply_activation_checkpointing(model, setting["ac"], offload=setting.get("offload", False))
    if setting.get("compile", device.type == "cuda"):
        apply_compile(model)
    return model.train()


def _step_fn(spec: dict[str, Any], setting: dict[str, Any], model: Any, length: int, device: Any):
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[spec["shape"]]["vocab_size"]
    ids = torch.randint(0, vocab, (1, length), generator=g).to(device)
    if spec["impl"] == "transformers":
        return lambda: model(input_ids=ids, labels=ids).loss
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    frac = setting.get("label_frac", 1.0)
    if frac < 1.0:  # chat-like: only the last tokens of each stretch are answers
        keep = (torch.arange(length, device=device) % 1000) >= 1000 * (1 - frac)
        labels[:, ~keep] = -100
    cu = _cu_seqlens(length, setting.get("docs", 1), device)
    backend = setting.get("attention", "auto")
    return lambda: model(ids, cu_seqlens=cu, labels=labels, attention=backend)


def worker_steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Forward + backward steps for each (length, setting); settings in order of speed, the
    first that fits is the "fastest that fits"; an OOM moves on to the next setting."""
    import torch

    device, dtype = _device_and_dtype()
    out = []
    for length in spec["lengths"]:
        fitted = False
        for setting in spec["settings"]:
            if fitted and setting.get("fallback", True):
                continue
            rec = {**setting, "impl": spec["impl"], "length": length, "shape": spec["shape"]}
            model = step = None
            try:
                _reset_peak(device)
                model = _build(spec, setting, device, dtype)
                step = _step_fn(spec, setting, model, length, device)
                times = []
                for _ in range(spec["warmup"] + spec["repeats"]):
                    _sync(device)
                    t0 = time.perf_counter()
                    loss = step()
                    loss.backward()
                    if spec.get("check"):  # the last step's loss and gradient norm
                        grads = [
                            p.grad.float().norm() for p in model.parameters() if p.grad is not None
                        ]
                        rec.update(loss=float(loss), grad_norm=float(torch.stack(grads).norm()))
                    model.zero_grad(set_to_none=True)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                timed = times[spec["warmup"] :]
                rec.update(
                    status="ok",
                    first_step_s=times[0],
                    step_s=statistics.median(timed),
                    tokens_per_s=length / statistics.median(timed),
                    peak_gb=_peak_gb(device),
                )
                if setting.get("fallback", True):
                    fitted = True
            except Exception as e:  # one failing configuration must not stop the others
                rec.update(
                    status="oom" if _is_oom(e) else "error", error=str(e).splitlines()[0][:200]
                )
            finally:
                model = step = None  # free the model before the next setting is built
            out.append(rec)
            print(json.dumps(rec), flush=True)
    return out


def worker_attention(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Each attention backend alone, fwd + bwd, on a packed sequence."""
    import torch

    from longtune.model.attention import AttentionMeta, attention

    device, dtype = _device_and_dtype()
    shape = SHAPES[spec["shape"]]
    length, docs = spec["tokens"], 8
    g = torch.Generator().manual_seed(0)
    h, kv, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    q = torch.randn(1, length, h, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(1, length, kv, d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(1, length, kv, d, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(1, length, h, d, generator=g).to(device, dtype)
    cu = _cu_seqlens(length, docs, device)
    out, ref = [], None
    for backend in spec["backends"]:
        rec = {"backend": backend, "tokens": length, "docs": docs}
        try:
            times = []
            for _ in range(3 + spec["repeats"]):
                meta = AttentionMeta.from_cu_seqlens(cu, backend=backend)
                meta.prepare(device)  # as the model does: FA3, the flex block mask
                _sync(device)
                t0 = time.perf_counter()
                o = attention(q, k, v, meta)
                o.backward(grad)
                _sync(device)
                times.append(time.perf_counter() - t0)
            o = o.detach().float()
            ref = o if ref is None else ref
            rec.update(
                status="ok",
                ms=1000 * statistics.median(times[3:]),
                rel_err_vs_first=float((o - ref).norm() / ref.norm()),
            )
        except Exception as e:
            rec.update(status="error", error=str(e).splitlines()[0][:200])
        q.grad = k.grad = v.grad = None
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def _plan_device(on_gpu: bool) -> Any:
    """The planner's device preset for this card (by its memory), or a small CPU stand-in."""
    import torch

    from longtune.plan.hardware import DEVICES, Device, cpu_device

    if on_gpu:
        total = torch.cuda.get_device_properties(0).total_memory
        return DEVICES["h200-141" if total > 100 * 2**30 else "h100-80"]
    return Device(**{**cpu_device().__dict__, "memory": 24 * 2**20})  # a short longest() search


def worker_plan(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The planner's prediction for one layout, then the same step on real tensors (see
    :func:`_real_step`). ``spec["longest"]``: the planner's longest context up to that many
    tokens instead (no step)."""
    import torch
    import torch.distributed as dist

    from longtune.model.args import ModelArgs
    from longtune.plan.planner import longest, predict
    from longtune.plan.trace import Layout

    device, _ = _device_and_dtype()
    on_gpu = device.type == "cuda"
    param_dtype = torch.bfloat16 if on_gpu else None  # as the trainer: bf16 on CUDA
    args = ModelArgs.from_hf_config({"model_type": "llama", **SHAPES[spec["shape"]]})
    layout = Layout(ac=spec["ac"], tiled_mlp=spec["tiled"], offload=spec.get("offload", False))
    dev = _plan_device(on_gpu)
    rec: dict[str, Any] = {**spec, "device_preset": dev.name}
    t0 = time.perf_counter()
    if spec.get("longest"):
        length, p = longest(
            args, layout, device=dev, param_dtype=param_dtype, limit=spec["longest"]
        )
        rec.update(status="ok", length=length, predicted_device=p.device_bytes if p else 0)
        rec["plan_s"] = time.perf_counter() - t0
        print(json.dumps(rec), flush=True)
        return [rec]
    p = predict(
        args, layout, context=spec["context"], device=dev, nodes=1, gpus_per_node=1,
        param_dtype=param_dtype,
    )  # fmt: skip
    rec.update(
        predicted_tensor=p.tensor_peak,
        # what the caching allocator hands out: the tensors and FlashAttention's accumulator
        predicted_allocated=p.tensor_peak + p.terms.get("attention_dq_accumulator", 0),
        predicted_device=p.device_bytes,
        fits=p.fits,
        plan_s=time.perf_counter() - t0,
    )
    dist.init_process_group(
        "nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1
    )
    try:
        rec.update(_real_step(args, spec, device, param_dtype))
    except Exception as e:  # an OOM is a result: the planner should have said it does not fit
        rec.update(status="oom" if _is_oom(e) else "error", error=str(e).splitlines()[0][:200])
    finally:
        dist.destroy_process_group()
    print(json.dumps(rec), flush=True)
    return [rec]


def _real_step(args: Any, spec: dict[str, Any], device: Any, param_dtype: Any) -> dict[str, Any]:
    """The model built the trainer's way (meta -> parallelize on one rank -> to_empty -> random
    init), fused AdamW with its state made, one forward + backward + optimizer step. GPU: peak
    ``max_memory_allocated`` / ``reserved``; CPU: the planner's tracker on the real step."""
    import torch

    from longtune.model.llama import Transformer
    from longtune.parallel.dims import ParallelDims
    from longtune.parallel.parallelize import is_fsdp_sharded, parallelize
    from longtune.plan.trace import _first_rows_supervised, make_optimizer_state, tracked_step

    dims = ParallelDims.build(1, 1, -1, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    with torch.device("meta"):
        model = Transformer(args)
    levers = {"tiled_mlp": True} if spec["tiled"] else {}
    parallelize(model, dims.build_mesh(device.type), spec["ac"], param_dtype, **levers)
    model.to_empty(device=device)
    if not is_fsdp_sharded(model):
        model.tie_weights()
    with torch.no_grad():
        for w in model.parameters():
            getattr(w, "_local_tensor", w).normal_(0.0, 0.02)
    model.init_buffers(device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    make_optimizer_state(opt, list(model.parameters()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (1, spec["context"]), generator=g).to(device)
    pos = torch.arange(spec["context"], device=device)[None]
    labels = torch.randint(0, args.vocab_size, (1, spec["context"]), generator=g).to(device)
    _reset_peak(device)
    t1 = time.perf_counter()
    out: dict[str, Any] = {"status": "ok"}
    if device.type == "cuda":
        model(ids, position_ids=pos, labels=labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        out["measured_allocated"] = torch.cuda.max_memory_allocated()
        out["measured_reserved"] = torch.cuda.max_memory_reserved()
    else:  # no allocator statistics on CPU: the planner's tracker on the real step
        with _first_rows_supervised(None):
            out["measured_allocated"] = tracked_step(model, opt, ids, pos, labels).peak
    out["step_s"] = time.perf_counter() - t1
    return out


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


class Runner:
    """Starts worker processes within the time budget."""

    def __init__(self, budget_s: float, report: Report, env: dict[str, str]) -> None:
        self.deadline = time.monotonic() + budget_s
        self.report = report
        self.env = env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def worker(self, task: str, spec: dict[str, Any], min_s: float = 20) -> list[dict[str, Any]]:
        """Run one worker; its JSON lines, or [] (with a line saying why) if it did not finish."""
        if self.left() < min_s:
            self.report.line(f"  skipped {task} {_brief(spec)}: time budget")
            return []
        cmd = [sys.executable, __file__, "--_worker", task, json.dumps(spec)]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=max(self.left(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            self.report.line(f"  {task} {_brief(spec)} stopped at the time budget")
        recs = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
        if proc.returncode not in (0, -signal.SIGKILL):
            tail = stderr.strip().splitlines()[-1:] or ["?"]
            self.report.line(f"  {task} {_brief(spec)} failed: {tail[0][:300]}")
        for r in recs:
            self.report.record({"task": task, **r})
        return recs


def _brief(spec: dict[str, Any]) -> str:
    keys = ("impl", "shape", "lengths", "tokens")
    return "(" + ", ".join(f"{k}={spec[k]}" for k in keys if k in spec) + ")"


def make_checkpoint(shape: str, out: Path, device: str) -> Path:
    """A random-weight HF Llama folder of ``shape`` (bf16, initialized on ``device``), with a
    character-level tokenizer and a chat template."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import tiny_tokenizer  # the char-level tokenizer of the test suite

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tiny_tokenizer(min(config.vocab_size, 102)).save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    return out


def make_chat_data(out: Path, context: int, n_seqs: int) -> Path:
    """Long-context chat examples from the demo data: ~5 per sequence of ``context`` tokens
    (character-level tokens): retrieved documents in the user turn, a short answer."""
    demo = [
        json.loads(x) for x in (REPO / "longtune/demo/data/train.jsonl").read_text().splitlines()
    ]
    per_example = context // 5
    rows, i = [], 0
    while len(rows) < 5 * n_seqs:
        parts, answer = [], ""
        while sum(len(p) for p in parts) < per_example * 0.8:
            msgs = demo[i % len(demo)]["messages"]
            parts.append(next(m["content"] for m in msgs if m["role"] == "user"))
            answer = next(m["content"] for m in msgs if m["role"] == "assistant")
            i += 1
        user = "\n\n".join(parts)[: int(per_example * 0.9)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def section_table(run: Runner, plan: dict[str, Any], ckpt: Path) -> list[dict[str, Any]]:
    rep = run.report
    rep.line("== 1. one forward+backward step: transformers vs longtune (same weights and tokens)")
    rep.line(
        f"{'tokens':>7} | {'transformers AC':<15} {'s':>7} {'tok/s':>9} {'peak GB':>7} | "
        f"{'longtune AC':<20} {'s':>7} {'tok/s':>9} {'peak GB':>7} {'compile s':>9} | {'speed':>6}"
    )
    rows = []
    for length in plan["table"]:
        base = dict(shape=plan["shape"], model_dir=str(ckpt), lengths=[length])
        base.update(repeats=plan["repeats"][length])
        hf = run.worker(
            "steps",
            {
                **base,
                "impl": "transformers",
                "warmup": 1,
                "settings": [{"ac": a} for a in plan["hf_settings"]],
            },
        )
        lt_settings = [{"ac": a} for a in plan["lt_settings"]]
        if length == plan["table"][0]:
            lt_settings += [
                {"ac": "none", "docs": 8, "fallback": False, "label": "8 documents"},
                {"ac": "none", "compile": False, "fallback": False, "label": "compile off"},
            ]
        if len(plan["table"]) == 1 or length == plan["table"][1]:
            lt_settings += [
                {"ac": "selective", "label_frac": 0.05, "fallback": False, "label": "5% labels"}
            ]
        lt = run.worker("steps", {**base, "impl": "longtune", "warmup": 2, "settings": lt_settings})
        best_hf = next((r for r in hf if r["status"] == "ok"), None)
        for r in [x for x in lt if x["status"] == "ok"] or [None]:
            rows.append({"length": length, "hf": best_hf, "lt": r})
            rep.line(_table_line(length, best_hf, r))
        for r in hf + lt:
            if r["status"] != "ok":
                rep.line(
                    f"{'':>7}   {r['impl']} AC {r['ac']}: {r['status']} ({r.get('error', '')[:80]})"
                )
    return rows


def _table_line(length: int, hf: dict | None, lt: dict | None) -> str:
    def side(r: dict | None, width: int, compile_col: bool) -> str:
        if r is None:
            return f"{'-':<{width}} {'-':>7} {'-':>9} {'-':>7}" + (
                f" {'-':>9}" if compile_col else ""
            )
        label = r["ac"] + (f", {r['label']}" if r.get("label") else "")
        s = f"{label:<{width}} {r['step_s']:>7.3f} {r['tokens_per_s']:>9.0f} {r['peak_gb']:>7.1f}"
        if compile_col:
            s += f" {max(r['first_step_s'] - r['step_s'], 0):>9.1f}"
        return s

    speed = f"{hf['step_s'] / lt['step_s']:>5.2f}x" if hf and lt else f"{'-':>6}"
    return f"{length:>7} | {side(hf, 15, False)} | {side(lt, 20, True)} | {speed}"


def model_flops_per_token(shape: dict[str, Any], attn_len: float, label_frac: float = 1.0) -> float:
    """6·N (matmul weights incl. the output layer, counted only for the ``label_frac`` of the
    tokens whose logits are computed) + 6·layers·S·dim (causal attention)."""
    d, f, n_l = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f
    n = n_l * per_layer + label_frac * shape["vocab_size"] * d
    return 6 * n + 6 * n_l * attn_len * q


def section_mfu(rep: Report, plan: dict[str, Any], rows: list[dict], device_name: str) -> None:
    rep.line("== 2. model FLOPs utilisation (6·N + 6·layers·S·dim per token)")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    rep.line(f"device {device_name}: dense bf16 peak {peak or 'unknown'} TFLOP/s")
    shape = SHAPES[plan["shape"]]
    hf_done = set()
    for row in rows:
        hf = row["hf"] if row["length"] not in hf_done else None
        hf_done.add(row["length"])
        for r in (hf, row["lt"]):
            if r is None:
                continue
            attn_len = r["length"] / r.get("docs", 1)  # equal documents: Σ len² / total
            flops = model_flops_per_token(shape, attn_len, r.get("label_frac", 1.0))
            tflops = float(f"{r['tokens_per_s'] * flops / 1e12:.3g}")
            mfu = f"{100 * tflops / peak:.1f} %" if peak else "n/a"
            label = r["ac"] + (f", {r['label']}" if r.get("label") else "")
            rep.line(
                f"  {r['length']:>7} {r['impl']:<12} {label:<24} {tflops:>7.1f} TFLOP/s  MFU {mfu}"
            )


def section_attention(run: Runner, plan: dict[str, Any], on_gpu: bool) -> None:
    rep = run.report
    rep.line(
        f"== 3. attention backends alone, fwd+bwd, {plan['attention_tokens']} tokens as 8 documents"
    )
    backends = ["sdpa", "varlen", "flex"] if on_gpu else ["sdpa"]
    recs = run.worker(
        "attention",
        {
            "shape": plan["shape"],
            "tokens": plan["attention_tokens"],
            "backends": backends,
            "repeats": 5,
        },
    )
    for r in recs:
        if r["status"] == "ok":
            rep.line(
                f"  {r['backend']:<7} {r['ms']:>8.2f} ms  (rel. diff vs {backends[0]}: {r['rel_err_vs_first']:.1e})"
            )
        else:
            rep.line(f"  {r['backend']:<7} {r['status']}: {r['error']}")


def section_longest(run: Runner, plan: dict[str, Any], capacity_gb: float) -> None:
    rep = run.report
    rep.line(
        f"== 4. longest context of one fwd+bwd step (full AC; bf16 weights and gradients, no "
        f"optimizer state), card memory {capacity_gb:.0f} GB"
    )
    for shape, lengths in plan["longest"].items():
        recs = run.worker(
            "steps",
            {
                "impl": "longtune",
                "shape": shape,
                "lengths": lengths,
                "warmup": 0,
                "repeats": 1,
                "settings": [{"ac": "full", "compile": False}],
            },
            min_s=40,
        )
        ok = [r for r in recs if r["status"] == "ok"]
        for r in recs:
            extra = (
                f"{r['peak_gb']:.1f} GB, {r['step_s']:.1f} s"
                if r["status"] == "ok"
                else r["status"]
            )
            rep.line(f"  {shape} {r['length']:>8} tokens: {extra}")
        if len(ok) >= 2:
            (l1, m1), (l2, m2) = [(r["length"], r["peak_gb"]) for r in ok[:2]]
            per_token = (m2 - m1) / (l2 - l1)
            if per_token <= 0:
                rep.line(f"  {shape}: no memory growth measured between {l1} and {l2} tokens")
                continue
            longest = l2 + (capacity_gb * 0.97 - m2) / per_token
            rep.line(
                f"  {shape}: {per_token * 2**30 / 1024:.1f} KiB per token -> longest context "
                f"about {longest / 1024:.0f}K tokens (extrapolated from {l1} and {l2}, 97% of memory)"
            )


def section_train(run: Runner, plan: dict[str, Any], ckpt: Path, tmp: Path) -> None:
    rep = run.report
    ctx, steps, warm = plan["train_context"], plan["train_steps"], plan["train_warmup"]
    rep.line(
        f"== 5. longtune train end to end at {ctx} tokens (defaults; {steps} steps, first {warm} warm-up)"
    )
    if run.left() < 60:
        rep.line("  skipped: time budget")
        return
    data = make_chat_data(tmp / "chat.jsonl", ctx, steps + 2)
    run_dir = tmp / "train_run"
    cmd = [sys.executable, "-m", "longtune", "train", "--model", str(ckpt), "--data", str(data)]
    cmd += ["--context-length", str(ctx), "--duration", f"{steps}st", "--output-dir", str(run_dir)]
    cmd += [f"--data.cache_dir={tmp / 'cache'}"]
    log = (tmp / "train.log").open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=run.env, start_new_session=True
    )
    metrics = run_dir / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    while proc.poll() is None and run.left() > 0:
        time.sleep(1)
        if metrics.exists():
            records = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
            if len(records) >= steps:
                break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the export of the final checkpoint is not timed
        proc.wait()
    elif proc.returncode != 0:
        tail = (tmp / "train.log").read_text().strip().splitlines()[-1:] or ["?"]
        rep.line(f"  longtune train failed: {tail[0][:300]}")
    for r in records:
        run.report.record({"task": "train", **r})
    timed = records[warm:]
    if not timed:
        rep.line(f"  only {len(records)} steps logged before the budget ran out")
        return
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    sup = statistics.median(r["supervised_tokens"] for r in timed)
    rep.line(
        f"  {tps:,.0f} tokens/s (median of steps {warm + 1}-{len(records)}), peak "
        f"{max(r['peak_memory_gb'] for r in timed):.1f} GB, {sup:.0f} supervised tokens per step, "
        f"first step {records[0]['elapsed_s']:.0f} s"
    )


def section_plan(run: Runner, plan: dict[str, Any]) -> None:
    rep = run.report
    rep.line(
        "== 6. planner: predicted vs measured peak of one training step (FSDP2 on one rank, "
        "fused AdamW, no compile; GPU: bf16, max_memory_allocated; CPU: float32, tracked)"
    )

    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    for shape, context, ac, tiled in plan["plan_rows"]:
        spec = {"shape": shape, "context": context, "ac": ac, "tiled": tiled}
        for r in run.worker("plan", spec, min_s=30):
            head = f"  {shape} {context:>7} ac={ac:<9} tiled={'on' if tiled else 'off'}"
            pred = (
                f"predicted {size(r['predicted_allocated'])} allocated, "
                f"{size(r['predicted_device'])} device ({'fits' if r['fits'] else 'does not fit'})"
            )  # fmt: skip
            if r["status"] == "ok":
                got = r["measured_allocated"]
                rep.line(
                    f"{head}: {pred}; measured {size(got)} "
                    f"(ratio {r['predicted_allocated'] / got:.3f})"
                )
            else:
                rep.line(f"{head}: {pred}; measured {r['status']}: {r.get('error', '')[:120]}")
    shape, ac, tiled, limit = plan["plan_longest"]
    spec = {"shape": shape, "ac": ac, "tiled": tiled, "offload": True, "longest": limit}
    for r in run.worker("plan", spec, min_s=30):
        rep.line(
            f"  {shape} longest context on one card (ac={ac}, tiled MLP {'on' if tiled else 'off'}, "
            "activation offload, "
            f"{r['device_preset']}): {r['length']} tokens (predicted, "
            f"{size(r['predicted_device'])}; planned in {r['plan_s']:.0f} s)"
        )


def section_offload(run: Runner, plan: dict[str, Any]) -> None:
    rep = run.report
    rep.line(
        "== 7. activation offload (model.offload_activations): one fwd+bwd step with full AC, "
        "without and with the block inputs in pinned host memory (no compile; same weights)"
    )
    for shape, lengths in plan["offload"].items():
        settings = [
            {"ac": "full", "compile": False, "fallback": False},
            {"ac": "full", "compile": False, "fallback": False, "offload": True},
        ]
        spec = {"impl": "longtune", "shape": shape, "lengths": lengths, "warmup": 1,
                "repeats": 2, "settings": settings, "check": True}  # fmt: skip
        recs = run.worker("steps", spec, min_s=40)
        for length in lengths:
            plain, off = (
                next((r for r in recs if r["length"] == length and r.get("offload", False) == o), None)
                for o in (False, True)
            )  # fmt: skip
            if not plain or not off or "ok" not in (plain["status"], off["status"]):
                rep.line(f"  {shape} {length}: not measured")
                continue
            line = f"  {shape} {length:>8} tokens:"
            for name, r in (("plain", plain), ("offload", off)):
                line += (
                    f" {name} {r['peak_gb']:.1f} GB {r['step_s']:.2f} s;"
                    if r["status"] == "ok"
                    else f" {name} {r['status']};"
                )
            if plain["status"] == off["status"] == "ok":
                rel = abs(off["grad_norm"] - plain["grad_norm"]) / plain["grad_norm"]
                line += (
                    f" memory x{off['peak_gb'] / plain['peak_gb']:.2f}, time "
                    f"x{off['step_s'] / plain['step_s']:.2f}; loss equal: "
                    f"{off['loss'] == plain['loss']}, grad norm rel diff {rel:.1e}"
                )
            rep.line(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, seconds (CI)")
    p.add_argument("--results", default=None, help="results file (default $OUT/gpu_bench.txt)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default 330 / 180)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        task, spec = a._worker
        workers = {"steps": worker_steps, "attention": worker_attention, "plan": worker_plan}
        workers[task](json.loads(spec))
        return

    import torch

    on_gpu = torch.cuda.is_available() and not a.quick
    if not on_gpu and not a.quick:
        sys.exit("gpu_bench: no CUDA GPU here; use --quick for the CPU smoke run")
    plan = PLANS["gpu" if on_gpu else "quick"]
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path.cwd()
    report = Report(Path(a.results) if a.results else out_dir / "gpu_bench.txt")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if on_gpu:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.monotonic()
    run = Runner(a.budget_s or (330 if on_gpu else 180), report, env)
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        device_name, capacity = props.name, props.total_memory / 2**30
    else:
        device_name, capacity = f"CPU ({platform.processor() or platform.machine()})", 1.0
    import transformers

    fa3 = importlib.util.find_spec("flash_attn_interface") is not None
    report.line(
        f"gpu_bench ({'quick, CPU' if a.quick else 'GPU'}): {device_name}, {capacity:.0f} GB; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, flash_attn_interface (FA3) "
        f"{'installed' if fa3 else 'not installed'}; {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp_name:
        tmp = Path(tmp_name)
        ckpt = None
        if {"table", "mfu", "train"} & set(a.only):
            t0 = time.monotonic()
            ckpt = make_checkpoint(plan["shape"], tmp / "model", "cuda" if on_gpu else "cpu")
            report.line(
                f"random-weight {plan['shape']} checkpoint written in {time.monotonic() - t0:.0f} s"
            )
        rows = section_table(run, plan, ckpt) if {"table", "mfu"} & set(a.only) else []
        if "mfu" in a.only:
            section_mfu(report, plan, rows, device_name)
        if "attention" in a.only:
            section_attention(run, plan, on_gpu)
        if "longest" in a.only:
            section_longest(run, plan, capacity)
        if "train" in a.only:
            section_train(run, plan, ckpt, tmp)
        if "plan" in a.only:
            section_plan(run, plan)
        if "offload" in a.only:
            section_offload(run, plan)
    report.line(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
