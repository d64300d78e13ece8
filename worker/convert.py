"""Hugging Face decoder checkpoint -> CTranslate2 model directory (the path every model takes).

A real checkpoint (a local directory or, where the hub is reachable, its id) and the small models
of ``worker.builder`` go through the same function: CTranslate2's own ``TransformersConverter``
writes ``model.bin``/``config.json``/``vocabulary.json`` quantized as asked, and the checkpoint's
tokenizer is saved alongside so the worker tokenizes exactly as the model was trained.
``read_checkpoint`` reads what the checkpoint says about itself (chat template, special tokens,
end-of-turn ids, context, sampling defaults), which ``batchgen convert`` registers.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("batchgen.convert")

# The decoder families batchgen serves, by the model_type of their config.json: CTranslate2 4.8
# converts each (its loaders for LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
# GemmaConfig, Gemma2Config, Gemma3Config/Gemma3TextConfig and Phi3Config).
FAMILIES: dict[str, str] = {
    "llama": "Llama 2, Llama 3.x",
    "mistral": "Mistral",
    "qwen2": "Qwen 2 and 2.5",
    "qwen3": "Qwen 3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "gemma3_text": "Gemma 3 (text only)",
    "phi3": "Phi-3",
}
# generation_config.json fields that are sampling defaults, by our parameter names.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "repetition_penalty": "repetition_penalty"}


class CheckpointError(ValueError):
    """A checkpoint batchgen cannot serve as it is."""


class UnsupportedFamilyError(CheckpointError):
    """A checkpoint of a family batchgen does not convert."""


def check_family(model_type: str, source: str | Path) -> None:
    """Refuse a checkpoint of a family not in ``FAMILIES``, by name, with the list of those served."""
    if model_type not in FAMILIES:
        served = ", ".join(f"{name} ({what})" for name, what in FAMILIES.items())
        raise UnsupportedFamilyError(f"{source} is a {model_type!r} checkpoint, which batchgen does not convert; "
                                f"it converts these model_types: {served}")

QUANTIZATIONS = ("int8", "int8_float16", "int8_bfloat16", "int8_float32", "float16", "bfloat16",
                 "float32")
METADATA_FILE = "batchgen-model.json"


def convert_checkpoint(
    source: str | Path, output_dir: Path, *, quantization: str = "int8", force: bool = False,
    low_memory: bool = True,
) -> Path:
    """Convert ``source`` (checkpoint directory or hub id) into ``output_dir``; returns it.

    The conversion is written to a temporary directory next to ``output_dir`` and moved into
    place at the end, so a failed or interrupted conversion never leaves half a model behind.
    ``low_memory`` loads the weights as float16 with low CPU memory use (needed for 7B and
    larger on an ordinary machine); the int8 weights are the same either way.
    """
    output_dir = check_output(output_dir, quantization, force)
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(source))
    check_family(config.model_type, source)
    text_config = getattr(config, "text_config", None) or config

    started = time.monotonic()
    with staged(output_dir) as model_dir:
        converter = _Converter(str(source), load_as_float16=low_memory, low_cpu_mem_usage=low_memory)
        converter.convert(str(model_dir), quantization=quantization, force=True)
        _write_norm_epsilon(model_dir, text_config)
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(model_dir))
        write_metadata(model_dir, source=str(source), quantization=quantization, family=config.model_type,
                       context_length=getattr(text_config, "max_position_embeddings", None),
                       vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
                       num_hidden_layers=text_config.num_hidden_layers)
    log.info("converted %s to %s (%s) in %.1fs", source, output_dir, quantization,
             time.monotonic() - started)
    return output_dir


def _converter_class() -> type:
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):  # type: ignore[misc]
        """CTranslate2 4.8's converter, given the model as its Phi-3 loader expects it from
        transformers 4: there, ``rope_scaling`` was None without scaling and had a ``type``
        otherwise, and each attention layer held a ``rotary_emb`` with the LongRoPE factors.
        transformers 5 writes ``rope_scaling={"rope_type": "default", ...}`` for plain RoPE and
        keeps the factors in the config only. Other families load as they are."""

        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if model.config.model_type == "phi3":
                _as_transformers4_phi3(model)
            return model

    return Converter


def _write_norm_epsilon(model_dir: Path, config: Any) -> None:
    """CTranslate2 4.8's Phi-3 loader leaves ``layer_norm_epsilon`` out of the model's config, so
    the model normalizes with CTranslate2's default (1e-6) instead of the checkpoint's (Phi-3:
    1e-5), off by up to 4e-3 in a log probability. Write the checkpoint's where it is missing."""
    eps = getattr(config, "rms_norm_eps", None)
    path = model_dir / "config.json"
    ct2 = json.loads(path.read_text())
    if eps is not None and ct2.get("layer_norm_epsilon") is None:
        ct2["layer_norm_epsilon"] = float(eps)
        path.write_text(json.dumps(ct2, indent=2))


