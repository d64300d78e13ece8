"""Hugging Face Llama checkpoint -> CTranslate2 model directory (the path every model takes).

A real ``meta-llama/Llama-2-7b-chat-hf`` (a local directory or, where the hub is reachable, its
id) and the small models of ``worker.builder`` go through the same function: CTranslate2's own
``TransformersConverter`` writes ``model.bin``/``config.json``/``vocabulary.json`` quantized as
asked, and the checkpoint's tokenizer is saved alongside so the worker tokenizes exactly as the
model was trained.
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

log = logging.getLogger("batchgen.convert")

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
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(source))
    if config.model_type != "llama":
        raise ValueError(f"{source} is a {config.model_type!r} checkpoint; batchgen serves Llama models")

    started = time.monotonic()
    with staged(output_dir) as model_dir:
        converter = TransformersConverter(str(source), load_as_float16=low_memory,
                                          low_cpu_mem_usage=low_memory)
        converter.convert(str(model_dir), quantization=quantization, force=True)
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(model_dir))
        write_metadata(model_dir, source=str(source), quantization=quantization,
                       context_length=getattr(config, "max_position_embeddings", None),
                       vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       num_hidden_layers=config.num_hidden_layers)
    log.info("converted %s to %s (%s) in %.1fs", source, output_dir, quantization,
             time.monotonic() - started)
    return output_dir


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
