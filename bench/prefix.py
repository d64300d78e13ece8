"""Shared prefixes computed once: the system against raw CTranslate2 on the same work.

256 prompts that share a 400-token prefix (an instruction or few-shot block in front of every
input) and differ in a 20-40-token tail, 32 new tokens each (``min_new_tokens = max_new_tokens``),
on the ``bench`` model (``bench/workload.py``), int8, this machine's cores:

- raw: CTranslate2 alone on the full prompts, no sharing: thread layouts x batch sizes searched,
  the best kept (what a user gets from CTranslate2 without thinking about prefixes);
- raw, static_prompt: CTranslate2 alone with the prefix as ``static_prompt`` (the ceiling);
- system: the real stack (gunicorn API, Redis, one calibrated worker, SQLite), the prompts as one
  job, from the submit to the last result stored. The worker finds the shared prefix itself
  (``worker.batcher.group_shared_prefixes``); nothing in the job says there is one.

Tokens/s of each row and the system's ratio to raw are printed; the issue's target is 1.5x.
Writes ``bench/results/prefix.json``.

    python -m bench.prefix [--prompts 256] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from bench.throughput import RESULTS, SAMPLING, Service, _cpu_name, _say
from bench.workload import Prompt, ensure_model

PREFIX_TOKENS, TAIL_TOKENS, NEW_TOKENS = 400, (20, 40), 32


def make_shared_prompts(model_dir: Path, n: int, seed: int = 11) -> list[Prompt]:
    """``n`` prompts: one 400-token prefix text, then a tail of 20-40 tokens each, tokenized as the
    worker tokenizes a raw prompt (BOS + the whole text)."""
    from tokenizers import Tokenizer

    from worker.builder import training_corpus

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    words = " ".join(training_corpus()).split()
    rng = random.Random(seed)

    def text_of(tokens: int) -> str:
        start = rng.randrange(len(words) - 4 * tokens)
        ids = tok.encode(" ".join(words[start:start + 2 * tokens]), add_special_tokens=False).ids[:tokens]
        return tok.decode(ids)

    prefix = "Instructions: " + text_of(PREFIX_TOKENS - 4) + "\nInput:"
    prompts = []
    for _ in range(n):
        text = prefix + " " + text_of(rng.randint(*TAIL_TOKENS))
        prompts.append(Prompt(text=text, ids=[bos, *tok.encode(text, add_special_tokens=False).ids]))
    return prompts


def _generate(gen: Any, vocabulary: list[str], batches: list[list[Prompt]], static: list[str] | None) -> tuple[int, float]:
    started = time.perf_counter()
    shared = len(static) if static else 0
    pending = [gen.generate_batch([[vocabulary[i] for i in p.ids[shared:]] for p in b], asynchronous=True,
                                  static_prompt=static, cache_static_prompt=False,
                                  max_length=NEW_TOKENS, min_length=NEW_TOKENS, include_prompt_in_result=False,
                                  sampling_topk=SAMPLING["top_k"], sampling_topp=SAMPLING["top_p"],
                                  sampling_temperature=SAMPLING["temperature"])
               for b in batches]
    tokens = sum(len(r.result().sequences_ids[0]) for rs in pending for r in rs)
    return tokens, time.perf_counter() - started


def raw_rows(model_dir: Path, prompts: list[Prompt], *, quick: bool) -> dict[str, Any]:
    import ctranslate2

    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    cores = len(os.sched_getaffinity(0))
    layouts = [(cores, 1), (1, cores)] if cores > 1 else [(1, 1)]
    sizes = (8,) if quick else (8, 16)
    shared = 0
    while all(len(p.ids) > shared + 1 and p.ids[shared] == prompts[0].ids[shared] for p in prompts):
        shared += 1
    static = [vocabulary[i] for i in prompts[0].ids[:shared]]
    trials: dict[str, list[dict[str, Any]]] = {"raw": [], "raw_static": []}
    for inter, intra in layouts:
        gen = ctranslate2.Generator(str(model_dir), compute_type="int8", inter_threads=inter, intra_threads=intra)
        _generate(gen, vocabulary, [prompts[:2]], None)  # warm-up
        for size in sizes:
            batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
            for row, prefix in (("raw", None), ("raw_static", static)):
                n, s = _generate(gen, vocabulary, batches, prefix)
                trials[row].append({"inter_threads": inter, "intra_threads": intra, "batch_size": size,
                                    "tps": n / s, "seconds": s, "tokens": n})
                _say(f"  {row} inter={inter} intra={intra} batch={size}: {n / s:.0f} tok/s ({s:.1f}s)")
        del gen
    return {"shared_tokens": shared, **{row: {"best": max(t, key=lambda x: x["tps"]), "trials": t}
                                        for row, t in trials.items()}}


def system_row(model_dir: Path, prompts: list[Prompt]) -> dict[str, Any]:
    service = Service(model_dir, "bench", calibrate="force")
    try:
        return service.run(prompts, NEW_TOKENS, single=False)
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="one batch size per layout (a smoke run)")
    args = parser.parse_args(argv)
    model_dir, _ = ensure_model("bench")
    prompts = make_shared_prompts(model_dir, args.prompts)
    lengths = [len(p.ids) for p in prompts]
    _say(f"== {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {NEW_TOKENS} new tokens each")
    raw = raw_rows(model_dir, prompts, quick=args.quick)
    system = system_row(model_dir, prompts)
    report = {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "prompts": len(prompts),
              "prompt_tokens": [min(lengths), max(lengths)], "shared_tokens": raw["shared_tokens"],
              "new_tokens": NEW_TOKENS, "raw": raw["raw"], "raw_static": raw["raw_static"], "system": system}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefix.json").write_text(json.dumps(report, indent=2, default=str))
    base = raw["raw"]["best"]["tps"]
    print(f"\nshared prefixes on {report['cpu']} ({report['cores']} cores): {len(prompts)} prompts, "
          f"{raw['shared_tokens']} shared tokens, tails to {max(lengths)} tokens, {NEW_TOKENS} new tokens")
    print(f"{'row':<34}{'tokens/s':>10}{'x raw':>8}")
    for name, tps in (("raw CTranslate2, no sharing (best)", base),
                      ("raw CTranslate2, static_prompt (best)", raw["raw_static"]["best"]["tps"]),
                      ("system, one job (finds the prefix)", system["tps"])):
        print(f"{name:<34}{tps:>10.0f}{tps / base:>8.2f}")
    print(f"system batches: {system['batch_log'][-3:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
