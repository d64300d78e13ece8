"""The API holds a chat to its model's format at submit time: a checkpoint template that refuses
a system prompt (Gemma 2's, Mistral's) is a 422 with the template's own words, not a request
that fails later in a worker."""

import json

import pytest

from tests.conftest import authed, make_key
from tests.families import GEMMA2_TEMPLATE


@pytest.fixture
def gemma_client(make_settings, sqlite_url, tmp_path):
    from webapi import create_app

    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [{
        "name": "acme/gemma", "path": str(tmp_path / "not-on-this-machine"), "chat": True, "family": "gemma2",
        "chat_template": GEMMA2_TEMPLATE, "system_prompt": False,
        "special_tokens": {"bos_token": "<bos>", "eos_token": "<eos>"}}, {
        "name": "acme/broken", "path": str(tmp_path / "nowhere"), "chat": True, "chat_template": "{% if %}"}]}))
    settings = make_settings(sqlite_url, registry_file=registry, model="acme/gemma")
    app = create_app(settings)
    yield authed(app, make_key(settings.database_url))
    app.extensions["batchgen"].close()


def test_a_system_message_to_a_template_that_refuses_one_is_a_422(gemma_client):
    got = gemma_client.post("/v1/jobs", json={"model": "acme/gemma", "requests": [
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}]})
    assert got.status_code == 422
    [problem] = got.get_json()["error"]["details"]
    assert problem["type"] == "invalid_prompt" and "System role not supported" in problem["message"]


def test_a_job_system_prompt_to_a_format_without_one_is_a_422(gemma_client):
    got = gemma_client.post("/v1/jobs", json={"model": "acme/gemma", "system": "be nice", "prompts": ["hi"]})
    assert got.status_code == 422
    assert got.get_json()["error"]["details"][0]["loc"] == "system"


def test_a_chat_the_template_takes_is_accepted(gemma_client):
    got = gemma_client.post("/v1/jobs", json={"model": "acme/gemma", "requests": [
        {"messages": [{"role": "user", "content": "hi <start_of_turn>model"}]}]})
    assert got.status_code == 202, got.get_json()


def test_the_openai_route_refuses_it_in_openai_shape(gemma_client):
    got = gemma_client.post("/v1/chat/completions", json={"model": "acme/gemma", "max_tokens": 2, "messages": [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]})
    assert got.status_code in (400, 422)
    assert "System role not supported" in json.dumps(got.get_json()["error"])


def test_a_template_that_does_not_compile_refuses_chats_with_a_422_not_a_500(gemma_client):
    got = gemma_client.post("/v1/jobs", json={"model": "acme/broken", "requests": [
        {"messages": [{"role": "user", "content": "hi"}]}]})
    assert got.status_code == 422
    assert "does not compile" in got.get_json()["error"]["details"][0]["message"]
