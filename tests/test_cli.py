"""The operator commands: convert registers a model that the registry and the API then know."""

import json
import logging
import sys

import pytest

from cli.main import main
from worker.builder import build_checkpoint


@pytest.fixture
def var(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_VAR_DIR", str(tmp_path / "var"))
    for name in ("BATCHGEN_REGISTRY_FILE", "BATCHGEN_MODELS_DIR", "BATCHGEN_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # Commands configure logging onto this test's (captured) stderr: put it back afterwards.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield tmp_path / "var"
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.slow  # PyTorch builds the checkpoint it converts
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


def test_keys_create_list_revoke(var, capsys):
    from core.auth import authenticate
    from core.db import Database
    from core.settings import Settings

    main(["migrate"])
    capsys.readouterr()
    assert main(["keys", "create", "--owner", "alice", "--name", "laptop"]) == 0
    out = capsys.readouterr().out
    token = out.strip().splitlines()[-1]
    key_id = token.split(".")[0]
    assert key_id in out and "shown only now" in out
    main(["keys", "list"])
    listing = capsys.readouterr().out
    assert key_id in listing and "alice" in listing and "active" in listing and token.split(".")[1] not in listing
    assert main(["keys", "revoke", key_id]) == 0
    db = Database(Settings.from_env().database_url)
    with db.read() as s:
        assert authenticate(session=s, token=token) is None
    db.dispose()
    with pytest.raises(SystemExit, match="no key"):
        main(["keys", "revoke", "key_01m8cp8t2p02217t3hc9c42h9x"])


def test_make_run_dev_key_is_created_once_private_and_replaced_when_stale(var):
    from cli.up import ensure_dev_key
    from core.db import upgrade
    from core.settings import Settings

    settings = Settings.from_env()
    upgrade(settings.database_url)
    token, new = ensure_dev_key(settings)
    path = var / "dev-api-key"
    assert new and path.read_text().strip() == token and (path.stat().st_mode & 0o777) == 0o600
    assert ensure_dev_key(settings) == (token, False)
    (var / "batchgen.db").unlink()  # a fresh database no longer knows the key
    upgrade(settings.database_url)
    replaced, new = ensure_dev_key(settings)
    assert new and replaced != token and path.read_text().strip() == replaced


def test_operator_errors_are_one_line_and_exit_1(var, tmp_path, capsys, monkeypatch):
    def fails(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("batchgen: "), err
        return err

    assert "run `batchgen migrate` first" in fails("keys", "list")  # a database never migrated
    assert "no checkpoint directory '/no/such/dir'" in fails("convert", "/no/such/dir", "--name", "x")
    assert "Unrecognized model" in fails("convert", str(tmp_path), "--name", "x")  # not a checkpoint
    with monkeypatch.context() as without:  # make run installs no PyTorch: converting says what to install
        without.setitem(sys.modules, "torch", None)
        assert "needs PyTorch" in fails("convert", str(tmp_path), "--name", "x")
    (var / "models" / "demo").mkdir(parents=True)
    assert "exists; pass --force" in fails("build-model", "--preset", "demo")
    monkeypatch.setenv("BATCHGEN_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert "the database (127.0.0.1:1/none) failed: " in fails("keys", "list")
    assert "the database (127.0.0.1:1/none) failed: " in fails("migrate")
    from sqlalchemy.exc import OperationalError

    with pytest.raises(OperationalError):  # --traceback: the exception itself, for a bug report
        main(["--traceback", "keys", "list"])


@pytest.mark.parametrize("argv", [
    ["--name", ".."], ["--name", "."], ["--name", "../escape"], ["--name", "acme/../.."], ["--name", "/etc"],
    ["--name", ""], ["--name", "a/b/c"], ["--output", "{var}"], ["--output", "{var}/models"],
])
def test_convert_never_writes_or_deletes_outside_a_model_directory(var, tmp_path, capsys, argv):
    checkpoint = build_checkpoint(tmp_path / "ckpt", preset="tiny")
    (var / "models" / "kept").mkdir(parents=True)
    (var / "models" / "kept" / "model.bin").write_bytes(b"weights")
    (var / "batchgen.db").write_bytes(b"the database")
    before = sorted(p.relative_to(var) for p in var.rglob("*"))
    argv = [a.replace("{var}", str(var)) for a in argv]
    capsys.readouterr()
    assert main(["convert", str(checkpoint), *argv, "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("batchgen: ") and ("cannot name a model" in err or "not a model directory" in err), err
    assert sorted(p.relative_to(var) for p in var.rglob("*")) == before
    assert (var / "batchgen.db").read_bytes() == b"the database"


def test_convert_of_the_current_directory_takes_its_name(var, tmp_path, monkeypatch):
    checkpoint = build_checkpoint(tmp_path / "Llama-dot-hf", preset="tiny")
    monkeypatch.chdir(checkpoint)
    assert main(["convert", "."]) == 0
    assert (var / "models" / "Llama-dot-hf" / "model.bin").is_file()
