"""The model runner: a CTranslate2 ``Generator`` and the model's transformers tokenizer.

``encode`` turns a request into prompt tokens (Llama-2 chat template where it applies);
``generate`` runs one batch of encoded requests in a single ``generate_batch`` call. The batch
shares sampling settings (CTranslate2 takes them per call); each request's own
``max_new_tokens`` and ``stop`` strings are enforced inside the call by the step callback, which
stops that sequence only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.runs import Outcome, WorkItem, storable
from core.prompts import E_INST, Special, render
from core.registry import ModelSpec
from core.schemas import ChatMessage
from worker.detokenizer import CONTEXT, StreamDecoder, first_stop, incremental_ok

log = logging.getLogger("batchgen.runner")

# Prompt ids kept to decode the first generated token in context (see decode_continuation);
# the incremental decoder uses the same number, so both give the same text.
_TAIL = CONTEXT


@dataclass
class Encoded:
    """A request ready to run: prompt token ids and the strings CTranslate2 takes; for a scoring
    request, also the sequences to score, each with the position its scored tokens start at."""

    item: WorkItem
    ids: list[int]
    tokens: list[str]
    scored: list[tuple[list[int], int]] | None = None
    shown: int = 1  # where the prompt's tokens that results list (echo) start: after our BOS

    @property
    def length(self) -> int:
        if self.scored is not None:
            return sum(len(ids) for ids, _ in self.scored)
        return len(self.ids)


@dataclass(frozen=True)
class Positions:
    """Log probabilities at the scored positions of one sequence: for each scored token, its log
    probability, whether it was the model's most likely token, and the ``top`` most likely (id,
    log probability) pairs when asked for."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, float]]] | None


def _mean_logprob(choice: dict[str, Any]) -> float:
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


