"""Counting prompt tokens at submit time, so an over-long request is refused with a clear error
instead of failing later in a worker.

The API reads the model directory's ``tokenizer.json`` with the ``tokenizers`` library (the Rust
tokenizer transformers itself wraps; no model library is imported) and counts exactly what the
worker will feed the model. Counting is skipped when a cheap bound proves the prompt fits: a
Llama BPE token covers at least one byte, so a text segment has at most ``bytes + 1`` tokens (the
``+ 1`` for the word-boundary marker prepended to it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.prompts import Segment


def token_upper_bound(segments: Sequence[Segment]) -> int:
    """At most this many tokens for these segments (special tokens count one each)."""
    return sum(len(s.encode("utf-8")) + 1 if isinstance(s, str) else 1 for s in segments)


class TokenCounter:
    """Exact prompt token counts for one model, loaded on first use."""

    def __init__(self, tokenizer_file: Path) -> None:
        self.tokenizer_file = tokenizer_file
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(self.tokenizer_file))
                tok.encode_special_tokens = True  # "<s>" in a prompt is text, as in the worker
                self._tokenizer = tok
            return self._tokenizer

    def count(self, segments: Sequence[Segment]) -> int:
        """Tokens the worker will feed the model for these segments."""
        texts = [s for s in segments if isinstance(s, str)]
        specials = len(segments) - len(texts)
        encoded = self._load().encode_batch(texts, add_special_tokens=False) if texts else []
        return specials + sum(len(e.ids) for e in encoded)


def counter_for(model_dir: Path) -> TokenCounter | None:
    """A counter for a model directory, or None when its tokenizer is not on this machine."""
    path = model_dir / "tokenizer.json"
    return TokenCounter(path) if path.is_file() else None
