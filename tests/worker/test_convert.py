"""Conversion through CTranslate2's real converter, checked against transformers itself."""

import json

import pytest

pytestmark = pytest.mark.slow  # PyTorch and transformers build and run the checkpoint

from worker.builder import build_checkpoint
from worker.convert import convert_checkpoint, read_metadata


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", preset="tiny", seed=3, context_length=512)


def test_float32_conversion_generates_what_transformers_generates(checkpoint, tmp_path):
    import ctranslate2
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = convert_checkpoint(checkpoint, tmp_path / "ct2", quantization="float32", low_memory=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("def main(): return", return_tensors="pt").input_ids
    hf = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, ids.shape[1]:].tolist()
    gen = ctranslate2.Generator(str(out), compute_type="float32")
    got = gen.generate_batch([tok.convert_ids_to_tokens(ids[0].tolist())], max_length=12, min_length=12,
                             sampling_topk=1, include_prompt_in_result=False)[0].sequences_ids[0]
    # Neither may stop at EOS before 12 tokens: the whole greedy continuation, token for token.
    assert len(expected) == 12 and got == expected


def test_int8_conversion_writes_a_complete_model_directory(checkpoint, tmp_path):
    out = convert_checkpoint(checkpoint, tmp_path / "int8", quantization="int8", low_memory=False)
    names = {p.name for p in out.iterdir()}
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json", "batchgen-model.json"} <= names
    meta = read_metadata(out)
    assert meta["quantization"] == "int8" and meta["context_length"] == 512
    assert len(json.loads((out / "vocabulary.json").read_text())) == 512
    assert not list(tmp_path.glob(".int8.*")), "no staging directory is left behind"


def test_existing_output_is_not_replaced_without_force(checkpoint, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        convert_checkpoint(checkpoint, tmp_path / "taken")
    with pytest.raises(ValueError):
        convert_checkpoint(checkpoint, tmp_path / "x", quantization="int3")
