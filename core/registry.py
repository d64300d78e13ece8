"""The model registry: model name -> directory, chat or base, context length, defaults, aliases.

Built-in entries cover the six Llama-2 checkpoints (by their Hugging Face ids), their
DashScope-style aliases and the locally built ``demo`` model. A JSON registry file
(``BATCHGEN_REGISTRY_FILE``, default ``var/models.json``) adds entries or overrides built-in ones;
``batchgen convert`` writes to it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import UnknownModelError
from core.settings import Settings

# A model name: a bare name or a hub-style "org/name", each part starting with a letter or digit,
# so that no name can be "", ".", ".." or reach outside the models directory as a path.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?$")


def check_model_name(name: str) -> str:
    """``name`` if it can name a model (and a directory under the models directory); else ValueError."""
    if not _MODEL_NAME.match(name):
        raise ValueError(f"{name!r} cannot name a model: use letters, digits, '.', '_' and '-', optionally "
                         "as org/name, each part starting with a letter or digit")
    return name


def default_directory(models_dir: Path, name: str) -> Path:
    """Where a model named ``name`` is written by default: a directory strictly inside
    ``models_dir`` (``org/name`` becomes ``org--name``)."""
    out = (models_dir / check_model_name(name).replace("/", "--")).resolve()
    if out.parent != models_dir.resolve():
        raise ValueError(f"{name!r} would be written outside {models_dir}")
    return out


# Meta's generation_config.json for every Llama-2 checkpoint samples with these.
LLAMA2_DEFAULTS: dict[str, Any] = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 256}


class ModelSpec(BaseModel):
    """One servable model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    path: str = Field(min_length=1, description="Model directory, absolute or under models_dir.")
    chat: bool = False
    context_length: int = Field(default=4096, ge=16)
    defaults: dict[str, Any] = Field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    source: str | None = Field(default=None, description="Checkpoint it is converted from.")
    description: str = ""
    # What a converted checkpoint says about itself (``worker.convert.read_checkpoint``). The
    # defaults describe Llama-2 as Meta ships it, so the built-in entries and older registry
    # files read as before.
    family: str = Field(default="llama", description="The checkpoint's model_type.")
    chat_template: str | None = Field(default=None, description="The checkpoint's own chat template (Jinja); "
                                      "none on a chat model means Llama-2's reference format.")
    special_tokens: dict[str, str] = Field(default_factory=dict, description="bos_token, eos_token, ... as the "
                                           "chat template reads them.")
    add_bos: bool = Field(default=True, description="A raw prompt starts with the BOS token.")
    stop_token_ids: tuple[int, ...] = Field(default=(), description="Token ids that end a generation (the "
                                            "checkpoint's end-of-turn ids); none means the tokenizer's EOS.")
    system_prompt: bool = Field(default=True, description="The chat format takes a system prompt.")

    @model_validator(mode="after")
    def _template_is_chat(self) -> ModelSpec:
        if self.chat_template is not None and not self.chat:
            raise ValueError("a model with a chat template is a chat model (chat: true)")
        return self

    @field_validator("defaults")
    @classmethod
    def _sampling_defaults_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        # What a request asks for (samples, log probabilities, echo) is never a model's default:
        # DashScope and PAI-EAS answer one text and cannot ask for it, yet would pay for it.
        per_request = sorted(set(value) & {"n", "best_of", "logprobs", "top_logprobs", "echo", "mode", "delivery"})
        if per_request:
            raise ValueError(f"defaults may not set {', '.join(per_request)}: each request asks for that itself")
        return value

    def directory(self, models_dir: Path) -> Path:
        """Absolute model directory."""
        path = Path(self.path)
        return path if path.is_absolute() else models_dir / path


def _llama2(size: str, chat: bool, aliases: Iterable[str]) -> ModelSpec:
    suffix = "-chat-hf" if chat else "-hf"
    hf_id = f"meta-llama/Llama-2-{size}{suffix}"
    return ModelSpec(
        name=hf_id,
        path=f"llama-2-{size}{'-chat' if chat else ''}-ct2-int8",
        chat=chat,
        context_length=4096,
        defaults=LLAMA2_DEFAULTS,
        aliases=tuple(aliases),
        source=hf_id,
        description=f"Llama-2 {size.upper()} {'chat' if chat else 'base'}, CTranslate2 int8",
    )


BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="demo",
        path="demo",
        chat=True,
        context_length=4096,
        defaults={"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 64},
        description="Small Llama-architecture model with random weights, built locally (gibberish output).",
    ),
    _llama2("7b", False, ["llama2-7b-v2"]),
    _llama2("13b", False, ["llama2-13b-v2"]),
    _llama2("70b", False, []),
    _llama2("7b", True, ["llama2-7b-chat-v2"]),
    _llama2("13b", True, ["llama2-13b-chat-v2"]),
    _llama2("70b", True, []),
)


class Registry:
    """Look-up of models by canonical name or alias."""

    def __init__(self, specs: Iterable[ModelSpec], models_dir: Path) -> None:
        self.models_dir = models_dir
        self._by_name: dict[str, ModelSpec] = {}
        for spec in specs:  # later entries override earlier ones of the same name
            self._by_name[spec.name] = spec
        self._by_alias: dict[str, str] = {}
        for spec in self._by_name.values():
            for alias in spec.aliases:
                self._by_alias[alias] = spec.name

    def resolve(self, name: str) -> ModelSpec:
        """The spec for ``name`` (a canonical name or an alias); raises ``UnknownModelError``."""
        spec = self._by_name.get(name) or self._by_name.get(self._by_alias.get(name, ""))
        if spec is None:
            raise UnknownModelError(
                f"unknown model {name!r}",
                details={"available": sorted([*self._by_name, *self._by_alias])},
            )
        return spec

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    def directory(self, spec: ModelSpec) -> Path:
        """Absolute directory of a model's files."""
        return spec.directory(self.models_dir)

    def is_installed(self, spec: ModelSpec) -> bool:
        """True when the model directory holds a CTranslate2 model."""
        return (self.directory(spec) / "model.bin").is_file()


def registry_path(settings: Settings) -> Path:
    """The registry file this deployment reads (and ``convert`` writes)."""
    return settings.registry_file or settings.var_dir / "models.json"


def _read_file(path: Path) -> list[ModelSpec]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [ModelSpec.model_validate(entry) for entry in data.get("models", [])]


def load_registry(settings: Settings) -> Registry:
    """Built-in entries plus those of the registry file."""
    return Registry([*BUILTIN_MODELS, *_read_file(registry_path(settings))], settings.models_dir)


def register_model(settings: Settings, spec: ModelSpec) -> Path:
    """Add or replace ``spec`` in the registry file, atomically; returns the file's path."""
    path = registry_path(settings)
    entries = [e for e in _read_file(path) if e.name != spec.name]
    entries.append(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"models": [e.model_dump(mode="json") for e in entries]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".models.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)
    return path
