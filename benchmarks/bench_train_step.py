"""One training step (forward + backward) of longtune's native model vs transformers' Llama.

Side by side in one run, same weights, same tokens: time per step (median) and peak memory,
with ratios. Each measurement runs in its own subprocess so peak memory is that of one
configuration (CPU: peak RSS of the process; GPU: ``torch.cuda.max_memory_allocated``).

    .venv/bin/python benchmarks/bench_train_step.py                 # SmolLM2-135M, CPU or GPU
    .venv/bin/python benchmarks/bench_train_step.py --lengths 1024 4096 --model /models/llama

Columns: median step time; peak memory (process); "saved": bytes autograd keeps for the backward
pass (activations), each storage counted once; ratios are longtune / transformers for memory and
transformers / longtune for time (speedup).

transformers computes full ``[seq, vocab]`` logits and their loss; longtune uses the chunked
loss. Both use SDPA attention; packed sequences (3 documents per sequence) use document-masked
attention in longtune and are run as one causal sequence in transformers (it has no packed
path without flash-attn), which favours transformers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(impl: str, model_dir: str, length: int, repeats: int, ac: str) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, length), device=device)
    cu = torch.tensor([0, length // 3, 2 * length // 3, length], dtype=torch.int32, device=device)
    if impl == "transformers":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        model.to(device).train()
        if ac != "none":
            model.gradient_checkpointing_enable()

        def step():
            return model(input_ids=ids, labels=ids).loss
    else:
        import longtune
        from longtune.parallel.parallelize import apply_activation_checkpointing

        model = longtune.load_model(model_dir, dtype=dtype, device=device).train()
        apply_activation_checkpointing(model, ac)
        labels = torch.roll(ids, -1, 1)

        def step():
            return model(ids, cu_seqlens=cu, max_seqlen=length, labels=labels)

    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step().backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Bytes autograd keeps for the backward pass (activations, saved logits, ...), each storage
    # counted once: the memory that grows with sequence length, independent of the allocator.
    # (Not measurable under activation checkpointing: checkpointed regions keep their tensors
    # through their own hooks, so the column is left out then.)
    storages: dict[int, int] = {}

    def pack(t):  # noqa: ANN001, ANN202
        if t.device.type != "meta":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    saved = sum(storages.values()) / 2**30
    del loss
    return {
        "time_s": statistics.median(times),
        "peak_gb": peak,
        "saved_gb": saved,
        "device": device,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF Llama folder (default: SmolLM2-135M)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        impl, model_dir, length = a._one
        print(json.dumps(measure(impl, model_dir, int(length), a.repeats, a.ac)))
        return
    if a.model is None:
        from longtune.assets import smollm2_checkpoint

        a.model = str(smollm2_checkpoint())
    print(f"model {a.model}, activation checkpointing {a.ac}, median of {a.repeats} steps")
    print(
        f"{'tokens':>7} | {'transformers s':>14} {'peak GB':>7} {'saved GB':>8} | "
        f"{'longtune s':>10} {'peak GB':>7} {'saved GB':>8} | {'speedup':>7} {'peak':>5} {'saved':>5}"
    )
    for length in a.lengths:
        res = {}
        for impl in ("transformers", "longtune"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_one",
                    impl,
                    a.model,
                    str(length),
                    "--repeats",
                    str(a.repeats),
                    "--ac",
                    a.ac,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        hf, lt = res["transformers"], res["longtune"]
        if a.ac != "none":
            hf["saved_gb"] = lt["saved_gb"] = float("nan")
        print(
            f"{length:>7} | {hf['time_s']:>14.2f} {hf['peak_gb']:>7.2f} {hf['saved_gb']:>8.3f} | "
            f"{lt['time_s']:>10.2f} {lt['peak_gb']:>7.2f} {lt['saved_gb']:>8.3f} | "
            f"{hf['time_s'] / lt['time_s']:>6.2f}x {lt['peak_gb'] / hf['peak_gb']:>5.2f} "
            f"{lt['saved_gb'] / hf['saved_gb']:>5.2f}",
            flush=True,
        )
    print(f"device: {res['longtune']['device']}")


if __name__ == "__main__":
    main()
