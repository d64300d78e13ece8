"""The ``transformers`` row: Hugging Face ``generate`` in PyTorch on the same prompts.

Run in its own process (``python -m bench.transformers_row``) so PyTorch's thread pool does not
share a process with CTranslate2's. Picks float32 or bfloat16, whichever is faster here, then the
best batch size; batch 1 is measured on a subset (it is slow) and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.workload import Prompt, load_prompts


def run(model, prompts: list[Prompt], batch_size: int, new_tokens: int, sampling: dict) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """Generate for ``prompts`` in length-sorted batches, left-padded; (tokens, seconds)."""
    import torch

    ordered = sorted(prompts, key=lambda p: len(p.ids)) if batch_size > 1 else prompts
    generated = 0
    started = time.perf_counter()
    for i in range(0, len(ordered), batch_size):
        batch = [p.ids for p in ordered[i : i + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=True, pad_token_id=0, **sampling)
        generated += (out.shape[1] - width) * len(batch)
    return generated, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--sampling", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch-sizes", default="16,32,64")
    args = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompts = load_prompts(args.prompts)
    sampling = json.loads(args.sampling)
    trials = []
    models = {}
    for dtype in ("float32", "bfloat16"):
        models[dtype] = LlamaForCausalLM.from_pretrained(str(args.checkpoint), dtype=getattr(torch, dtype)).eval()
        run(models[dtype], prompts[:2], 2, 4, sampling)  # warm-up
        n, s = run(models[dtype], prompts[:16], 16, args.new_tokens, sampling)
        trials.append({"dtype": dtype, "batch_size": 16, "prompts": 16, "tps": n / s})
    dtype = max(trials, key=lambda t: t["tps"])["dtype"]
    model = models[dtype]
    best = None
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        n, s = run(model, prompts, bs, args.new_tokens, sampling)
        trial = {"dtype": dtype, "batch_size": bs, "prompts": len(prompts), "tps": n / s, "seconds": s}
        trials.append(trial)
        if best is None or trial["tps"] > best["tps"]:
            best = trial
    n, s = run(model, prompts[:8], 1, args.new_tokens, sampling)
    batch1 = {"dtype": dtype, "batch_size": 1, "prompts": 8, "tps": n / s}
    args.out.write_text(json.dumps({"best": best, "batch1": batch1, "trials": trials,
                                    "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
