"""The operator commands: convert registers a model that the registry and the API then know."""

import json

import pytest

from cli.main import main
from worker.builder import build_checkpoint


@pytest.fixture
def var(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_VAR_DIR", str(tmp_path / "var"))
    for name in ("BATCHGEN_REGISTRY_FILE", "BATCHGEN_MODELS_DIR", "BATCHGEN_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "var"


def test_convert_writes_the_model_and_registers_it(var, tmp_path, capsys):
    checkpoint = build_checkpoint(tmp_path / "Llama-tiny-chat-hf", preset="tiny")
    assert main(["convert", str(checkpoint), "--name", "acme/llama-tiny-chat"]) == 0
    out = var / "models" / "acme--llama-tiny-chat"
    assert (out / "model.bin").is_file() and (out / "tokenizer.json").is_file()
    entry = json.loads((var / "models.json").read_text())["models"][0]
    assert entry["name"] == "acme/llama-tiny-chat" and entry["chat"] is True and entry["path"] == str(out)
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "acme/llama-tiny-chat" in listing and "installed" in listing


def test_convert_into_a_builtin_entry_keeps_its_aliases_and_defaults(var, tmp_path):
    checkpoint = build_checkpoint(tmp_path / "ckpt", preset="tiny")
    assert main(["convert", str(checkpoint), "--name", "meta-llama/Llama-2-7b-chat-hf"]) == 0
    from core.registry import load_registry
    from core.settings import Settings

    registry = load_registry(Settings.from_env())
    spec = registry.resolve("llama2-7b-chat-v2")
    assert spec.name == "meta-llama/Llama-2-7b-chat-hf" and registry.is_installed(spec)
    assert spec.defaults["temperature"] == 0.6 and spec.context_length == 4096


def test_migrate_brings_a_fresh_database_to_head(var, capsys):
    assert main(["migrate"]) == 0
    assert "database at head" in capsys.readouterr().out
    assert (var / "batchgen.db").is_file()
