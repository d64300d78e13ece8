"""vLLM's tokenizer routes (what lm-eval looks for next to /v1/completions): public, exact, bounded."""

import json

import pytest
from tokenizers import Tokenizer


@pytest.fixture
def api(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, model="tiny-chat", max_prompt_chars=100))
    yield app.test_client()  # no key: these routes are public
    app.extensions["batchgen"].close()


def test_tokenize_and_detokenize_round_trip_with_the_models_tokenizer(api, tiny_model):
    reference = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    info = api.get("/tokenizer_info").get_json()
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    eos = config["eos_token"]["content"] if isinstance(config["eos_token"], dict) else config["eos_token"]
    assert info["model"] == "tiny-chat" and info["eos_token"] == eos and info["model_max_length"] == 256
    plain = api.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).get_json()
    assert plain["tokens"] == reference.encode("Hello world", add_special_tokens=False).ids
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == 256
    with_bos = api.post("/tokenize", json={"model": "tiny-base", "prompt": "Hello world"}).get_json()
    assert with_bos["tokens"] == reference.encode("Hello world").ids != plain["tokens"]
    # The EOS text is the EOS token, as lm-eval expects of /tokenize (eos_token_id = encode(eos)[0]).
    assert api.post("/tokenize", json={"prompt": eos, "add_special_tokens": False}).get_json()["tokens"] == [
        reference.token_to_id(eos)]
    back = api.post("/detokenize", json={"tokens": plain["tokens"]}).get_json()
    assert back == {"prompt": "Hello world"}


def test_bad_input_is_a_400_or_404_in_openais_shape(api):
    too_long = api.post("/tokenize", json={"prompt": "x" * 101})
    assert too_long.status_code == 400 and too_long.get_json()["error"]["code"] == "prompt_too_long"
    unknown = api.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "model_not_found"
    bad = api.post("/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and "vocabulary" in bad.get_json()["error"]["message"]
    extra = api.post("/tokenize", json={"prompt": "x", "nonsense": 1})
    assert extra.status_code == 400 and extra.get_json()["error"]["param"] == "nonsense"


def test_a_body_larger_than_a_prompt_is_refused_unread_and_a_key_can_be_required(api, make_settings, sqlite_url):
    big = api.post("/tokenize", data=b"{" + b" " * 10_000 + b"}", content_type="application/json")
    assert big.status_code == 413 and big.get_json()["error"]["code"] == "payload_too_large"
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, model="tiny-chat", tokenizer_routes="key"))
    try:
        assert app.test_client().post("/tokenize", json={"prompt": "x"}).status_code == 401
    finally:
        app.extensions["batchgen"].close()
