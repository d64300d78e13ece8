"""The model runner: a CTranslate2 ``Generator``, the model's prompts (``worker.tokenizing``)
and log probabilities (``worker.logprobs``).

``generate`` runs one batch of encoded requests in a single ``generate_batch`` call. The batch
shares sampling settings (CTranslate2 takes them per call); each request's own
``max_new_tokens`` and ``stop`` strings are enforced inside the call by the step callback, which
stops that sequence only, and runs only where a row needs it (a stop string, a stream, a row
that ends before the others).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.registry import ModelSpec
from core.runs import Outcome, storable
from worker.detokenizer import StreamDecoder, first_stop
from worker.logprobs import LogProbs, mean_logprob
from worker.tokenizing import Encoded, Prompts

log = logging.getLogger("batchgen.runner")

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
        if token_id in self.runner.stop_ids:
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

    def finish(self, text: str | None) -> str:
        """The stored text, given the decoded text of the ids the result holds (None when the
        sequence already ended on a stop string: its text was cut then)."""
        if self.text is not None:
            return self.text
        assert text is not None
        stops = self.enc.item.params.stop
        if stops:  # a stop string may sit in a byte run the decoder was still holding back
            cut = first_stop(text, stops, self.searched)
            if cut >= 0:
                self.reason, text = "stop", text[:cut]
        return text


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
        self.prompts = Prompts(self.model_dir, spec)
        self.generator = ctranslate2.Generator(
            str(model_dir), device=device, device_index=device_index, compute_type=compute_type,
            inter_threads=inter_threads, intra_threads=intra_threads,
        )
        self.logprobs = LogProbs(self.generator, self.prompts)
        p = self.prompts
        self.tokenizer, self.vocabulary, self.bos_id, self.eos_id = p.tokenizer, p.vocabulary, p.bos_id, p.eos_id
        self.special_ids, self.byte_ids = p.special_ids, p.byte_ids
        self.stop_ids = frozenset(p.stop_ids)
        self._end_token = list(p.stop_ids)  # what CTranslate2 ends a sequence on
        # What the rest of the worker asks of a runner, answered by its parts.
        self.encode, self.encode_many = p.encode, p.encode_many
        self.decode_continuation, self.decode_continuations = p.decode_continuation, p.decode_continuations
        self.stream_decoder = p.stream_decoder
        self.token_bytes, self.score = self.logprobs.token_bytes, self.logprobs.score
        self.device, self.compute_type = device, compute_type
        self.inter_threads = inter_threads
        self._local = threading.local()  # what the last call of each slot's thread saved
        self.load_seconds = time.monotonic() - started
        log.info("loaded %s from %s on %s:%d (%s, inter_threads=%d, intra_threads=%d) in %.2fs",
                 spec.name, model_dir, device, device_index, compute_type, inter_threads,
                 intra_threads, self.load_seconds)

    def _maybe_die(self, batch: Sequence[Encoded]) -> None:
        # Fault injection for the recovery tests (BATCHGEN_FAULT_KILL_ON): die as a crash would.
        for enc in batch:
            texts = [enc.item.prompt or ""] + [m["content"] for m in enc.item.messages or []]
            if any(self.fault_kill_on in t for t in texts):
                log.error("fault injection: killing this worker on request %s", enc.item.id)
                os.kill(os.getpid(), signal.SIGKILL)

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
            return self.logprobs.score(batch)
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
            end_token=self._end_token,
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
        details = self.logprobs.details(rows, generated)
        # The whole batch's texts in one tokenizer call (rows cut by a stop string have theirs).
        undecoded = [r for r, seq in enumerate(sequences) if seq.text is None]
        decoded = self.decode_continuations([(rows[r].ids, generated[r]) for r in undecoded])
        texts: list[str | None] = [None] * len(rows)
        for r, text in zip(undecoded, decoded, strict=True):
            texts[r] = sequences[r].finish(text)
        for r, seq in enumerate(sequences):
            if texts[r] is None:
                texts[r] = seq.finish(None)
        outcomes = []
        at = 0
        for enc in batch:
            p = enc.item.params
            mine = range(at, at + p.samples)
            at += p.samples
            if p.samples == 1:
                seq, ids, detail = sequences[mine[0]], generated[mine[0]], details[mine[0]]
                outcomes.append(Outcome(request_id=enc.item.id, job_id=enc.item.job_id, text=texts[mine[0]],
                                        finish_reason=seq.reason, prompt_tokens=enc.length,
                                        completion_tokens=len(ids), detail=detail))
                continue
            choices = [{"text": storable(texts[r]), "finish_reason": sequences[r].reason,
                        "completion_tokens": len(generated[r]),
                        "logprobs": (details[r] or {}).get("logprobs")} for r in mine]
            if p.best_of > p.n:  # the n with the highest log probability per token (the model's)
                choices.sort(key=mean_logprob, reverse=True)
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
