import json

import pytest

from core.errors import UnknownModelError
from core.registry import ModelSpec, load_registry, register_model
from core.settings import Settings


@pytest.fixture
def s(tmp_path):
    return Settings.from_env({}, var_dir=tmp_path)


LLAMA2 = ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
          "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-70b-chat-hf"]


def test_builtin_entries_cover_llama2_and_demo(s):
    reg = load_registry(s)
    names = {spec.name for spec in reg}
    assert set(LLAMA2) | {"demo"} <= names
    for name in LLAMA2:
        spec = reg.resolve(name)
        assert spec.context_length == 4096 and spec.chat == ("chat" in name)
    assert reg.resolve("demo").chat


@pytest.mark.parametrize("alias,name", [
    ("llama2-7b-chat-v2", "meta-llama/Llama-2-7b-chat-hf"),
    ("llama2-13b-chat-v2", "meta-llama/Llama-2-13b-chat-hf"),
    ("llama2-7b-v2", "meta-llama/Llama-2-7b-hf"),
    ("llama2-13b-v2", "meta-llama/Llama-2-13b-hf"),
])
def test_dashscope_aliases_resolve(s, alias, name):
    assert load_registry(s).resolve(alias).name == name


def test_unknown_model_lists_what_exists(s):
    with pytest.raises(UnknownModelError) as err:
        load_registry(s).resolve("gpt-5")
    assert "demo" in err.value.details["available"]


def test_registry_file_adds_and_overrides(s, tmp_path):
    register_model(s, ModelSpec(name="mine", path="/models/mine", chat=False, aliases=("m",)))
    register_model(s, ModelSpec(name="demo", path="elsewhere", chat=True, context_length=2048))
    reg = load_registry(s)
    assert reg.resolve("m").name == "mine" and str(reg.directory(reg.resolve("m"))) == "/models/mine"
    assert reg.resolve("demo").context_length == 2048
    assert reg.directory(reg.resolve("demo")) == s.models_dir / "elsewhere"
    data = json.loads((tmp_path / "models.json").read_text())
    assert sorted(e["name"] for e in data["models"]) == ["demo", "mine"]


def test_installed_means_a_ctranslate2_model_is_there(s):
    reg = load_registry(s)
    spec = reg.resolve("demo")
    assert not reg.is_installed(spec)
    reg.directory(spec).mkdir(parents=True)
    (reg.directory(spec) / "model.bin").write_bytes(b"x")
    assert reg.is_installed(spec)


def test_model_defaults_cannot_ask_for_samples_or_log_probabilities():
    import pytest
    from pydantic import ValidationError

    from core.registry import ModelSpec

    with pytest.raises(ValidationError, match="defaults may not set best_of, n"):
        ModelSpec(name="m", path="p", defaults={"n": 2, "best_of": 3, "temperature": 0.5})
    assert ModelSpec(name="m", path="p", defaults={"temperature": 0.5}).defaults == {"temperature": 0.5}
