"""The benchmark's model and prompts, shared by every row so that all rows do the same work."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from core.settings import PROJECT_ROOT

BENCH_DIR = PROJECT_ROOT / "var" / "bench"


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]  # with BOS: exactly what the worker feeds the model for this raw prompt


def ensure_model(preset: str, *, force: bool = False) -> tuple[Path, Path]:
    """(CTranslate2 model dir, transformers checkpoint dir), built once and kept under var/bench."""
    from worker.builder import build_model

    model_dir = BENCH_DIR / f"{preset}-ct2"
    checkpoint = BENCH_DIR / f"{preset}-hf"
    if force or not (model_dir / "model.bin").is_file() or not (checkpoint / "config.json").is_file():
        build_model(model_dir, preset=preset, seed=0, keep_checkpoint=checkpoint, force=True)
    return model_dir, checkpoint


def make_prompts(model_dir: Path, n: int, min_len: int, max_len: int, seed: int = 7) -> list[Prompt]:
    """``n`` prompts of English-like text, token lengths uniform in [min_len, max_len].

    Tokenized the way the worker tokenizes a raw prompt (BOS + text, special tokens split), so the
    raw, sequential and transformers rows feed exactly the ids the system row's worker will.
    """
    from transformers import AutoTokenizer

    from worker.builder import training_corpus

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    words = " ".join(training_corpus()).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target = rng.randint(min_len, max_len) - 1  # BOS is one of the tokens
        start = rng.randrange(len(words) - 4 * max_len)
        chunk = words[start : start + 2 * target]
        ids = tok(" ".join(chunk), add_special_tokens=False, split_special_tokens=True)["input_ids"][:target]
        text = tok.decode(ids)
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        prompts.append(Prompt(text=text, ids=[tok.bos_token_id, *ids]))
    return prompts


def save_prompts(prompts: list[Prompt], path: Path) -> None:
    path.write_text(json.dumps([{"text": p.text, "ids": p.ids} for p in prompts]))


def load_prompts(path: Path) -> list[Prompt]:
    return [Prompt(**p) for p in json.loads(path.read_text())]
