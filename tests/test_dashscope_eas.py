"""DashScope's text-generation call through the dashscope SDK, and the PAI-EAS request shape."""


import dashscope
import pytest
import requests

from tests.support import cut_at, streamable_prompt


@pytest.fixture(scope="module")
def ds(served):
    api, worker, settings, token = served
    dashscope.base_http_api_url = f"{api.url}/api/v1"
    return api, worker, token


def _stored(api, token):
    """The result stored for the caller's latest call (each call is a one-request job)."""
    auth = {"Authorization": f"Bearer {token}"}
    [job] = requests.get(f"{api.url}/v1/jobs?limit=1", headers=auth, timeout=10).json()["data"]
    return requests.get(f"{api.url}/v1/jobs/{job['id']}/results", headers=auth, timeout=10).json()["data"][0]


@pytest.mark.slow
def test_dashscope_prompt_and_messages(ds):
    api, worker, token = ds
    r = dashscope.Generation.call(model="tiny-chat", prompt="Hello", api_key=token, max_tokens=5, top_p=0.8,
                                  seed=1234)  # taken, best effort, as on the OpenAI routes
    assert r.status_code == 200, (r.code, r.message, worker.log())
    stored = _stored(api, token)
    assert (r.output.text, r.usage.output_tokens, r.usage.input_tokens) == (
        stored["text"], stored["completion_tokens"], stored["prompt_tokens"])
    assert cut_at(r.output.finish_reason, r.usage.output_tokens, 5) and r.usage.input_tokens > 0 and r.request_id
    r = dashscope.Generation.call(model="tiny-chat", api_key=token, result_format="message", max_tokens=4,
                                  messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert r.status_code == 200 and r.output.choices[0].message.role == "assistant"
    assert r.output.choices[0].message.content == _stored(api, token)["text"]
    assert cut_at(r.output.choices[0].finish_reason, r.usage.output_tokens, 4)


@pytest.mark.slow
def test_dashscope_streams_the_text_so_far(ds):
    api, _, token = ds
    prompt = streamable_prompt(api.url, token, max_tokens=20)  # a prompt is the user's turn on a chat model
    chunks = list(dashscope.Generation.call(model="tiny-chat", prompt=prompt, api_key=token,
                                            max_tokens=20, temperature=0, stream=True))
    assert all(c.status_code == 200 for c in chunks) and len(chunks) >= 2
    texts = [c.output.text for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # each event: the text so far
    assert texts[-1] and texts[-1] == _stored(api, token)["text"] and len(set(texts)) >= 2
    assert cut_at(chunks[-1].output.finish_reason, chunks[-1].usage.output_tokens, 20)
    # The same greedy call unstreamed: the same text.
    again = dashscope.Generation.call(model="tiny-chat", prompt=prompt, api_key=token, max_tokens=20,
                                      temperature=0)
    assert again.output.text == texts[-1]


@pytest.mark.slow
def test_dashscope_errors_have_its_shape(ds):
    api, _, token = ds
    r = dashscope.Generation.call(model="no-such-model", prompt="x", api_key=token)
    # An unknown model is a 404, as on the OpenAI routes (one mapping, webapi.errors.status_for).
    assert r.status_code == 404 and r.code == "ModelNotFound" and "no-such-model" in r.message and r.request_id
    r = dashscope.Generation.call(model="tiny-chat", prompt="x", api_key="key_x.y")
    assert r.status_code == 401 and r.code == "InvalidApiKey"
    resp = requests.post(f"{api.url}/api/v1/services/aigc/text-generation/generation", json={"model": "tiny-chat"},
                         headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 400 and set(resp.json()) == {"code", "message", "request_id"}


@pytest.mark.slow
def test_pai_eas_plain_text_and_json(ds):
    api, _, token = ds
    resp = requests.post(f"{api.url}/", data=b"Once upon a time", timeout=60,
                         headers={"Authorization": token, "Content-Type": "text/plain"})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert resp.text == _stored(api, token)["text"]
    body = {"input_ids": "And then?", "temperature": 0.8, "max_length": 6, "top_p": 0.9,
            "history": [["Hi", "Hello"]], "system_prompt": "Be brief."}
    resp = requests.post(f"{api.url}/", json=body, headers={"Authorization": token}, timeout=60)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    stored = _stored(api, token)
    assert answer["response"] == stored["text"] and cut_at(stored["finish_reason"], stored["completion_tokens"], 6)
    assert answer["history"] == [["Hi", "Hello"], ["And then?", stored["text"]]]
    # The history reached the model as earlier turns of the conversation, in order.
    assert [m["content"] for m in stored["messages"]] == ["Be brief.", "Hi", "Hello", "And then?"]
    bad = requests.post(f"{api.url}/", json={"input_ids": "x", "max_length": 0}, headers={"Authorization": token})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    assert requests.post(f"{api.url}/", data=b"x", headers={"Content-Type": "text/plain"}).status_code == 401
