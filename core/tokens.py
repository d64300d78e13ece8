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

from core.prompts import Segment, Special
from core.templates import Rendered, control_tokens


def token_upper_bound(segments: Sequence[Segment]) -> int:
    """At most this many tokens for these segments (special tokens count one each; a rendered
    chat's control tokens are at least one byte each)."""
    return sum(1 if isinstance(s, Special) else len((s.text if isinstance(s, Rendered) else s).encode("utf-8")) + 1
               for s in segments)


class Backends:
    """A model's ``tokenizer.json`` loaded twice: ``text`` keeps special-token strings as text (a
    user's prompt), ``parse`` turns added tokens into their ids (a rendered chat template)."""

    def __init__(self, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer

        self.text = Tokenizer.from_file(str(tokenizer_file))
        # What transformers' split_special_tokens does: "<s>" typed in a prompt is text, never BOS.
        self.text.encode_special_tokens = True
        self.parse = Tokenizer.from_file(str(tokenizer_file))
        added = self.text.get_added_tokens_decoder()
        self.added = tuple((t.content, bool(t.special)) for t in added.values())
        self.special_ids = frozenset(int(i) for i, t in added.items() if t.special)
        self._newline = self.text.encode("\n", add_special_tokens=False).ids

    def control(self, chat_template: str | None) -> tuple[str, ...]:
        """The control tokens of this tokenizer under ``chat_template`` (``core.templates``)."""
        return control_tokens(self.added, chat_template)

    def as_text(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text in the middle of a chat: encoded after a newline, so a
        SentencePiece tokenizer adds no word-start marker, and the newline taken off again."""
        ids = self.text.encode("\n" + text, add_special_tokens=False).ids
        n = len(self._newline)
        if n and ids[:n] == self._newline:
            return list(ids[n:])
        return list(self.text.encode(text, add_special_tokens=False).ids)

    def encode_rendered(self, chats: Sequence[Rendered]) -> list[list[int]]:
        """Ids of rendered chats, as ``apply_chat_template(..., tokenize=True)`` gives them, except
        that each span a user typed is text: the ids the parser made of it are replaced by the
        span's text ids."""
        out = []
        for chat, enc in zip(chats, self.parse.encode_batch([c.text for c in chats], add_special_tokens=False),
                             strict=True):
            if not chat.typed:
                out.append(list(enc.ids))
                continue
            ids: list[int] = []
            spans = iter(chat.typed)
            span = next(spans, None)
            for token, (start, _) in zip(enc.ids, enc.offsets, strict=True):
                while span is not None and start >= span[1]:
                    span = next(spans, None)
                if span is None or start < span[0]:
                    ids.append(token)
                elif start == span[0]:  # the typed token: its text instead
                    ids.extend(self.as_text(chat.text[span[0]:span[1]]))
                # else: a further piece of the same span, already written as text
            out.append(ids)
        return out


class TokenCounter:
    """Exact prompt token counts for one model, loaded on first use."""

    def __init__(self, tokenizer_file: Path) -> None:
        self.tokenizer_file = tokenizer_file
        self._backends: Backends | None = None
        self._lock = threading.Lock()

    def backends(self) -> Backends:
        with self._lock:
            if self._backends is None:
                self._backends = Backends(self.tokenizer_file)
            return self._backends

    def control(self, chat_template: str | None) -> tuple[str, ...]:
        """The model's control tokens, for ``core.prompts.render``."""
        return self.backends().control(chat_template) if chat_template else ()

    def count(self, segments: Sequence[Segment]) -> int:
        """Tokens the worker will feed the model for these segments."""
        backends = self.backends()
        texts = [s for s in segments if isinstance(s, str)]
        chats = [s for s in segments if isinstance(s, Rendered)]
        specials = len(segments) - len(texts) - len(chats)
        encoded = backends.text.encode_batch(texts, add_special_tokens=False) if texts else []
        return (specials + sum(len(e.ids) for e in encoded)
                + sum(len(ids) for ids in backends.encode_rendered(chats)))


def counter_for(model_dir: Path) -> TokenCounter | None:
    """A counter for a model directory, or None when its tokenizer is not on this machine."""
    path = model_dir / "tokenizer.json"
    return TokenCounter(path) if path.is_file() else None
