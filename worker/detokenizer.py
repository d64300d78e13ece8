"""Incremental detokenization: the text of a growing continuation at O(1) cost per token.

The step callback needs the text generated so far at every token (stop strings, streaming).
Decoding the whole continuation at every token is quadratic in its length and runs under the GIL,
which serialises the CTranslate2 replicas. ``StreamDecoder`` decodes only the tokens since the
last cut, in the context of the few tokens before them, and gives exactly the text a full decode
of the continuation gives (``ModelRunner.decode_continuation``):

- Llama's decoder (Metaspace ``▁`` -> space, byte fallback, fuse, strip one leading space) is
  concatenative at every ordinary token: decoding ``a + b`` equals decoding ``a``, then ``b`` in the
  context of ``a``'s last tokens. Byte-fallback tokens are not: a run of them decodes as a whole
  (one invalid byte turns the run's valid ones into U+FFFD too), and special tokens are dropped
  before the byte runs are joined. So text is cut only after an ordinary token; a byte run (with
  any special tokens inside it) waits for the ordinary token after it, or for ``finish``.
- The leading space of the first generated token is kept by decoding it after the prompt's last
  tokens, as the full decode does; when the prompt ends inside a character the output completes,
  both fall back to decoding the output alone.

``tokenizers.decoders.DecodeStream`` does a similar job, but it holds back any text ending in
U+FFFD until more tokens come, so a run that never becomes valid UTF-8 would never be emitted;
this class has one rule (cut after ordinary tokens) that provably matches the full decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Tokens of context decoded in front of each new piece: enough for the leading-space rule.
CONTEXT = 4

Decode = Callable[[list[int]], str]


class StreamDecoder:
    """Text of one sequence's generated ids, appended one id at a time."""

    __slots__ = ("_decode", "_special", "_byte", "_ids", "_held", "_context", "_started", "text", "_whole",
                 "_prompt")

    def __init__(self, decode: Decode, prompt_ids: Sequence[int], *, byte_ids: frozenset[int],
                 special_ids: frozenset[int]) -> None:
        """``decode(ids)`` decodes skipping special tokens (the backend tokenizer's ``decode``)."""
        self._decode = decode
        self._special, self._byte = special_ids, byte_ids
        self._ids: list[int] = []  # every generated id
        self._held: list[int] = []  # ids since the last cut
        # What is decoded in front of the next piece: the last few non-special ids of the
        # prompt's tail and the output so far (specials decode to nothing, so dropping them
        # changes no text; the last one kept is always an ordinary token or the prompt's end).
        self._context: list[int] = [i for i in prompt_ids[-CONTEXT:] if i not in special_ids]
        self._started = False
        self.text = ""  # the final text up to the last cut
        # Whole mode: decode everything at each cut (quadratic, always right), for decoders this
        # class's rule does not hold for (``incremental_ok``) or after an unexpected mismatch.
        self._whole = False
        self._prompt = [i for i in prompt_ids[-CONTEXT:] if i not in special_ids]

    @property
    def ids(self) -> list[int]:
        """Every id pushed so far."""
        return self._ids

    def push(self, token_id: int) -> str:
        """Take one generated id; returns the text that became final with it ('' if none)."""
        self._ids.append(token_id)
        self._held.append(token_id)
        if token_id in self._byte or token_id in self._special:
            return ""  # inside a byte run (or possibly one): wait for an ordinary token
        return self._cut()

    def whole(self) -> StreamDecoder:
        """Decode everything at each cut from now on."""
        self._whole = True
        return self

    def _cut_whole(self, final: bool = False) -> str:
        tail = self._prompt
        if tail:
            head = self._decode(tail)
            full = self._decode(tail + self._ids)
            text = full[len(head):] if full.startswith(head) else self._decode(self._ids)
        else:
            text = self._decode(self._ids)
        # A byte-level decoder (Llama 3's, Qwen's) writes a character whose UTF-8 bytes are not
        # all generated yet as U+FFFD, and the right character once they are: a trailing U+FFFD
        # is not final until more text follows it, or the sequence ends.
        settled = text if final else text.rstrip("\ufffd")
        self._held = [] if settled == text else self._held
        if not settled.startswith(self.text):  # not seen; the full decode stays the authority
            return ""
        piece, self.text = settled[len(self.text):], settled
        return piece

    def finish(self) -> str:
        """The text still held back (a trailing byte run); then ``text`` is the whole text."""
        if self._whole:
            return self._cut_whole(final=True) if self._held else ""
        return self._cut() if self._held else ""

    def _cut(self) -> str:
        if self._whole:
            return self._cut_whole()
        held, context = self._held, self._context
        if context:
            head = self._decode(context)
            full = self._decode(context + held)
            if full.startswith(head):
                piece = full[len(head):]
            elif not self._started:
                # The prompt ended inside a character the output completes: the full decode
                # then decodes the output alone, and so does every later piece.
                context = []
                piece = self._decode(held)
            else:  # not seen with Llama's decoder; stay correct rather than fast from here on
                self._whole = True
                piece = ""
        else:
            piece = self._decode(held)
        self._started = True
        self.text += piece
        self._context = (context + [i for i in held if i not in self._special])[-CONTEXT:]
        self._held = []
        return piece


def _decoder_kinds(tokenizer_json: dict[str, Any]) -> set[str]:
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {str(d.get("type")) for d in parts if isinstance(d, dict)}


def strips_first_space(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the decoder drops the space a text's first token carries (Llama 2's ``Strip``, a
    Metaspace decoder that prepends): Gemma's and the byte-level ones keep it."""
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "Strip" and part.get("start", 0) > 0:
            return True
        if part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") != "never" \
                and part.get("add_prefix_space", True):
            return True
    return False


def byte_level(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a tokenizer decodes GPT-2's byte-level alphabet (Llama 3, Qwen)."""
    return "ByteLevel" in _decoder_kinds(tokenizer_json)


def incremental_ok(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a tokenizer's decoder is the kind ``StreamDecoder`` cuts correctly: Llama's
    (``▁`` as space, byte fallback, fuse, strip); not a byte-level one (GPT-2, Llama 3)."""
    kinds = _decoder_kinds(tokenizer_json)
    return "ByteFallback" in kinds and "ByteLevel" not in kinds and kinds <= {
        "Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}


def first_stop(text: str, stops: Sequence[str], searched: int = 0) -> int:
    """Index of the earliest stop string in ``text``, or -1; the first ``searched`` characters are
    known to hold none (a match must end after them), so only the rest is scanned."""
    if not stops:
        return -1
    longest = max(len(s) for s in stops)
    start = max(0, searched - longest + 1)
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1
