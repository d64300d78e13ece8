"""Log probabilities: one CTranslate2 forward pass over prompt and generated tokens.

What echo, ``logprobs``/``top_logprobs`` and scoring requests get back, computed after generation
(the step callback carries none in this CTranslate2, and skipping the callback is what keeps plain
batches fast) or instead of it (scoring), in row blocks within a bounded number of floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.runs import Outcome
from worker.tokenizing import Encoded, Prompts


@dataclass(frozen=True)
class Positions:
    """Log probabilities at the scored positions of one sequence: for each scored token, its log
    probability, whether it was the model's most likely token, and the ``top`` most likely (id,
    log probability) pairs when asked for."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, float]]] | None


def mean_logprob(choice: dict[str, Any]) -> float:
    """A sample's log probability per token; an empty one ranks last."""
    tokens = (choice["logprobs"] or {}).get("content") or []
    values = [t["logprob"] for t in tokens if t["logprob"] is not None]
    return sum(values) / len(values) if values else float("-inf")


def _token_text(token_id: int, raw: bytes, vocabulary: list[str]) -> str:
    """A token as text: its bytes decoded (part of a character shows U+FFFD, NUL too, which no
    database text holds), or a special token's own name."""
    if not raw and vocabulary[token_id].startswith("<"):
        return vocabulary[token_id]
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


# Floats of log probabilities the top-k search works on at once: its temporary arrays (indices,
# a partitioned copy) are about three times this in bytes x 4, whatever the sequence's length.
TOP_K_BLOCK_FLOATS = 4 * 1024 * 1024


