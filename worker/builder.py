"""Small Llama-architecture models with random weights, for development, tests and benchmarks.

No weights can be downloaded here, so the builder makes its own checkpoint exactly as a real one
looks: a BPE tokenizer with byte fallback trained on local text (Python's bundled documentation),
wrapped as the Llama tokenizer, and a ``LlamaForCausalLM`` with random weights saved by
transformers. It then goes through ``convert_checkpoint``, the same path as
``meta-llama/Llama-2-7b-chat-hf``. Outputs of random weights are gibberish.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.convert import convert_checkpoint

log = logging.getLogger("batchgen.builder")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

# Shapes: grouped-query attention everywhere (num_key_value_heads < num_attention_heads).
PRESETS: dict[str, dict[str, int]] = {
    # Seconds to build; for tests.
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 172,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    # The `demo` model of `make run`: a few seconds to build, fast on a laptop.
    "demo": {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688,
             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4},
    # ~82M parameters: the CPU benchmark model.
    "bench": {"vocab_size": 4096, "hidden_size": 768, "intermediate_size": 2048,
              "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4},
    # Llama-2-7B's shape (6.7B parameters), for GPU benchmarks only.
    "llama-2-7b-shape": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                         "num_hidden_layers": 32, "num_attention_heads": 32,
                         "num_key_value_heads": 32},
}


def training_corpus() -> list[str]:
    """English text that ships with every Python: the documentation topics of ``pydoc``."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def train_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    """A Llama-style BPE tokenizer (Metaspace, byte fallback) as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 16:
        raise ValueError("vocab_size is too small for the special and byte tokens")
    def configure(tok: Tokenizer) -> Tokenizer:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return tok

    # The trainer places tokens it is given first, so the specials get ids 0-2 and the byte
    # tokens 3-258 as in Llama-2; but it also marks them all special, and decoding with
    # skip_special_tokens would then drop every byte. Rebuild the model from the trained vocab
    # and merges with only <unk>, <s>, </s> special, as Llama-2's tokenizer has it.
    trained = configure(Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True)))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
                                  show_progress=False)
    trained.train_from_iterator(training_corpus(), trainer)
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = configure(Tokenizer(models.BPE(vocab=model["vocab"], merges=merges, byte_fallback=True,
                                         unk_token="<unk>", fuse_unk=True)))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", add_bos_token=True, add_eos_token=False)


def build_checkpoint(checkpoint_dir: Path, *, preset: str = "demo", seed: int = 0,
                     context_length: int = 4096, overrides: dict[str, Any] | None = None) -> Path:
    """Write a Hugging Face Llama checkpoint with random weights and a trained tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**PRESETS[preset], **(overrides or {})}
    tokenizer = train_tokenizer(shape["vocab_size"])
    config = LlamaConfig(**shape, max_position_embeddings=context_length, rms_norm_eps=1e-5,
                         rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    dtype = torch.float16 if shape["hidden_size"] >= 2048 else torch.float32
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(checkpoint_dir))
    tokenizer.save_pretrained(str(checkpoint_dir))
    return checkpoint_dir


def build_model(output_dir: Path, *, preset: str = "demo", seed: int = 0, context_length: int = 4096,
                quantization: str = "int8", keep_checkpoint: Path | None = None,
                force: bool = False) -> Path:
    """Build a random-weight checkpoint and convert it to a CTranslate2 model in ``output_dir``.

    ``keep_checkpoint`` keeps the transformers checkpoint there (the benchmark's PyTorch baseline
    runs on it); otherwise it lives in a temporary directory.
    """
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="batchgen-build-"))
    try:
        checkpoint = keep_checkpoint or workdir / "checkpoint"
        build_checkpoint(checkpoint, preset=preset, seed=seed, context_length=context_length)
        convert_checkpoint(checkpoint, output_dir, quantization=quantization, force=force,
                           low_memory=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("built %s model in %s in %.1fs", preset, output_dir, time.monotonic() - started)
    return output_dir
