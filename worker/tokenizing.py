"""Prompts to token ids and generated ids to text, with the model's own tokenizer.

The worker tokenizes with the Rust ``tokenizers`` object of the model's ``tokenizer.json`` (what
transformers itself wraps), without transformers or PyTorch. ``Prompts`` renders a request (the
Llama-2 chat template where it applies), encodes a round of requests in one tokenizer call, checks
them against the context, and decodes what the model generated as it continues the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.prompts import Segment, Special, render, with_continuation
from core.registry import ModelSpec
from core.runs import WorkItem
from core.schemas import ChatMessage
from core.templates import Rendered
from core.tokens import Backends
from worker.detokenizer import CONTEXT, StreamDecoder, byte_level, incremental_ok, strips_first_space

# Prompt ids kept to decode the first generated token in context (see decode_continuations);
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


class RequestError(Exception):
    """A request that cannot run (too long, unencodable); it fails alone."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Tokenizer:
    """The model's tokenizer as the worker uses it: the Rust ``tokenizers`` object of the model's
    ``tokenizer.json`` (what transformers itself wraps), without transformers or PyTorch.
    ``bos_id`` is None for a tokenizer without one (Qwen's)."""

    backends: Backends
    bos_id: int | None
    eos_id: int
    special_ids: frozenset[int]

    @property
    def backend(self) -> Any:
        return self.backends.text

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: no BOS/EOS added, special-token strings kept as text."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))


def load_tokenizer(model_dir: Path, special_tokens: dict[str, str] | None = None) -> Tokenizer:
    """The tokenizer saved next to a converted model (``tokenizer.json`` + ``tokenizer_config.json``).
    ``special_tokens`` are what the registry read from the checkpoint (``bos_token``, ...):
    without one, the tokenizer has no such token; without any, they are read from
    ``tokenizer_config.json``, with Llama's as defaults."""
    backends = Backends(model_dir / "tokenizer.json")
    config_file = model_dir / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if special_tokens:
        config = {"bos_token": None, **special_tokens}

    def token_id(name: str, default: str | None) -> int | None:
        token = config.get(name, default)
        if token is None:
            return None
        content = token.get("content", default) if isinstance(token, dict) else str(token)
        found = backends.text.token_to_id(content)
        if found is None:
            raise ValueError(f"{model_dir}: the tokenizer has no {name} {content!r}")
        return int(found)

    eos_id = token_id("eos_token", "</s>")
    if eos_id is None:
        raise ValueError(f"{model_dir}: the tokenizer names no eos_token")
    return Tokenizer(backends=backends, bos_id=token_id("bos_token", "<s>"), eos_id=eos_id,
                     special_ids=backends.special_ids)