def _as_transformers4_phi3(model: Any) -> None:
    from types import SimpleNamespace

    scaling = getattr(model.config, "rope_scaling", None)
    kind = scaling.get("type", scaling.get("rope_type", "default")) if isinstance(scaling, dict) else None
    if kind in (None, "default"):
        model.config.rope_scaling = None
        long_factor = short_factor = None
    else:
        model.config.rope_scaling = {**scaling, "type": kind}
        long_factor, short_factor = scaling.get("long_factor"), scaling.get("short_factor")
    for layer in model.model.layers:
        if not hasattr(layer.self_attn, "rotary_emb"):
            layer.self_attn.rotary_emb = SimpleNamespace(long_factor=long_factor, short_factor=short_factor)


def _Converter(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (a class, made when first used)
    return _converter_class()(*args, **kwargs)


def check_output(output_dir: Path, quantization: str, force: bool) -> Path:
    """Refuse, before any work, what a model build or conversion must not do to ``output_dir``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} exists; pass force=True (--force) to replace it")
    refuse_to_replace(output_dir)
    return output_dir


@contextmanager
def staged(output_dir: Path) -> Iterator[Path]:
    """A model directory to fill, beside ``output_dir``, moved into its place when the block ends
    without an error: a failed or interrupted build never leaves half a model behind."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        (staging / "model").mkdir()
        yield staging / "model"
        if output_dir.exists():
            shutil.rmtree(output_dir)
        (staging / "model").rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_metadata(model_dir: Path, **fields: object) -> None:
    """What ``read_metadata`` gives back: where the weights came from, their shape and quantization."""
    metadata = {**fields, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def refuse_to_replace(output_dir: Path) -> None:
    """Raise unless ``output_dir`` is absent, empty or a model directory: replacing it (``--force``)
    must never delete anything else, whatever path it was given."""
    if not output_dir.exists() and not output_dir.is_symlink():
        return
    if output_dir.is_symlink() or not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a model directory; not replacing it")
    if any(output_dir.iterdir()) and not (output_dir / "model.bin").is_file():
        raise FileExistsError(f"{output_dir} is not a model directory (no model.bin); not replacing it")


def read_metadata(model_dir: Path) -> dict[str, object]:
    """What ``convert_checkpoint`` recorded about a model directory (empty if nothing)."""
    path = Path(model_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_checkpoint(source: str | Path) -> dict[str, Any]:
    """What a checkpoint says about itself, as ``core.registry.ModelSpec`` fields: ``family``,
    ``chat`` and ``chat_template`` (its tokenizer's template; none makes it a base model),
    ``special_tokens`` (what the template reads), ``add_bos`` (whether its tokenizer starts a
    text with BOS), ``stop_token_ids`` (generation_config's ``eos_token_id``, one or several, and
    the tokenizer's EOS), ``context_length`` (within the sliding window, if any),
    ``system_prompt`` (whether the template takes a system message) and
    ``defaults`` (generation_config's sampling settings)."""
    from transformers import AutoConfig, AutoTokenizer

    from core.templates import ChatTemplate, ChatTemplateError, compile_template

    config = AutoConfig.from_pretrained(str(source))
    check_family(config.model_type, source)
    text_config = getattr(config, "text_config", None) or config
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    generation = _generation_config(Path(source))

    context = int(getattr(text_config, "max_position_embeddings", None) or 4096)
    # A sliding-window model is served within its window. CTranslate2 4.8 does not convert Gemma
    # 2's or Qwen's window at all; for Gemma 3's it does, but a forward pass (log probabilities,
    # scoring) longer than the window fails, and a static prompt longer than it corrupted memory
    # (a "double free" abort, measured here).
    window = getattr(text_config, "sliding_window", None)
    if window and getattr(text_config, "use_sliding_window", True) and window < context:
        context = int(window)
    eos = generation.get("eos_token_id", getattr(text_config, "eos_token_id", None))
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one chats
        template = template.get("default")
    template = template if isinstance(template, str) else None
    if template is not None:
        try:
            compile_template(template)
        except ChatTemplateError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and tokenizer("x").input_ids[:1] == [bos]
    system_prompt = True
    if template is not None:
        try:
            ChatTemplate(template, special, ()).render([{"role": "system", "content": "s"},
                                                        {"role": "user", "content": "u"}])
        except ChatTemplateError:
            system_prompt = False
    defaults: dict[str, Any] = {}
    if generation.get("do_sample"):
        defaults = {ours: generation[theirs] for theirs, ours in _SAMPLING.items() if generation.get(theirs) is not None}
    elif generation.get("do_sample") is False:
        defaults = {"temperature": 0.0}
    defaults = {name: value for name, value in defaults.items() if _valid_param(name, value)}
    return {"family": config.model_type, "chat": template is not None, "chat_template": template,
            "special_tokens": special, "add_bos": add_bos, "stop_token_ids": tuple(int(i) for i in stops),
            "context_length": context, "system_prompt": system_prompt, "defaults": defaults}


def _valid_param(name: str, value: Any) -> bool:
    """Whether a request could set ``name`` to ``value``: a default no request could ask for
    (``top_k: 2000``) would make every request of the model invalid, so it is left out."""
    from pydantic import ValidationError

    from core.schemas import GenerationParams

    try:
        GenerationParams.model_validate({name: value})
    except ValidationError:
        log.warning("generation_config.json's %s=%r is outside what a request may ask; not a default", name, value)
        return False
    return True


def _generation_config(source: Path) -> dict[str, Any]:
    path = source / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
