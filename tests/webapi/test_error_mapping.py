"""One mapping from the service's error codes to each interface's status and body
(``webapi.errors``): the same fault gets the status its interface promises on every route family,
in that interface's shape, and nothing is stored."""

from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from core.tables import Job
from tests.conftest import authed, make_key
from webapi.errors import STATUS_BY_CODE, error_body, failed_call


def _jobs(app):
    with app.extensions["batchgen"].db.read() as s:
        return s.scalar(select(func.count()).select_from(Job))


@pytest.fixture
def eas_app(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, eas_model="no-such-model"))
    yield app
    app.extensions["batchgen"].close()


def test_an_unknown_model_is_422_natively_and_404_on_every_compatible_route(eas_app, sqlite_url):
    client = authed(eas_app, make_key(sqlite_url))
    native = client.post("/v1/jobs", json={"model": "no-such-model", "prompts": ["x"]})
    assert native.status_code == 422 and native.get_json()["error"]["code"] == "model_not_found"
    assert native.get_json()["error"]["details"][0]["loc"] == "model"

    for path, body in (("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
                       ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})):
        resp = client.post(path, json=body)
        assert resp.status_code == 404, path
        assert resp.get_json()["error"] == {"message": "unknown model 'no-such-model'", "type": "invalid_request_error",
                                            "param": "model", "code": "model_not_found"}

    resp = client.post("/api/v1/services/aigc/text-generation/generation",
                       json={"model": "no-such-model", "input": {"prompt": "x"}})
    assert resp.status_code == 404
    assert resp.get_json() == {"code": "ModelNotFound", "message": "unknown model 'no-such-model'",
                               "request_id": resp.headers["X-Request-Id"]}

    # PAI-EAS serves the model it is configured with; here that is one the registry lacks.
    for kwargs in ({"json": {"input_ids": "x"}}, {"data": b"x", "content_type": "text/plain"}):
        resp = client.post("/", **kwargs)
        assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "model_not_found"
    assert _jobs(eas_app) == 0


@pytest.mark.parametrize("code", ["context_length_exceeded", "invalid_prompt", "prompt_too_long"])
def test_a_call_whose_request_was_refused_by_the_model_is_a_client_error_on_every_interface(code):
    err = failed_call(SimpleNamespace(error_code=code, error_message="too long"))
    assert err.status == 422 and err.code == code
    for interface in ("openai", "dashscope", "eas"):
        status, body = error_body(interface, err.status, err.code, err.message, request_id="rid_x")
        assert status == 400, interface
    assert error_body("openai", err.status, code, "m")[1]["error"]["type"] == "invalid_request_error"
    assert error_body("dashscope", err.status, code, "m", request_id="rid_x")[1] == {
        "code": "InvalidParameter", "message": "m", "request_id": "rid_x"}


@pytest.mark.parametrize("code", ["generation_failed", "store_failed", "attempts_exhausted"])
def test_a_call_that_failed_in_the_service_is_a_server_error_on_every_interface(code):
    err = failed_call(SimpleNamespace(error_code=code, error_message="boom"))
    assert code not in STATUS_BY_CODE and err.status == 500
    for interface in ("native", "openai", "dashscope", "eas"):
        assert error_body(interface, err.status, err.code, err.message)[0] == 500
    assert error_body("openai", 500, code, "boom")[1]["error"]["type"] == "server_error"
    assert error_body("dashscope", 500, code, "boom")[1]["code"] == "InternalError"


def test_every_unsupported_parameter_is_named_at_once_and_nothing_is_stored(eas_app, sqlite_url):
    client = authed(eas_app, make_key(sqlite_url))
    resp = client.post("/v1/chat/completions", json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "x"}], "n": 3, "presence_penalty": 0.5,
        "tools": [{"type": "function"}], "seed": 1, "logprobs": True, "top_logprobs": 2, "frequency_penalty": 1})
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["param"] == "presence_penalty" and err["type"] == "invalid_request_error"
    assert err["message"] == ("presence_penalty is not supported by batchgen; frequency_penalty is not supported "
                              "by batchgen; tools is not supported by batchgen")
    assert _jobs(eas_app) == 0
