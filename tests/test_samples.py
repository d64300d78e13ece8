"""Several samples per request (n) and best_of, through the API and a real worker (tiny-chat, int8)."""

import json
import time

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

pytestmark = pytest.mark.slow


def mean(tokens):
    return sum(t["logprob"] for t in tokens) / len(tokens)


def test_native_n_samples_and_best_of(openai_stack):
    _, api, worker = openai_stack
    created = api.http.post(f"{api.url}/v1/jobs", timeout=30, json={
        "model": "tiny-chat", "params": {"temperature": 1.0, "max_new_tokens": 4, "min_new_tokens": 4},
        "requests": [{"prompt": "Once upon", "params": {"n": 3}},
                     {"prompt": "Once upon", "params": {"n": 2, "best_of": 5, "logprobs": True}},
                     {"prompt": "Once upon"}]})
    assert created.status_code == 202, created.text
    job = api.wait_for_job(created.json()["id"])
    assert job["status"] == "completed", worker.log()
    three, best, one = api.http.get(f"{api.url}/v1/jobs/{job['id']}/results", timeout=30).json()["data"]
    assert one["choices"] is None and one["completion_tokens"] == 4
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert all(c["completion_tokens"] == 4 and c["finish_reason"] == "length" for c in three["choices"])
    assert three["completion_tokens"] == 12 and three["text"] == three["choices"][0]["text"]
    # best_of 5, n 2: five samples generated (usage counts them), the two best per token kept, best first.
    assert best["completion_tokens"] == 20 and len(best["choices"]) == 2
    means = [mean(c["logprobs"]["content"]) for c in best["choices"]]
    assert means == sorted(means, reverse=True) and best["logprobs"] == best["choices"][0]["logprobs"]
    assert job["usage"]["completion_tokens"] == 12 + 20 + 4


def test_n_and_best_of_are_checked(openai_stack):
    client, api, _ = openai_stack
    bad = api.http.post(f"{api.url}/v1/jobs", timeout=30, json={
        "model": "tiny-chat", "prompts": ["x"], "params": {"n": 3, "best_of": 2}})
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["loc"] == "params.best_of"
    zero = api.http.post(f"{api.url}/v1/jobs", timeout=30, json={
        "model": "tiny-chat", "prompts": ["x"], "params": {"n": 2, "max_new_tokens": 0, "echo": True}})
    assert zero.status_code == 422 and zero.json()["error"]["details"][0]["loc"] == "params.n"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-chat", prompt="x", n=3, best_of=2)
    assert "best_of must be at least n" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", n=17, messages=[{"role": "user", "content": "x"}])


def test_openai_n_and_best_of_sync_stream_and_batch(openai_stack):
    client, api, worker = openai_stack
    completion = client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=3, temperature=1.0,
                                           n=2, best_of=3, logprobs=1, extra_body={"min_tokens": 3})
    Completion.model_validate(completion.model_dump())
    assert [c.index for c in completion.choices] == [0, 1] and completion.usage.completion_tokens == 9
    means = [sum(c.logprobs.token_logprobs) / 3 for c in completion.choices]
    assert means[0] >= means[1]

    messages = [{"role": "user", "content": "Tell me a story"}]
    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=3, n=3,
                                          extra_body={"min_tokens": 3})
    ChatCompletion.model_validate(chat.model_dump())
    assert [c.index for c in chat.choices] == [0, 1, 2] and chat.usage.completion_tokens == 9

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=3, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    texts = {0: "", 1: ""}
    finished = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1} and chunks[-1].usage.completion_tokens >= 2

    line = {"custom_id": "two", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-chat", "messages": messages, "max_tokens": 3, "n": 2}}
    upload = client.files.create(file=("n.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert batch.status == "completed", worker.log()
    [out] = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    body = ChatCompletion.model_validate(out["response"]["body"])
    assert [c.index for c in body.choices] == [0, 1]
    # Batch output lines say what served them, as synchronous answers do.
    assert body.system_fingerprint == chat.system_fingerprint and body.system_fingerprint.startswith("fp_")


def test_echo_with_several_samples_echoes_the_prompt_in_each(openai_stack):
    client, api, _ = openai_stack
    answer = client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=2, n=2, echo=True,
                                       temperature=1.0)
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.text.startswith("Once upon") for c in answer.choices)
    ids = client.completions.create(model="tiny-chat", prompt=[[300, 301, 302]], max_tokens=2, n=2, echo=True)
    spelled = api.http.post(f"{api.url}/detokenize", json={"tokens": [300, 301, 302]}, timeout=10).json()["prompt"]
    assert spelled and all(c.text.startswith(spelled) for c in ids.choices)