class Prompts:
    """A model's prompts: encoding requests, decoding what it generated."""

    def __init__(self, model_dir: Path, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer = load_tokenizer(model_dir, spec.special_tokens)
        self._backend = self.tokenizer.backend  # the Rust tokenizer
        # CTranslate2 takes token strings; its vocabulary maps our ids to them.
        self.vocabulary: list[str] = json.loads((model_dir / "vocabulary.json").read_text())
        self.byte_ids = frozenset(i for i, t in enumerate(self.vocabulary)
                                  if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))
        self.special_ids = self.tokenizer.special_ids
        tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
        self.incremental = incremental_ok(tokenizer_json)
        self.byte_level = byte_level(tokenizer_json)
        self.strips_first_space = strips_first_space(tokenizer_json)
        self.bos_id = self.tokenizer.bos_id
        self.eos_id = self.tokenizer.eos_id
        # Generation ends on any of the checkpoint's end-of-turn ids (Llama 3.x has several).
        self.stop_ids: tuple[int, ...] = tuple(spec.stop_token_ids) or (self.eos_id,)
        self.control = self.tokenizer.backends.control(spec.chat_template) if spec.chat_template else ()

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
        chats: list[Rendered] = []
        rendered: list[tuple[int, list[Segment]]] = []
        for n, item in enumerate(items):
            if item.prompt_ids is not None:
                out[n] = self._catch(lambda item=item: self._given_ids(item))
                continue
            messages = [ChatMessage(**m) for m in item.messages] if item.messages is not None else None
            try:
                segments = render(self.spec, prompt=item.prompt, messages=messages, system=item.system,
                                  control=self.control)
            except ValueError as exc:
                out[n] = RequestError("invalid_prompt", str(exc))
                continue
            rendered.append((n, segments))
            texts.extend(s for s in segments if isinstance(s, str))
            chats.extend(s for s in segments if isinstance(s, Rendered))
        # "<s>" typed in a prompt stays text, it never becomes BOS (see ``core.tokens.Backends``).
        encoded = iter(self.tokenizer.encode_texts(texts)) if texts else iter(())
        chat_ids = iter(self.tokenizer.backends.encode_rendered(chats)) if chats else iter(())
        for n, segments in rendered:
            ids = self._join(segments, encoded, chat_ids)
            # Echo lists the prompt from after its BOS (ours or the template's): nothing precedes BOS.
            shown = 1 if ids and ids[0] == self.bos_id else 0
            out[n] = self._catch(lambda n=n, segments=segments, ids=ids, shown=shown: self._encoded(
                items[n], ids, shown, segments))
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
        if self.bos_id is None or not self.spec.add_bos or given[0] == self.bos_id:
            return self._encoded(item, given, 0, [])
        shown = 1  # list every id that was sent, and only those
        return self._encoded(item, [self.bos_id, *given], shown, [])

    def _encoded(self, item: WorkItem, ids: list[int], shown: int, segments: list[Segment]) -> Encoded:
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

    def _join(self, segments: Sequence[Segment], encoded: Iterator[list[int]],
              chats: Iterator[list[int]] | None = None) -> list[int]:
        """A prompt's ids: its texts' ids (the next ones of ``encoded``), its rendered chats' (of
        ``chats``) and its special tokens."""
        ids: list[int] = []
        for segment in segments:
            if segment is Special.BOS:
                if self.bos_id is not None:
                    ids.append(self.bos_id)
            elif segment is Special.EOS:
                ids.append(self.eos_id)
            elif isinstance(segment, Rendered):
                assert chats is not None, "a rendered chat's ids are given with it"
                ids.extend(next(chats))
            else:
                ids.extend(next(encoded))
        return ids

    def _encode_segments(self, segments: Sequence[Segment]) -> list[int]:
        texts = [s for s in segments if isinstance(s, str)]
        chats = [s for s in segments if isinstance(s, Rendered)]
        return self._join(segments, iter(self.tokenizer.encode_texts(texts)) if texts else iter(()),
                          iter(self.tokenizer.backends.encode_rendered(chats)) if chats else iter(()))

    def _scored(self, segments: list[Segment], ids: list[int],
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
            full = self._encode_segments(with_continuation(segments, continuation, self.control))
            shared = next((i for i, (a, b) in enumerate(zip(ids, full, strict=False)) if a != b), min(len(ids), len(full)))
            if len(full) > budget:
                raise RequestError("context_length_exceeded", f"the prompt with continuations[{n}] has "
                                   f"{len(full)} tokens; the model's context is {budget} tokens")
            if shared >= len(full):
                raise RequestError("invalid_prompt", f"continuations[{n}] adds no token to the prompt")
            out.append((full, max(1, shared)))
        return out

    def decode_continuation(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
        """Text of generated ``ids`` as it continues the prompt (see ``decode_continuations``)."""
        return self.decode_continuations([(prompt_ids, ids)])[0]

    def decode_continuations(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[str]:
        """Text of each row's generated ids as it continues its prompt, for a whole batch in two
        calls of the Rust tokenizer (``decode_batch``), not two per row.

        Llama's decoder drops the leading space of a text; decoding the generated ids alone would
        lose the space their first token carries. Decoding the prompt's last few tokens with them
        and removing that prefix keeps it.
        """
        specials = self.special_ids
        tails = [[i for i in prompt_ids[-_TAIL:] if i not in specials] for prompt_ids, _ in rows]
        heads = self._backend.decode_batch(tails, skip_special_tokens=True)
        fulls = self._backend.decode_batch([tail + list(ids) for tail, (_, ids) in zip(tails, rows, strict=True)],
                                           skip_special_tokens=True)
        texts = []
        for head, full, (_, ids) in zip(heads, fulls, rows, strict=True):
            if full.startswith(head):  # an empty tail: head is "" and full the ids' own text
                texts.append(full[len(head):])
            else:  # the prompt ended inside a multi-byte character completed by the output
                texts.append(self._backend.decode(list(ids), skip_special_tokens=True))
        return texts

    def stream_decoder(self, prompt_ids: Sequence[int]) -> StreamDecoder:
        """An incremental decoder giving what ``decode_continuation`` gives, token by token."""
        decoder = StreamDecoder(self._decode_skipping, prompt_ids, byte_ids=self.byte_ids,
                                special_ids=self.special_ids)
        return decoder if self.incremental else decoder.whole()

    def _decode_skipping(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=True)