def top_k(dist: Any, k: int) -> list[list[tuple[int, float]]]:
    """The ``k`` most likely (id, log probability) pairs at each position of ``dist`` (positions x
    vocabulary), most likely first (ties: the lower id first).

    Taken a block of positions at a time: over a whole long sequence at once, ``argpartition``'s
    int64 indices and the copy it sorts cost 12 bytes per position and token on top of the
    distribution itself (about 2 GiB for 4,096 positions of a 32,000-token vocabulary, 8 GiB for
    Llama 3's 128,256); a block keeps them to ``TOP_K_BLOCK_FLOATS``."""
    import numpy as np

    positions, vocab = dist.shape
    step = max(1, TOP_K_BLOCK_FLOATS // max(1, vocab))
    out: list[list[tuple[int, float]]] = []
    for first in range(0, positions, step):
        block = dist[first:first + step]
        best = np.argpartition(block, vocab - k, axis=1)[:, vocab - k:] if k < vocab else \
            np.broadcast_to(np.arange(vocab), block.shape).copy()
        values = np.take_along_axis(block, best, axis=1)
        rank = np.lexsort((best, -values), axis=1)  # by value, descending; then by id
        best, values = np.take_along_axis(best, rank, axis=1), np.take_along_axis(values, rank, axis=1)
        out.extend(list(zip(b.tolist(), v.tolist(), strict=True)) for b, v in zip(best, values, strict=True))
    return out


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


_BYTE_OF = _byte_level_table()


class LogProbs:
    """Log probabilities of a model's sequences, and the token entries results list them in."""

    def __init__(self, generator: Any, prompts: Prompts) -> None:
        self.generator = generator
        self.vocabulary, self.special_ids, self.byte_ids = prompts.vocabulary, prompts.special_ids, prompts.byte_ids
        # Byte-level vocabularies (Llama 3's, Qwen's) spell each byte as one character (GPT-2's
        # table); SentencePiece ones (Llama 2's) spell a space as U+2581, and their decoder drops
        # the text's first space, which a byte-level decoder keeps.
        self.byte_level = prompts.byte_level
        self.strips_first_space = prompts.strips_first_space

    # Floats of log probabilities one forward pass may return at once (batch x length x vocabulary):
    # 128 MiB. A single sequence longer than that still goes, alone.
    LOGPROB_FLOATS = 32 * 1024 * 1024

    def log_probs(self, sequences: Sequence[tuple[Sequence[int], int, int]]) -> list[Positions]:
        """Log probabilities of ``(ids, start, top)`` sequences at positions ``start`` to the end.

        One ``forward_batch`` pass over each sequence (batched, longest last, within
        ``LOGPROB_FLOATS``), with CTranslate2's own log-softmax over the whole vocabulary: the
        model's distribution, before any sampling setting. ``top`` alternatives are taken at each
        position when above 0.
        """
        import numpy as np

        out: list[Positions | None] = [None] * len(sequences)
        vocab = len(self.vocabulary)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
        chunk: list[int] = []

        def run() -> None:
            longest = max(len(sequences[i][0]) for i in chunk)
            rows = self._numpy(self.generator.forward_batch([list(sequences[i][0]) for i in chunk],
                                                            return_log_probs=True))
            for row, i in enumerate(chunk):
                ids, start, top = sequences[i]
                dist = rows[row, start - 1:len(ids) - 1]  # position p predicts token p + 1
                target = np.asarray(ids[start:], dtype=np.int64)
                chosen = dist[np.arange(len(target)), target]
                greedy = chosen >= dist.max(axis=1)
                tops = top_k(dist, min(top, vocab)) if top > 0 else None
                out[i] = Positions(logprobs=chosen.tolist(), greedy=greedy.tolist(), top=tops)
            del longest

        for i in order:
            longest = max([len(sequences[j][0]) for j in chunk] + [len(sequences[i][0])])
            if chunk and (len(chunk) + 1) * longest * vocab > self.LOGPROB_FLOATS:
                run()
                chunk = []
            chunk.append(i)
        if chunk:
            run()
        return [p for p in out if p is not None]

    @staticmethod
    def _numpy(view: Any) -> Any:
        """A CTranslate2 StorageView as a float32 numpy array on the host."""
        import ctranslate2
        import numpy as np

        if view.dtype != ctranslate2.DataType.float32:
            view = view.to(ctranslate2.DataType.float32)
        if view.device != "cpu":
            view = view.to_device(ctranslate2.Device.cpu)
        return np.asarray(view)

    def token_bytes(self, token_id: int) -> bytes:
        """What a token adds to the decoded text (Llama's SentencePiece pieces: U+2581 is a space,
        ``<0xNN>`` one byte); a special token adds nothing."""
        if token_id in self.special_ids:
            return b""
        piece = self.vocabulary[token_id]
        if self.byte_level:
            if all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
            return piece.encode("utf-8")  # an added token, kept as written
        if token_id in self.byte_ids:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_entries(self, ids: Sequence[int], positions: Positions | None, *,
                      first_of_text: bool = False) -> list[dict[str, Any]]:
        """Tokens as results list them: ``{token, bytes, logprob, top_logprobs}``. ``positions`` is
        None for tokens nothing precedes (their log probability is null). ``first_of_text``: these
        start the decoded text, whose first space the decoder drops."""
        out = []
        strip = first_of_text and self.strips_first_space
        for n, token_id in enumerate(ids):
            raw = self.token_bytes(token_id)
            stripping = strip and bool(raw)  # this token starts the text: its alternatives would too
            if stripping:
                raw, strip = raw.removeprefix(b" "), False
            entry: dict[str, Any] = {"token": _token_text(token_id, raw, self.vocabulary),
                                     "bytes": list(raw), "logprob": None}
            if positions is not None:
                entry["logprob"] = positions.logprobs[n]
                if positions.top is not None:
                    alternatives = []
                    for t, lp in positions.top[n]:
                        b = self.token_bytes(t)
                        b = b.removeprefix(b" ") if stripping else b
                        alternatives.append({"token": _token_text(t, b, self.vocabulary), "bytes": list(b),
                                             "logprob": lp})
                    entry["top_logprobs"] = alternatives
            out.append(entry)
        return out

    def prompt_entries(self, enc: Encoded, positions: Positions) -> list[dict[str, Any]]:
        """The prompt's tokens as an echo lists them, given ``positions`` from position 1 on."""
        entries = self.token_entries(enc.ids[1:], positions, first_of_text=True)
        if enc.shown == 0:  # no BOS in front (prompt_ids that start with it, Qwen): listed, unscored
            entries = self.token_entries(enc.ids[:1], None) + entries
        return entries

    def score(self, batch: Sequence[Encoded]) -> list[Outcome]:
        """Run requests that generate nothing: scoring requests, and echoes with 0 new tokens."""
        jobs: list[tuple[Sequence[int], int, int]] = []
        for enc in batch:
            top = enc.item.params.top_logprobs
            jobs.extend((ids, start, top) for ids, start in enc.scored or [(enc.ids, 1)])
        found = iter(self.log_probs(jobs))
        outcomes = []
        for enc in batch:
            item = enc.item
            if enc.scored is None:  # an echo: the prompt's tokens, nothing generated
                positions = next(found)
                detail = {"logprobs": {"prompt": self.prompt_entries(enc, positions), "content": []}}
                outcomes.append(Outcome(request_id=item.id, job_id=item.job_id, text="", finish_reason="length",
                                        prompt_tokens=enc.length, completion_tokens=0, detail=detail))
                continue
            scores = []
            for n, (ids, start) in enumerate(enc.scored):
                positions = next(found)
                total = float(sum(positions.logprobs))
                count = len(positions.logprobs)
                scores.append({
                    "continuation": item.continuations[n] if item.continuations else None,
                    "tokens": self.token_entries(ids[start:], positions, first_of_text=start == 1),
                    "logprob": total, "perplexity": math.exp(-total / count), "is_greedy": all(positions.greedy)})
            outcomes.append(Outcome(request_id=item.id, job_id=item.job_id, prompt_tokens=enc.length,
                                    completion_tokens=0, detail={"scores": scores}))
        return outcomes

    def details(self, batch: Sequence[Encoded], generated: list[list[int]]) -> list[dict[str, Any] | None]:
        """``{"logprobs": ...}`` for the requests that asked for log probabilities (and for the
        samples best_of ranks): one forward pass over prompt and generated tokens after generation
        (the step callback carries none in this CTranslate2, and skipping the callback is what
        keeps plain batches fast)."""
        wanted = [n for n, enc in enumerate(batch) if enc.item.params.logprobs or enc.item.params.echo
                  or enc.item.params.best_of > enc.item.params.n]
        details: list[dict[str, Any] | None] = [None] * len(batch)
        if not wanted:
            return details
        jobs = []
        for n in wanted:
            enc = batch[n]
            start = 1 if enc.item.params.echo else len(enc.ids)
            jobs.append((enc.ids + generated[n], start, enc.item.params.top_logprobs))
        for n, positions in zip(wanted, self.log_probs(jobs), strict=True):
            enc, ids = batch[n], generated[n]
            logprobs: dict[str, Any] = {}
            if enc.item.params.echo:
                cut = len(enc.ids) - 1
                head = Positions(positions.logprobs[:cut], positions.greedy[:cut],
                                 positions.top[:cut] if positions.top is not None else None)
                positions = Positions(positions.logprobs[cut:], positions.greedy[cut:],
                                      positions.top[cut:] if positions.top is not None else None)
                logprobs["prompt"] = self.prompt_entries(enc, head)
            logprobs["content"] = self.token_entries(ids, positions)
            details[n] = {"logprobs": logprobs}
        return details
