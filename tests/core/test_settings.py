from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT, Settings, SettingsError


def test_defaults_serve_a_laptop():
    s = Settings.from_env({})
    assert s.database_url == f"sqlite:///{PROJECT_ROOT / 'var' / 'batchgen.db'}"
    assert s.models_dir == PROJECT_ROOT / "var" / "models"
    assert (s.model, s.device, s.redis_url) == ("demo", "cpu", "")


def test_reads_prefixed_variables_and_types_them():
    s = Settings.from_env({"BATCHGEN_PORT": "9000", "BATCHGEN_VAR_DIR": "/tmp/x", "BATCHGEN_MAX_WAIT_MS": "2.5",
                           "UNRELATED": "1"})
    assert s.port == 9000 and s.max_wait_ms == 2.5
    assert s.var_dir == Path("/tmp/x") and s.database_url == "sqlite:////tmp/x/batchgen.db"


def test_overrides_win_over_environment():
    assert Settings.from_env({"BATCHGEN_MODEL": "a"}, model="b").model == "b"


@pytest.mark.parametrize("name,value", [("BATCHGEN_PORT", "eighty"), ("BATCHGEN_DEVICE", "tpu"),
                                        ("BATCHGEN_PORT", "70000")])
def test_bad_values_fail_fast_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_settings_are_frozen_and_round_trip_through_env():
    s = Settings.from_env({"BATCHGEN_PORT": "9001"})
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        s.port = 1  # type: ignore[misc]
    assert Settings.from_env(s.to_env()) == s


def test_long_calls_leave_threads_for_short_calls_unless_set():
    assert Settings.from_env({}).long_call_limit == 1900  # 2000 connections, 100 kept for short calls
    assert Settings.from_env({"BATCHGEN_API_CONNECTIONS": "64"}).long_call_limit == 1
    assert Settings.from_env({"BATCHGEN_API_CONNECTIONS": "800", "BATCHGEN_MAX_LONG_CALLS": "7"}).long_call_limit == 7


def test_queue_names_carry_prefix_and_model():
    assert Settings.from_env({}).queue_for("meta-llama/Llama-2-7b-hf") == "batchgen.meta-llama/Llama-2-7b-hf"
