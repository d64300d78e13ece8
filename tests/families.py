"""Tiny random-weight checkpoints of the open model families, built as a user's download looks.

Each family has a config written here, a tokenizer trained here on the same corpus as the demo
model (byte-level BPE for Llama 3 and Qwen, SentencePiece-style BPE with byte fallback for
Mistral, Gemma and Phi-3), the special tokens the family's tokenizer has, and a chat template in
the family's documented format. ``build`` saves model, tokenizer (with the template) and
``generation_config.json`` to a directory, as ``huggingface-cli download`` leaves one. PyTorch
and transformers are needed, so only tests use this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.builder import training_corpus

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN2_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\n') %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if "
    "loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2}


@dataclass(frozen=True)
class Family:
    """One family's tiny checkpoint: how to build it and what its download says."""

    name: str  # model_type
    architecture: str  # the transformers class
    config: dict[str, Any]
    byte_level: bool  # byte-level BPE (Llama 3, Qwen) or SentencePiece-style with byte fallback
    specials: list[str]  # special tokens, in id order after the trained vocabulary
    roles: dict[str, str | None]  # bos_token, eos_token, unk_token, pad_token
    add_bos: bool
    template: str | None
    eos: list[str]  # generation_config's eos_token_id, as tokens: the end-of-turn tokens
    system: bool = True  # the template takes a system message
    vocab_size: int = 700  # trained tokens; the config's vocab_size may be larger (padded)
    extra: dict[str, Any] = field(default_factory=dict)
    config_class: str = ""  # default: the architecture's name with Config for ForCausalLM


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", {**_SHAPE, "vocab_size": 128256, "rope_theta": 500000.0},
           byte_level=True, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"],
           roles={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, add_bos=True,
           template=LLAMA3_TEMPLATE, eos=["<|end_of_text|>", "<|eot_id|>"]),
    Family("mistral", "MistralForCausalLM", {**_SHAPE, "sliding_window": 4096},
           byte_level=False, specials=["<unk>", "<s>", "</s>"],
           roles={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, add_bos=True,
           template=MISTRAL_TEMPLATE, eos=["</s>"], system=False),
    Family("qwen2", "Qwen2ForCausalLM", {**_SHAPE, "use_sliding_window": False},
           byte_level=True, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           roles={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, add_bos=False,
           template=QWEN2_TEMPLATE, eos=["<|im_end|>", "<|endoftext|>"]),
    Family("qwen3", "Qwen3ForCausalLM", {**_SHAPE, "head_dim": 16},
           byte_level=True, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           roles={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, add_bos=False,
           template=QWEN3_TEMPLATE, eos=["<|im_end|>", "<|endoftext|>"], extra={"added": ["<think>", "</think>"]}),
    Family("gemma2", "Gemma2ForCausalLM", {**_SHAPE, "head_dim": 16, "sliding_window": 256,
                                           "query_pre_attn_scalar": 16},
           byte_level=False, specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           roles={"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
           add_bos=True, template=GEMMA2_TEMPLATE, eos=["<eos>", "<end_of_turn>"], system=False),
    Family("gemma3_text", "Gemma3ForCausalLM", {**_SHAPE, "head_dim": 16, "sliding_window": 256,
                                                "query_pre_attn_scalar": 16, "layer_types": ["sliding_attention",
                                                                                             "full_attention"]},
           byte_level=False, specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           roles={"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
           add_bos=True, template=GEMMA3_TEMPLATE, eos=["<eos>", "<end_of_turn>"], config_class="Gemma3TextConfig"),
    Family("phi3", "Phi3ForCausalLM", {**_SHAPE, "pad_token_id": 0},
           byte_level=False, specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>",
                                       "<|system|>", "<|user|>"],
           roles={"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}, add_bos=True,
           template=PHI3_TEMPLATE, eos=["<|endoftext|>", "<|end|>", "<|assistant|>"]),
)}


def _tokenizer(family: Family):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family.byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=family.vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=family.vocab_size, show_progress=False,
                                      special_tokens=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(training_corpus(), trainer)
    if not family.byte_level:
        # The trainer marks the byte tokens it was given special, and decoding with
        # skip_special_tokens would drop them: rebuild the model from the trained vocabulary.
        trained = json.loads(tok.to_str())["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        rebuilt = Tokenizer(models.BPE(vocab=trained["vocab"], merges=merges, byte_fallback=True))
        rebuilt.pre_tokenizer, rebuilt.decoder = tok.pre_tokenizer, tok.decoder
        tok = rebuilt
    tok.add_special_tokens(family.specials)
    tok.add_tokens(family.extra.get("added", []))
    bos = family.roles.get("bos_token")
    if family.add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in family.roles.items() if v})
    if family.template is not None:
        wrapped.chat_template = family.template
    return wrapped


def build(family: Family, directory: Path, *, seed: int = 0, lm_head_edit: dict[int, int] | None = None) -> Path:
    """Write ``family``'s checkpoint to ``directory``: float32 weights, the tokenizer with its chat
    template, generation_config.json. ``lm_head_edit`` {to: from} makes output row ``to`` ten
    times row ``from`` (so the model says ``to`` where it would have said ``from``)."""
    import torch
    import transformers

    tokenizer = _tokenizer(family)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in family.specials}
    config_class = getattr(transformers, family.config_class or family.architecture.replace("ForCausalLM", "Config"))
    vocab = max(family.config.get("vocab_size", 0), len(tokenizer))
    bos = family.roles.get("bos_token")
    config = config_class(**{**family.config, "vocab_size": vocab}, max_position_embeddings=1024,
                          bos_token_id=ids.get(bos) if bos else None, eos_token_id=[ids[t] for t in family.eos],
                          tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = getattr(transformers, family.architecture)(config).to(torch.float32).eval()
    with torch.no_grad():
        # Ids past the tokenizer's (a vocabulary padded to Llama 3's 128,256) are never said, as
        # Llama 3's untrained reserved tokens are not: their output rows are zero.
        model.lm_head.weight[len(tokenizer):] = 0
        for target, source in (lm_head_edit or {}).items():
            model.lm_head.weight[target] = 10 * model.lm_head.weight[source]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids.get(bos) if bos else None, "eos_token_id": [ids[t] for t in family.eos],
        "do_sample": True, "temperature": 0.7, "top_p": 0.8}))
    return directory