class RequestError(Exception):
    """A request that cannot run (too long, unencodable); it fails alone."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


DeltaSink = Callable[[str, str], None]


@dataclass
class _Sequence:
    """Per-sequence state inside one ``generate_batch`` call."""

    enc: Encoded
    runner: ModelRunner
    on_delta: DeltaSink | None = None
    ids: list[int] = field(default_factory=list)
    reason: str | None = None
    text: str | None = None
    sent: int = 0  # characters already streamed
    searched: int = 0  # characters of decoder.text known to hold no stop string
    decoder: StreamDecoder | None = None

    def __post_init__(self) -> None:
        params = self.enc.item.params
        # A stream with log probabilities or an echo is sent when its tokens (and their log
        # probabilities) are known, at the end (see ``webapi.openai.router``): nothing streams from here.
        self.streaming = (self.on_delta is not None and params.delivery == "stream"
                          and not (params.logprobs or params.echo))
        if params.stop or self.streaming:  # only then is the text needed while generating
            self.decoder = self.runner.stream_decoder(self.enc.ids)
        # Of the final text, hold back what a stop string could still claim.
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, token_id: int) -> bool:
        """Take one generated token; True stops this sequence."""
        if self.reason is not None:
            return True
        if token_id == self.runner.eos_id:
            self.reason = "stop"
            return True
        self.ids.append(token_id)
        params = self.enc.item.params
        if self.decoder is not None and self.decoder.push(token_id):
            text = self.decoder.text
            cut = first_stop(text, params.stop, self.searched)
            self.searched = len(text)
            if cut >= 0:
                self.reason, self.text = "stop", text[:cut]
                return True
            if self.streaming:
                self._stream(text)
        if len(self.ids) >= params.max_new_tokens:
            self.reason = "length"
            return True
        return False

    def _stream(self, text: str) -> None:
        # ``text`` is final up to its end (the decoder holds byte runs back until they end).
        end = len(text) - self.hold
        if end > self.sent:
            assert self.on_delta is not None
            self.on_delta(self.enc.item.id, text[self.sent:end])
            self.sent = end

    def finish(self, ids: list[int]) -> str:
        """The stored text, given the ids the result holds."""
        if self.text is not None:
            return self.text
        text = self.runner.decode_continuation(self.enc.ids, ids)
        stops = self.enc.item.params.stop
        if stops:  # a stop string may sit in a byte run the decoder was still holding back
            cut = first_stop(text, stops, self.searched)
            if cut >= 0:
                self.reason, text = "stop", text[:cut]
        return text


@dataclass(frozen=True)
class Tokenizer:
    """The model's tokenizer as the worker uses it: the Rust ``tokenizers`` object of the model's
    ``tokenizer.json`` (what transformers itself wraps), without transformers or PyTorch."""

    backend: Any
    bos_id: int
    eos_id: int
    special_ids: frozenset[int]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: no BOS/EOS added, special-token strings kept as text."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer saved next to a converted model (``tokenizer.json`` + ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer as RustTokenizer

    backend = RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
    # What transformers' split_special_tokens does: a special token's text in a prompt is
    # tokenized as text, so "<s>" typed by a user can never become BOS.
    backend.encode_special_tokens = True
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}

    def token_id(name: str, default: str) -> int:
        token = config.get(name) or default
        content = token.get("content", default) if isinstance(token, dict) else str(token)
        found = backend.token_to_id(content)
        if found is None:
            raise ValueError(f"{model_dir}: the tokenizer has no {name} {content!r}")
        return int(found)

    specials = frozenset(int(i) for i, t in backend.get_added_tokens_decoder().items() if t.special)
    return Tokenizer(backend=backend, bos_id=token_id("bos_token", "<s>"), eos_id=token_id("eos_token", "</s>"),
                     special_ids=specials)


class ModelRunner:
    """One model on one device, loaded once per worker process."""

    def __init__(self, model_dir: Path, spec: ModelSpec, *, device: str = "cpu", device_index: int = 0,
                 compute_type: str = "int8", inter_threads: int = 1, intra_threads: int = 1,
                 fault_kill_on: str = "", fault_generate_s: float = 0.0) -> None:
        import ctranslate2

        started = time.monotonic()
        self.fault_kill_on, self.fault_generate_s = fault_kill_on, fault_generate_s
        self.spec = spec
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self._backend = self.tokenizer.backend  # the Rust tokenizer
        self.generator = ctranslate2.Generator(
            str(model_dir), device=device, device_index=device_index, compute_type=compute_type,
            inter_threads=inter_threads, intra_threads=intra_threads,
        )
        # CTranslate2 takes token strings; its vocabulary maps our ids to them.
        self.vocabulary: list[str] = json.loads((self.model_dir / "vocabulary.json").read_text())
        self.byte_ids = frozenset(i for i, t in enumerate(self.vocabulary)
                                  if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))
        self.special_ids = self.tokenizer.special_ids
        self.incremental = incremental_ok(json.loads((self.model_dir / "tokenizer.json").read_text()))
        self.bos_id = self.tokenizer.bos_id
        self.eos_id = self.tokenizer.eos_id
        self.device, self.compute_type = device, compute_type
        self.inter_threads = inter_threads
        self._local = threading.local()  # what the last call of each slot's thread saved
        self.load_seconds = time.monotonic() - started
        log.info("loaded %s from %s on %s:%d (%s, inter_threads=%d, intra_threads=%d) in %.2fs",
                 spec.name, model_dir, device, device_index, compute_type, inter_threads,
                 intra_threads, self.load_seconds)

    # --- encoding ---------------------------------------------------------------------------

    def encode(self, item: WorkItem) -> Encoded:
        """Prompt token ids for one request; raises ``RequestError`` if it cannot run."""
        (result,) = self.encode_many([item])
        if isinstance(result, RequestError):
            raise result
        return result

    def encode_many(self, items: Sequence[WorkItem]) -> list[Encoded | RequestError]:
        """``encode`` for a round of requests: every text of every prompt goes to the tokenizer
        in one call. A request that cannot run gets its ``RequestError`` in its place."""
        out: list[Encoded | RequestError | None] = [None] * len(items)
        texts: list[str] = []
        rendered: list[tuple[int, list[str | Special]]] = []
        for n, item in enumerate(items):
            if item.prompt_ids is not None:
                out[n] = self._catch(lambda item=item: self._given_ids(item))
                continue
            messages = [ChatMessage(**m) for m in item.messages] if item.messages is not None else None
            try:
                segments = render(chat_model=self.spec.chat, prompt=item.prompt, messages=messages,
                                  system=item.system)
            except ValueError as exc:
                out[n] = RequestError("invalid_prompt", str(exc))
                continue
            rendered.append((n, segments))
            texts.extend(s for s in segments if isinstance(s, str))
        # "<s>" typed in a prompt stays text, it never becomes BOS (see ``load_tokenizer``).
        encoded = iter(self.tokenizer.encode_texts(texts)) if texts else iter(())
        for n, segments in rendered:
            ids = self._join(segments, encoded)
            out[n] = self._catch(lambda n=n, segments=segments, ids=ids: self._encoded(items[n], ids, 1, segments))
        return out  # type: ignore[return-value]

    @staticmethod
    def _catch(make: Callable[[], Encoded]) -> Encoded | RequestError:
        try:
            return make()
        except RequestError as exc:
            return exc

    def _given_ids(self, item: WorkItem) -> Encoded:
        """A prompt sent as token ids: BOS goes in front unless the ids start with it."""
        assert item.prompt_ids is not None
        if any(not 0 <= i < len(self.vocabulary) for i in item.prompt_ids):
            raise RequestError("invalid_prompt", f"prompt_ids hold ids outside the model's vocabulary "
                               f"(0 to {len(self.vocabulary) - 1})")
        if item.continuations:
            raise RequestError("invalid_prompt", "continuations follow a text prompt, not prompt_ids")
        given = list(item.prompt_ids)
        shown = 0 if given[0] == self.bos_id else 1  # list every id that was sent, and only those
        return self._encoded(item, given if shown == 0 else [self.bos_id, *given], shown, [])

    def _encoded(self, item: WorkItem, ids: list[int], shown: int, segments: list[str | Special]) -> Encoded:
        budget = self.spec.context_length
        if len(ids) + item.params.max_new_tokens > budget:
            raise RequestError(
                "context_length_exceeded",
                f"the prompt has {len(ids)} tokens; with max_new_tokens={item.params.max_new_tokens} "
                f"that exceeds the model's context of {budget} tokens",
            )
        vocabulary = self.vocabulary
        enc = Encoded(item=item, ids=ids, tokens=[vocabulary[i] for i in ids], shown=shown)
        if item.params.mode == "score":
            enc.scored = self._scored(segments, ids, item.continuations)
        return enc

    def _join(self, segments: Sequence[str | Special], encoded: Iterator[list[int]]) -> list[int]:
        """A prompt's ids: its texts' ids (the next ones of ``encoded``) and its special tokens."""
        ids: list[int] = []
        for segment in segments:
            if segment is Special.BOS:
                ids.append(self.bos_id)
            elif segment is Special.EOS:
                ids.append(self.eos_id)
            else:
                ids.extend(next(encoded))
        return ids

    def _encode_segments(self, segments: Sequence[str | Special]) -> list[int]:
        texts = [s for s in segments if isinstance(s, str)]
        return self._join(segments, iter(self.tokenizer.encode_texts(texts)) if texts else iter(()))

    def _scored(self, segments: list[str | Special], ids: list[int],
                continuations: Sequence[str] | None) -> list[tuple[list[int], int]]:
        """What a scoring request scores: the prompt's tokens after the first, or each continuation's
        tokens after the prompt. A continuation is tokenized joined to the prompt's text (as the
        model would have read it); its tokens are those after the prompt's tokens that the joined
        text shares (a token merging across the seam counts as the continuation's)."""
        budget = self.spec.context_length
        if not continuations:
            if len(ids) < 2:
                raise RequestError("invalid_prompt", "a scored text needs at least one token after the first")
            return [(ids, 1)]
        out = []
        for n, continuation in enumerate(continuations):
            joined = list(segments)
            if joined and isinstance(joined[-1], str) and joined[-1].endswith(E_INST) and not continuation[0].isspace():
                continuation = " " + continuation  # the template writes an answer as "[/INST] answer"
            if joined and isinstance(joined[-1], str):
                joined[-1] = joined[-1] + continuation
            else:
                joined.append(continuation)
            full = self._encode_segments(joined)
            shared = next((i for i, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
            if len(full) > budget:
                raise RequestError("context_length_exceeded", f"the prompt with continuations[{n}] has "
                                   f"{len(full)} tokens; the model's context is {budget} tokens")
            if shared >= len(full):
                raise RequestError("invalid_prompt", f"continuations[{n}] adds no token to the prompt")
            out.append((full, max(1, shared)))
        return out

    def _maybe_die(self, batch: Sequence[Encoded]) -> None:
        # Fault injection for the recovery tests (BATCHGEN_FAULT_KILL_ON): die as a crash would.
        for enc in batch:
            texts = [enc.item.prompt or ""] + [m["content"] for m in enc.item.messages or []]
            if any(self.fault_kill_on in t for t in texts):
                log.error("fault injection: killing this worker on request %s", enc.item.id)
                os.kill(os.getpid(), signal.SIGKILL)

    # --- decoding ---------------------------------------------------------------------------

    def decode_continuation(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
        """Text of generated ``ids`` as it continues the prompt.

        Llama's decoder drops the leading space of a text; decoding the generated ids alone would
        lose the space their first token carries. Decoding the prompt's last few tokens with them
        and removing that prefix keeps it.
        """
        tail = [i for i in prompt_ids[-_TAIL:] if i not in (self.bos_id, self.eos_id)]
        if not tail:
            return self._backend.decode(list(ids), skip_special_tokens=True)
        head = self._backend.decode(tail, skip_special_tokens=True)
        full = self._backend.decode(tail + list(ids), skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head):]
        # The prompt ended inside a multi-byte character completed by the output.
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self, prompt_ids: Sequence[int]) -> StreamDecoder:
        """An incremental decoder giving what ``decode_continuation`` gives, token by token."""
        decoder = StreamDecoder(self._decode_skipping, prompt_ids, byte_ids=self.byte_ids,
                                special_ids=self.special_ids)
        return decoder if self.incremental else decoder.whole()

    def _decode_skipping(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=True)

    # --- log probabilities ------------------------------------------------------------------

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
                tops = None
                if top > 0:
                    k = min(top, vocab)
                    best = np.argpartition(-dist, k - 1, axis=1)[:, :k]
                    values = np.take_along_axis(dist, best, axis=1)
                    rank = np.argsort(-values, axis=1, kind="stable")
                    best, values = np.take_along_axis(best, rank, axis=1), np.take_along_axis(values, rank, axis=1)
                    tops = [list(zip(b.tolist(), v.tolist(), strict=True)) for b, v in zip(best, values, strict=True)]
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
        if token_id in self.byte_ids:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_entries(self, ids: Sequence[int], positions: Positions | None, *,
                      first_of_text: bool = False) -> list[dict[str, Any]]:
        """Tokens as results list them: ``{token, bytes, logprob, top_logprobs}``. ``positions`` is
        None for tokens nothing precedes (their log probability is null). ``first_of_text``: these
        start the decoded text, whose first space the decoder drops."""
        out = []
        strip = first_of_text
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
        if enc.shown == 0:  # the ids sent began with BOS: listed, and nothing precedes it
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

    # --- generation -------------------------------------------------------------------------

    # Rows sharing at least this many leading tokens have them computed once per batch
    # (CTranslate2's static_prompt). Measured on the bench model (2 CPU cores, int8): 256 prompts
    # of a 400-token prefix and 20-40-token tails ran 1.5-2.4x faster so (bench/prefix.py).
    # Not cached across calls (cache_static_prompt=False): the cache is unbounded, keyed by
    # prompt, and caching measured no faster.
    STATIC_PROMPT_MIN = 64

    def prefix_saved(self) -> int:
        """Prompt tokens the last ``generate`` call of this thread did not compute again, thanks
        to a prefix its rows share (0 for any other call)."""
        saved = getattr(self._local, "saved", 0)
        self._local.saved = 0
        return int(saved)

    def shared_prefix(self, rows: Sequence[Encoded]) -> int:
        """How many leading tokens every row shares, when worth computing once (else 0). Each row
        keeps at least two tokens of its own: CTranslate2 forwards the rows' own tokens up to the
        shortest but one at once, and with nothing to forward it would return a longer row's
        remaining prompt tokens as generated ones (a prompt is never shorter than BOS + 1 token, so
        without a static prompt this cannot happen)."""
        if len(rows) < 2:
            return 0
        first = rows[0].ids
        shared = min(len(enc.ids) for enc in rows) - 2
        for enc in rows[1:]:
            ids = enc.ids
            n = 0
            while n < shared and ids[n] == first[n]:
                n += 1
            shared = n
            if shared < self.STATIC_PROMPT_MIN:
                return 0
        return shared

    def generate(self, batch: Sequence[Encoded], on_delta: DeltaSink | None = None) -> list[Outcome]:
        """Run a batch (shared sampling settings) in one ``generate_batch`` call.

        ``on_delta(request_id, text)`` receives new text of requests whose delivery is ``stream``
        as it is generated (the whole text is in the outcome all the same).
        """
        if self.fault_kill_on:
            self._maybe_die(batch)
        params = batch[0].item.params
        if params.scores_only:  # the batcher keeps these apart (ResolvedParams.sampling_key)
            return self.score(batch)
        # Several samples of a request (n, best_of) are rows of their own in the same call: each
        # stops on its own (the callback stops a batch index), and greedy ones are simply equal.
        rows = [enc for enc in batch for _ in range(enc.item.params.samples)]
        sequences = [_Sequence(enc, self, on_delta if enc.item.params.samples == 1 else None) for enc in rows]

        def on_step(step: Any) -> bool:
            return sequences[step.batch_id].push(step.token_id)

        greedy = params.temperature == 0
        max_length = max(enc.item.params.max_new_tokens for enc in batch)
        # The step callback runs Python (and takes the GIL) for every token of every sequence.
        # When every request wants max_length tokens and has no stop strings, CTranslate2's own
        # max_length and end token do the whole job: skip it.
        needs_callback = any(enc.item.params.stop or enc.item.params.max_new_tokens != max_length
                             or seq.streaming for enc, seq in zip(rows, sequences, strict=True))
        # A prefix every row shares is computed once for the batch, not once per row.
        shared = self.shared_prefix(rows)
        self._local.saved = shared * (len(rows) - 1)
        prefix = {"static_prompt": rows[0].tokens[:shared], "cache_static_prompt": False} if shared else {}
        results = self.generator.generate_batch(
            [enc.tokens[shared:] for enc in rows],
            **prefix,
            max_length=max_length,
            min_length=params.min_new_tokens,
            sampling_topk=1 if greedy else params.top_k,
            sampling_topp=params.top_p,
            sampling_temperature=1.0 if greedy else params.temperature,
            repetition_penalty=params.repetition_penalty,
            include_prompt_in_result=False,
            callback=on_step if needs_callback else None,
        )
        if self.fault_generate_s:  # fault tests: a slow device (text already streamed, nothing stored yet)
            time.sleep(self.fault_generate_s)
        generated = []
        for seq, result in zip(sequences, results, strict=True):
            # The callback saw every token; the result is the authority on what was generated.
            ids = list(result.sequences_ids[0])[: len(seq.ids)] if seq.reason else list(result.sequences_ids[0])
            if seq.reason is None:
                seq.reason = "length" if len(ids) >= seq.enc.item.params.max_new_tokens else "stop"
            generated.append(ids)
        details = self._logprob_details(rows, generated)
        outcomes = []
        at = 0
        for enc in batch:
            p = enc.item.params
            mine = range(at, at + p.samples)
            at += p.samples
            if p.samples == 1:
                seq, ids, detail = sequences[mine[0]], generated[mine[0]], details[mine[0]]
                outcomes.append(Outcome(request_id=enc.item.id, job_id=enc.item.job_id, text=seq.finish(ids),
                                        finish_reason=seq.reason, prompt_tokens=enc.length,
                                        completion_tokens=len(ids), detail=detail))
                continue
            choices = [{"text": storable(sequences[r].finish(generated[r])), "finish_reason": sequences[r].reason,
                        "completion_tokens": len(generated[r]),
                        "logprobs": (details[r] or {}).get("logprobs")} for r in mine]
            if p.best_of > p.n:  # the n with the highest log probability per token (the model's)
                choices.sort(key=_mean_logprob, reverse=True)
                choices = choices[:p.n]
            for i, choice in enumerate(choices):
                choice["index"] = i
                if not (p.logprobs or p.echo):  # computed only to rank them
                    choice["logprobs"] = None
            detail = {"choices": choices}
            if p.logprobs or p.echo:
                detail["logprobs"] = choices[0]["logprobs"]
            # Usage counts every sample generated, also those best_of left out.
            outcomes.append(Outcome(request_id=enc.item.id, job_id=enc.item.job_id, text=choices[0]["text"],
                                    finish_reason=choices[0]["finish_reason"], prompt_tokens=enc.length,
                                    completion_tokens=sum(len(generated[r]) for r in mine), detail=detail))
        return outcomes

    def _logprob_details(self, batch: Sequence[Encoded], generated: list[list[int]]) -> list[dict[str, Any] | None]:
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
