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
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.jobs import Outcome, WorkItem
from core.prompts import Special, render
from core.registry import ModelSpec
from core.schemas import ChatMessage
from worker.detokenizer import CONTEXT, StreamDecoder, first_stop, incremental_ok

log = logging.getLogger("batchgen.runner")

# Prompt ids kept to decode the first generated token in context (see decode_continuation);
# the incremental decoder uses the same number, so both give the same text.
_TAIL = CONTEXT


@dataclass
class Encoded:
    """A request ready to run: prompt token ids and the strings CTranslate2 takes."""

    item: WorkItem
    ids: list[int]
    tokens: list[str]

    @property
    def length(self) -> int:
        return len(self.ids)


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
        self.streaming = self.on_delta is not None and params.delivery == "stream"
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
        self.load_seconds = time.monotonic() - started
        log.info("loaded %s from %s on %s:%d (%s, inter_threads=%d, intra_threads=%d) in %.2fs",
                 spec.name, model_dir, device, device_index, compute_type, inter_threads,
                 intra_threads, self.load_seconds)

    # --- encoding ---------------------------------------------------------------------------

    def encode(self, item: WorkItem) -> Encoded:
        """Prompt token ids for one request; raises ``RequestError`` if it cannot run."""
        messages = [ChatMessage(**m) for m in item.messages] if item.messages is not None else None
        try:
            segments = render(chat_model=self.spec.chat, prompt=item.prompt, messages=messages,
                              system=item.system)
        except ValueError as exc:
            raise RequestError("invalid_prompt", str(exc)) from None
        texts = [s for s in segments if isinstance(s, str)]
        # "<s>" typed in a prompt stays text, it never becomes BOS (see ``load_tokenizer``).
        encoded = iter(self.tokenizer.encode_texts(texts)) if texts else iter(())
        ids: list[int] = []
        for segment in segments:
            if segment is Special.BOS:
                ids.append(self.bos_id)
            elif segment is Special.EOS:
                ids.append(self.eos_id)
            else:
                ids.extend(next(encoded))
        budget = self.spec.context_length
        if len(ids) + item.params.max_new_tokens > budget:
            raise RequestError(
                "context_length_exceeded",
                f"the prompt has {len(ids)} tokens; with max_new_tokens={item.params.max_new_tokens} "
                f"that exceeds the model's context of {budget} tokens",
            )
        return Encoded(item=item, ids=ids, tokens=[self.vocabulary[i] for i in ids])

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

    # --- generation -------------------------------------------------------------------------

    def generate(self, batch: Sequence[Encoded], on_delta: DeltaSink | None = None) -> list[Outcome]:
        """Run a batch (shared sampling settings) in one ``generate_batch`` call.

        ``on_delta(request_id, text)`` receives new text of requests whose delivery is ``stream``
        as it is generated (the whole text is in the outcome all the same).
        """
        if self.fault_kill_on:
            self._maybe_die(batch)
        params = batch[0].item.params
        sequences = [_Sequence(enc, self, on_delta) for enc in batch]

        def on_step(step: Any) -> bool:
            return sequences[step.batch_id].push(step.token_id)

        greedy = params.temperature == 0
        max_length = max(enc.item.params.max_new_tokens for enc in batch)
        # The step callback runs Python (and takes the GIL) for every token of every sequence.
        # When every request wants max_length tokens and has no stop strings, CTranslate2's own
        # max_length and end token do the whole job: skip it.
        needs_callback = any(enc.item.params.stop or enc.item.params.max_new_tokens != max_length
                             or (on_delta is not None and enc.item.params.delivery == "stream")
                             for enc in batch)
        results = self.generator.generate_batch(
            [enc.tokens for enc in batch],
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
        outcomes = []
        for seq, result in zip(sequences, results, strict=True):
            # The callback saw every token; the result is the authority on what was generated.
            ids = list(result.sequences_ids[0])[: len(seq.ids)] if seq.reason else list(result.sequences_ids[0])
            if seq.reason is None:
                seq.reason = "length" if len(ids) >= seq.enc.item.params.max_new_tokens else "stop"
            text = seq.finish(ids)
            outcomes.append(Outcome(request_id=seq.enc.item.id, job_id=seq.enc.item.job_id, text=text,
                                    finish_reason=seq.reason, prompt_tokens=seq.enc.length,
                                    completion_tokens=len(ids)))
        return outcomes
