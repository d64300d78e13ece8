"""vLLM's tokenizer routes at the API's root: ``GET /tokenizer_info``, ``POST /tokenize`` and
``POST /detokenize``.

Evaluation harnesses find them on their own: EleutherAI's lm-eval (``local-completions``) looks
for ``/tokenizer_info`` and ``/tokenize`` next to ``/v1/completions`` and then tokenizes through
the server, so it needs neither a model hub nor transformers. They are public by default (lm-eval
sends no key to them unless given ``auth_token``; ``BATCHGEN_TOKENIZER_ROUTES=key`` requires one)
and tell nothing but how a served model tokenizes; a body is refused unread past what a prompt
can hold. Errors are OpenAI-shaped, as vLLM's are.

Tokenizing here follows transformers' defaults, as vLLM does: ``add_special_tokens`` puts BOS in
front, and the text of a special token (``</s>``) is that token. (Prompts sent as text to
batchgen never turn ``</s>`` into a token; ids sent as ``prompt_ids`` go to the model as they are.)
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from flask import Blueprint, request
from pydantic import BaseModel, ConfigDict, Field

from core.errors import UnknownModelError
from core.registry import ModelSpec
from core.schemas import Text
from webapi.errors import ApiError
from webapi.parsing import json_body, validated
from webapi.services import services

bp = Blueprint("tokenizer", __name__)

MAX_IDS = 32768


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's shape). Strict: ``"add_special_tokens": "yes"`` is refused, not
    read as true."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = Field(None, min_length=1, max_length=200, description="Default: the served model.")
    prompt: Text
    add_special_tokens: bool = Field(True, description="Put BOS in front.")


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's shape). Strict: ``["7"]`` is refused, not read as ``[7]``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = Field(None, min_length=1, max_length=200)
    tokens: list[int] = Field(max_length=MAX_IDS)


class TokenizeRead(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: None = None


class DetokenizeRead(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What ``tokenizer_config.json`` says of the special tokens, and the context length."""

    model: str
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int


_LOADED: dict[Path, tuple[Any, int]] = {}
_LOCK = threading.Lock()


def _loaded(spec: ModelSpec) -> tuple[Any, int]:
    """The model's tokenizer (special tokens' text is the token) and the most characters one of
    its tokens can stand for, loaded once per process."""
    path = spec.directory(services().settings.models_dir) / "tokenizer.json"
    with _LOCK:
        if path not in _LOADED:
            if not path.is_file():
                raise ApiError(503, "tokenizer_unavailable", f"the tokenizer of {spec.name!r} is not on the API's "
                               "machine (only on its workers')")
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path))
            # A token's vocabulary string is at least as long as the text it stands for (byte-level
            # vocabularies write a byte as a character; byte fallback tokens are longer still).
            longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)
            _LOADED[path] = (tokenizer, max(1, longest))
        return _LOADED[path]


def _tokenizer(spec: ModelSpec) -> Any:
    return _loaded(spec)[0]


def _off_the_loop(work: Callable[[], Any]) -> Any:
    """Run tokenizer work (Rust, which lets go of the GIL) on a thread of its own: under gunicorn's
    gevent workers, in place it would stall every stream and call the process serves until it
    ended. Elsewhere (threads) it runs in place."""
    if "gevent" in sys.modules:
        from gevent import get_hub, monkey

        if monkey.is_module_patched("threading"):
            return get_hub().threadpool.apply(work)
    return work()


def _model(name: str | None) -> ModelSpec:
    svc = services()
    try:
        return svc.submissions.resolve(name or svc.settings.model)
    except UnknownModelError as exc:
        raise ApiError(404, "model_not_found", exc.message) from None


def _config(spec: ModelSpec) -> dict[str, Any]:
    path = spec.directory(services().settings.models_dir) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    return config if isinstance(config, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@bp.get("/tokenizer_info")
def tokenizer_info() -> dict[str, Any]:
    spec = _model(None)
    _tokenizer(spec)  # 404 here when the tokenizer is not on this machine
    # What the registry read from the checkpoint, where it did (a converted model); else the
    # tokenizer's configuration, with Llama-2's names as defaults.
    config = {"bos_token": None, "unk_token": None, **spec.special_tokens} if spec.special_tokens else _config(spec)
    config.setdefault("tokenizer_class", _config(spec).get("tokenizer_class"))
    return TokenizerInfo(
        model=spec.name, tokenizer_class=str(config.get("tokenizer_class") or ""),
        bos_token=_token_text(config.get("bos_token", "<s>")), eos_token=_token_text(config.get("eos_token", "</s>")),
        pad_token=_token_text(config.get("pad_token")), unk_token=_token_text(config.get("unk_token", "<unk>")),
        model_max_length=spec.context_length,
    ).model_dump(mode="json")


def _bounded_body() -> Any:
    """The JSON body, refused unread when larger than a prompt can be (these routes may be public)."""
    limit = services().settings.max_prompt_chars * 4 + 4096  # UTF-8 is at most 4 bytes a character
    if request.content_length is None or request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"a tokenizer request body holds at most {limit} bytes "
                       "(with a Content-Length)")
    return json_body()


@bp.post("/tokenize")
def tokenize() -> dict[str, Any]:
    req = validated(TokenizeRequest, _bounded_body())
    spec = _model(req.model)
    tokenizer, longest = _loaded(spec)
    # Bounded by the context: a text longer than this cannot fit it, whatever it tokenizes to
    # (twice the longest token a position: a normalizer may drop characters before tokenizing).
    by_context = 2 * spec.context_length * longest
    limit = min(services().settings.max_prompt_chars, by_context)
    if len(req.prompt) > limit:
        why = (f"more than the {spec.context_length} tokens of {spec.name}'s context, however it is tokenized"
               if limit == by_context else "BATCHGEN_MAX_PROMPT_CHARS")
        raise ApiError(400, "prompt_too_long", f"prompt is longer than {limit} characters ({why})")
    # encode_batch: the Rust tokenizer lets go of the GIL there, so the loop's thread runs on.
    [encoded] = _off_the_loop(partial(tokenizer.encode_batch, [req.prompt], add_special_tokens=req.add_special_tokens))
    ids = list(encoded.ids)
    return TokenizeRead(count=len(ids), max_model_len=spec.context_length, tokens=ids).model_dump(mode="json")


@bp.post("/detokenize")
def detokenize() -> dict[str, Any]:
    req = validated(DetokenizeRequest, _bounded_body())
    spec = _model(req.model)
    if len(req.tokens) > spec.context_length:
        raise ApiError(400, "invalid_request", f"{len(req.tokens)} tokens are more than the "
                       f"{spec.context_length} of {spec.name}'s context")
    tokenizer = _tokenizer(spec)
    size = tokenizer.get_vocab_size()
    bad = [i for i in req.tokens if not 0 <= i < size]
    if bad:
        raise ApiError(400, "invalid_request", f"token {bad[0]} is not in the vocabulary (0 to {size - 1})")
    [text] = _off_the_loop(partial(tokenizer.decode_batch, [req.tokens], skip_special_tokens=False))
    return DetokenizeRead(prompt=text).model_dump(mode="json")
