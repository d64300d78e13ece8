"""Small Llama-architecture models with random weights, for development, tests and benchmarks.

No weights can be downloaded here, so the builder makes its own: a BPE tokenizer with byte
fallback trained on local text (Python's bundled documentation), wrapped as the Llama tokenizer,
and random weights of a Llama shape. Outputs of random weights are gibberish.

Two ways, one shape:

- ``build_model`` (what ``batchgen build-model`` and ``make run`` use) needs no PyTorch: numpy
  draws the weights and CTranslate2's own model specification (``TransformerDecoderModelSpec``,
  filled the way CTranslate2's Llama converter fills it) writes the model directory.
- ``build_checkpoint`` writes a Hugging Face ``LlamaForCausalLM`` checkpoint with PyTorch (the
  ``convert`` extra); it then goes through ``convert_checkpoint``, the same path as
  ``meta-llama/Llama-2-7b-chat-hf``. Tests that compare CTranslate2 with transformers, and the
  benchmark's transformers row, use it.
"""

from __future__ import annotations

import json
import logging
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
    # Llama 3's vocabulary (128,256 tokens) on the tiny body: what log probabilities and the
    # tokenizer routes cost with a large vocabulary, for tests.
    "tiny-wide": {"vocab_size": 128256, "hidden_size": 64, "intermediate_size": 172,
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


def model_spec(shape: dict[str, int], tokens: list[str], *, seed: int = 0):  # type: ignore[no-untyped-def]
    """A CTranslate2 Llama decoder specification with random weights drawn by numpy.

    Filled as CTranslate2's ``LlamaLoader`` fills it from a ``LlamaForCausalLM``: pre-norm RMSNorm
    layers, SwiGLU feed-forward (``linear_0`` gate, ``linear_0_noact`` up, ``linear_1`` down),
    rotary embeddings over the whole head, fused query/key/value projection, grouped-query
    attention, no biases. Weights ~ N(0, 0.02), norms 1: what transformers initialises.
    """
    import numpy as np
    from ctranslate2.specs import common_spec, transformer_spec

    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    hidden, inner, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = hidden // heads
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        shape["num_hidden_layers"], heads, activation=common_spec.Activation.SWISH, pre_norm=True,
        ffn_glu=True, rms_norm=True, rotary_dim=0, rotary_interleave=False, rotary_base=10000.0,
        num_heads_kv=None if kv_heads == heads else kv_heads)
    rng = np.random.default_rng(seed)
    dtype = np.float16 if hidden >= 2048 else np.float32

    def normal(rows: int, cols: int):  # type: ignore[no-untyped-def]
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)

    def ones():  # type: ignore[no-untyped-def]
        return np.ones(hidden, dtype=dtype)

    decoder = spec.decoder
    decoder.scale_embeddings = False
    decoder.embeddings.weight = normal(vocab, hidden)
    decoder.layer_norm.gamma = ones()
    for layer in decoder.layer:
        layer.self_attention.layer_norm.gamma = ones()
        layer.self_attention.linear[0].weight = normal((heads + 2 * kv_heads) * head_dim, hidden)
        layer.self_attention.linear[1].weight = normal(hidden, hidden)
        layer.ffn.layer_norm.gamma = ones()
        layer.ffn.linear_0.weight = normal(inner, hidden)
        layer.ffn.linear_0_noact.weight = normal(inner, hidden)
        layer.ffn.linear_1.weight = normal(hidden, inner)
    decoder.projection.weight = normal(vocab, hidden)
    spec.register_vocabulary(tokens)
    spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = "<s>", "</s>", "<unk>"
    spec.config.layer_norm_epsilon = 1e-5
    return spec


def write_model(output_dir: Path, *, preset: str = "demo", seed: int = 0, context_length: int = 4096,
                quantization: str = "int8", force: bool = False) -> Path:
    """Write a random-weight CTranslate2 model and its tokenizer to ``output_dir``, without PyTorch.

    Written to a temporary directory beside ``output_dir`` and moved into place at the end, as a
    conversion is: an interrupted build leaves no half model."""
    from transformers import AutoTokenizer

    from worker.convert import check_output, staged, write_metadata

    output_dir = check_output(output_dir, quantization, force)
    shape = PRESETS[preset]
    tokenizer = train_tokenizer(shape["vocab_size"])
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    tokens += [f"<extra_id_{i}>" for i in range(shape["vocab_size"] - len(tokens))]
    spec = model_spec(shape, tokens[:shape["vocab_size"]], seed=seed)
    spec.validate()
    spec.optimize(quantization=quantization)
    with staged(output_dir) as model_dir, tempfile.TemporaryDirectory() as scratch:
        spec.save(str(model_dir))
        # Saved, loaded and saved again, as ``convert_checkpoint`` saves a checkpoint's tokenizer:
        # loading normalises it (Llama's Metaspace without splitting), so both paths tokenize alike.
        tokenizer.save_pretrained(scratch)
        AutoTokenizer.from_pretrained(scratch).save_pretrained(str(model_dir))
        write_metadata(model_dir, source=f"random weights, preset {preset}, seed {seed}",
                       quantization=quantization, context_length=context_length,
                       **{k: shape[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")})
    return output_dir


def build_model(output_dir: Path, *, preset: str = "demo", seed: int = 0, context_length: int = 4096,
                quantization: str = "int8", keep_checkpoint: Path | None = None,
                force: bool = False) -> Path:
    """Build a random-weight CTranslate2 model in ``output_dir``.

    Without ``keep_checkpoint`` no PyTorch is needed (``write_model``). With it, the weights are a
    transformers checkpoint kept there (the benchmark's PyTorch baseline runs on it), converted by
    ``convert_checkpoint``.
    """
    started = time.monotonic()
    if keep_checkpoint is None:
        write_model(output_dir, preset=preset, seed=seed, context_length=context_length,
                    quantization=quantization, force=force)
    else:
        build_checkpoint(keep_checkpoint, preset=preset, seed=seed, context_length=context_length)
        convert_checkpoint(keep_checkpoint, output_dir, quantization=quantization, force=force,
                           low_memory=False)
    log.info("built %s model in %s in %.1fs", preset, output_dir, time.monotonic() - started)
    return output_dir
