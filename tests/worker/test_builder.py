"""The random-weight builder: the model `make run` serves is built without PyTorch, and it is the
same kind of model directory the real converter writes from a transformers checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.builder import build_checkpoint
from worker.convert import convert_checkpoint, read_metadata

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter where importing torch fails, as on a machine without it.
WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from pathlib import Path
from worker.builder import build_model
build_model(Path(sys.argv[1]), preset="tiny", seed=5, context_length=512)
assert "torch" not in {name.split(".")[0] for name, mod in sys.modules.items() if mod is not None}
"""


@pytest.mark.slow  # the converter's side needs PyTorch
def test_the_model_is_built_without_pytorch_and_matches_what_the_converter_writes(tmp_path):
    import ctranslate2
    from transformers import AutoTokenizer

    built = tmp_path / "built"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(built)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    converted = convert_checkpoint(build_checkpoint(tmp_path / "hf", preset="tiny", seed=5, context_length=512),
                                   tmp_path / "converted", quantization="int8", low_memory=False)
    # The same files, the same CTranslate2 configuration and vocabulary, the same tokenizer.
    assert {p.name for p in built.iterdir()} == {p.name for p in converted.iterdir()}
    for name in ("config.json", "vocabulary.json", "tokenizer.json"):
        assert json.loads((built / name).read_text()) == json.loads((converted / name).read_text()), name
    assert read_metadata(built)["context_length"] == 512 and read_metadata(built)["quantization"] == "int8"
    # The same weights' names, shapes and types: CTranslate2 loads both, and they differ only in values.
    a, b = ctranslate2.Generator(str(built)), ctranslate2.Generator(str(converted))
    assert abs((built / "model.bin").stat().st_size - (converted / "model.bin").stat().st_size) < 1024

    tok = AutoTokenizer.from_pretrained(str(built))

    def continuation(generator, text: str) -> list[int]:  # type: ignore[no-untyped-def]
        prompt = tok.convert_ids_to_tokens(tok(text).input_ids)
        return generator.generate_batch([prompt], max_length=8, min_length=8, sampling_topk=1,
                                        include_prompt_in_result=False)[0].sequences_ids[0]

    for generator in (a, b):
        out = continuation(generator, "The quick brown fox")
        assert len(out) == 8 and all(0 <= i < 512 for i in out)
    # Random weights, but not degenerate ones: different prompts lead to different continuations.
    assert continuation(a, "The quick brown fox") != continuation(a, "import os")
