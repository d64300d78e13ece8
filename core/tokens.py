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
from core.templates import ChatTemplateError, Rendered, control_tokens


def token_upper_bound(segments: Sequence[Segment]) -> int:
    """At most this many tokens for these segments (special tokens count one each; a rendered
    chat's control tokens are at least one byte each, and each piece it is cut into at a typed
    span may start with a word-start marker of its own)."""
    return sum(1 if isinstance(s, Special) else len(s.encode("utf-8")) + 1 if isinstance(s, str)
               else len(s.text.encode("utf-8")) + 1 + 2 * len(s.typed) for s in segments)


class Backends:
    """A model's ``tokenizer.json`` loaded three ways: ``text`` keeps special-token strings as text
    (a user's prompt), ``parse`` turns added tokens into their ids (a rendered chat template), and
    ``plain`` knows no added tokens at all (a control token a user typed into a chat)."""

    def __init__(self, tokenizer_file: Path) -> None:
        import json

        from tokenizers import Tokenizer

        self.text = Tokenizer.from_file(str(tokenizer_file))
        # What transformers' split_special_tokens does: "<s>" typed in a prompt is text, never BOS.
        self.text.encode_special_tokens = True
        self.parse = Tokenizer.from_file(str(tokenizer_file))
        spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
        spec["added_tokens"] = []  # encode_special_tokens still matches added tokens not marked special
        self.plain = Tokenizer.from_str(json.dumps(spec))
        added = self.text.get_added_tokens_decoder()
        self.added = tuple((t.content, bool(t.special)) for t in added.values())
        self.added_ids = {t.content: int(i) for i, t in added.items()}
        self.special_ids = frozenset(int(i) for i, t in added.items() if t.special)
        self._newline = {"parse": self.parse.encode("\n", add_special_tokens=False).ids,
                         "plain": self.plain.encode("\n", add_special_tokens=False).ids}

    def control(self, chat_template: str | None) -> tuple[str, ...]:
        """The control tokens of this tokenizer under ``chat_template`` (``core.templates``)."""
        return control_tokens(self.added, chat_template)

    def _piece(self, which: str, text: str) -> list[int]:
        """Ids of ``text`` in the middle of a chat: encoded after a newline, so a SentencePiece
        tokenizer adds no word-start marker, and the newline taken off again (transformers'
        ``sanitize_control_tokens`` does the same)."""
        backend = self.parse if which == "parse" else self.plain
        newline = self._newline[which]
        ids = backend.encode("\n" + text, add_special_tokens=False).ids
        if newline and ids[:len(newline)] == newline:
            return list(ids[len(newline):])
        return list(backend.encode(text, add_special_tokens=False).ids)

    def encode_rendered(self, chats: Sequence[Rendered]) -> list[list[int]]:
        """Ids of rendered chats. A chat no user typed a control token into is tokenized whole,
        with added tokens parsed: the very ids ``apply_chat_template(..., tokenize=True)`` gives.
        Otherwise it is cut at each typed span, as ``apply_chat_template(...,
        sanitize_control_tokens=True)`` cuts it: the template's pieces parsed, each typed span as
        plain text that cannot hold an added token (refused, as transformers refuses it, where the
        vocabulary spells the token from its text)."""
        whole = [c for c in chats if not c.typed]
        parsed = iter(self.parse.encode_batch([c.text for c in whole], add_special_tokens=False)) if whole else iter(())
        out = []
        for chat in chats:
            if not chat.typed:
                out.append(list(next(parsed).ids))
                continue
            ids: list[int] = []
            at = 0
            for start, end in chat.typed:
                if start > at:
                    ids.extend(self._piece("parse", chat.text[at:start]) if at else
                               self.parse.encode(chat.text[:start], add_special_tokens=False).ids)
                typed = chat.text[start:end]
                as_text = self._piece("plain", typed)
                if self.added_ids.get(typed) in as_text:
                    raise ChatTemplateError(f"{typed!r} cannot be kept as text: this vocabulary spells it as the "
                                          "token itself; remove it from the message")
                ids.extend(as_text)
                at = end
            if at < len(chat.text):
                ids.extend(self._piece("parse", chat.text[at:]))
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
