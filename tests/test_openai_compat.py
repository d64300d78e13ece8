"""The official openai client against batchgen: Files, Batches, completions, chat, streaming, errors.

Every object the client gets back is validated with the openai package's own types.
"""

import json
import time

import openai
import pytest
from openai.types import Batch, Completion, FileObject
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support import cut_at, streamable_prompt


@pytest.fixture(scope="module")
def stack(served):
    api, worker, settings, token = served
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0, timeout=60)
    return client, api, worker, settings


def jsonl(lines):
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def chat_line(custom_id, content, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-chat", "messages": [{"role": "user", "content": content}], "max_tokens": 6,
                     **body}}


def wait_batch(client, batch_id, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        Batch.model_validate(batch.model_dump())
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


@pytest.mark.slow
def test_a_chat_batch_runs_and_its_output_has_openai_shapes(stack):
    client, api, worker, _ = stack
    lines = [chat_line(f"q{i}", f"Question {i}") for i in range(3)]
    lines.append(chat_line("sys", "Hi", temperature=0, stop=["\n"]))
    upload = client.files.create(file=("questions.jsonl", jsonl(lines)), purpose="batch")
    FileObject.model_validate(upload.model_dump())
    assert (upload.purpose, upload.filename, upload.bytes) == ("batch", "questions.jsonl", len(jsonl(lines)))
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "7"})
    assert batch.status == "in_progress" and batch.metadata == {"run": "7"} and batch.request_counts.total == 4
    done = wait_batch(client, batch.id)
    assert done.status == "completed", worker.log()
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
    assert done.output_file_id and done.error_file_id is None and done.completed_at >= done.created_at
    assert done.usage.output_tokens > 0 and done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    output = FileObject.model_validate(client.files.retrieve(done.output_file_id).model_dump())
    assert output.purpose == "batch_output"
    rows = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in rows] == ["q0", "q1", "q2", "sys"]
    for r in rows:
        assert r["id"].startswith("batch_req_") and r["error"] is None and r["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(r["response"]["body"])
        assert completion.choices[0].message.role == "assistant"
        assert cut_at(completion.choices[0].finish_reason, completion.usage.completion_tokens, 6)
    # A batch is a job underneath: the native API shows it too.
    jobs = api.http.get(f"{api.url}/v1/jobs").json()["data"]
    assert any(j["counts"]["total"] == 4 and j["status"] == "completed" for j in jobs)


@pytest.mark.slow
def test_a_bad_input_file_fails_the_batch_with_line_errors(stack):
    client, *_ = stack
    lines = [
        b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny-chat", "messages": [{"role": "user", "content": "ok"}]}}',
        b'not json',
        b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}',
        b'{"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
        b'{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}}',
        b'{"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}}',
    ]
    upload = client.files.create(file=("bad.jsonl", b"\n".join(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    Batch.model_validate(batch.model_dump())
    assert batch.status == "failed" and batch.failed_at
    errors = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert errors == [(2, "invalid_json_line", None), (3, "duplicate_custom_id", "custom_id"),
                      (4, "invalid_method", "method"), (5, "invalid_url", "url"), (6, "invalid_request", "body.logit_bias")]
    assert "logit_bias is not supported" in batch.errors.data[-1].message


@pytest.mark.slow
def test_prompts_too_long_fail_the_batch_on_their_line(stack):
    client, *_ = stack
    lines = [chat_line("ok", "fine"), chat_line("long", "word " * 300)]
    upload = client.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed"
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(2, "context_length_exceeded", "body.messages")]


@pytest.mark.slow
def test_a_completions_batch_runs_and_its_output_has_openai_shapes(stack):
    client, _, worker, _ = stack
    lines = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny-chat", "prompt": f"Once upon a time {i}", "max_tokens": 4, "temperature": 0,
                       **({"logprobs": 2} if i == 0 else {})}} for i in range(3)]
    upload = client.files.create(file=("prompts.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3, worker.log()
    out = {x["custom_id"]: x for x in map(json.loads, client.files.content(done.output_file_id).text.splitlines())}
    assert sorted(out) == ["p0", "p1", "p2"]
    for line in out.values():
        body = Completion.model_validate(line["response"]["body"])
        assert line["response"]["status_code"] == 200 and body.object == "text_completion"
        assert body.usage.completion_tokens == 4 and body.choices[0].finish_reason == "length"
    assert out["p0"]["response"]["body"]["choices"][0]["logprobs"]["top_logprobs"]  # the request's own params
    assert out["p1"]["response"]["body"]["choices"][0]["logprobs"] is None


@pytest.mark.slow
def test_cancel_gives_a_cancelled_batch_with_its_error_file(stack):
    client, *_ = stack
    # tiny-base has no worker here: its requests wait, so cancelling catches them all.
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny-base", "prompt": "Once", "max_tokens": 3}} for i in range(3)]
    upload = client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    Batch.model_validate(cancelled.model_dump())
    assert cancelled.status in ("cancelling", "cancelled")
    final = wait_batch(client, batch.id)
    assert final.status == "cancelled" and final.cancelled_at and final.output_file_id is None
    errors = [json.loads(x) for x in client.files.content(final.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["error"]["code"], e["response"]) for e in errors] == [
        ("c0", "batch_cancelled", None), ("c1", "batch_cancelled", None), ("c2", "batch_cancelled", None)]
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: no change


@pytest.mark.slow
def test_a_batch_that_ended_cannot_be_cancelled(stack):
    client, *_ = stack
    upload = client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
    failed = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    assert failed.status == "failed" and failed.errors.data[0].code == "empty_file"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(failed.id)
    with pytest.raises(openai.BadRequestError, match="output_expires_after"):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 3600})


@pytest.mark.slow
def test_files_and_batches_list_with_pagination_and_delete(stack):
    client, *_ = stack
    ids = [client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line("x", "y")])), purpose="batch").id for i in range(3)]
    page = client.files.list(limit=2, purpose="batch")
    assert len(page.data) == 2 and page.has_more
    listed = [f.id for f in client.files.list(limit=2, purpose="batch")]  # the client follows the cursor
    assert set(ids) <= set(listed) and len(listed) == len(set(listed))
    for i in ids[:3]:
        client.batches.create(input_file_id=i, endpoint="/v1/chat/completions", completion_window="24h")
    batches = list(client.batches.list(limit=2))
    assert len(batches) >= 3 and all(Batch.model_validate(b.model_dump()) for b in batches)
    assert [b.id for b in batches] == sorted((b.id for b in batches), reverse=True)
    deleted = client.files.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[0])


@pytest.mark.slow
def test_completions_and_chat_completions(stack):
    client, *_ = stack
    completion = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    Completion.model_validate(completion.model_dump())
    assert cut_at(completion.choices[0].finish_reason, completion.usage.completion_tokens, 5)
    # With min_tokens it cannot stop early: exactly the limit.
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                     extra_body={"min_tokens": 5})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 5
    assert full.choices[0].text.startswith(completion.choices[0].text)  # greedy: the same start
    chat = client.chat.completions.create(model="tiny-chat", max_tokens=7, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    ChatCompletion.model_validate(chat.model_dump())
    assert chat.choices[0].message.role == "assistant" and cut_at(chat.choices[0].finish_reason,
                                                                    chat.usage.completion_tokens, 7)
    assert chat.id.startswith("chatcmpl-req_") and chat.model == "tiny-chat"


@pytest.mark.slow
def test_chat_streaming_sends_text_as_it_is_generated(stack):
    client, api, *_ = stack
    prompt = streamable_prompt(api.url, api.http.headers["Authorization"].split()[1], max_tokens=24)
    chunks = list(client.chat.completions.create(
        model="tiny-chat", max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt}]))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and chunks[-1].usage is not None and cut_at(finish[0], chunks[-1].usage.completion_tokens, 24)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the text came in one piece: not streamed"
    text = "".join(pieces)
    again = client.chat.completions.create(model="tiny-chat", max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": prompt}])
    assert text == again.choices[0].message.content  # greedy, alone in its batch: the same text
    assert chunks[-1].usage.completion_tokens == again.usage.completion_tokens


@pytest.mark.slow
def test_errors_are_openai_shaped(stack):
    client, api, *_ = stack
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x")
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-chat", tools=[{"type": "function", "function": {"name": "f"}}],
                                       messages=[{"role": "user", "content": "x"}])
    assert "tools is not supported" in err.value.body["message"]
    # Every unsupported parameter of a request at once, the first in param.
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", n=2, best_of=3, suffix="!", logprobs=1, echo=True,
                                  presence_penalty=1.0, logit_bias={"1": 1})
    assert err.value.body["param"] == "presence_penalty"
    named = ("n", "best_of", "presence_penalty", "logit_bias", "suffix", "logprobs", "echo")
    assert [p for p in named if f"{p} is not supported" in err.value.body["message"]] == [
        "presence_penalty", "logit_bias", "suffix"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", extra_body={"nonsense": 1})
    assert "nonsense" in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="key_x.y", max_retries=0).files.list()
    assert err.value.body["code"] == "invalid_api_key"


@pytest.mark.slow
def test_requests_as_lm_eval_sends_them_are_answered_with_a_system_fingerprint(stack):
    """EleutherAI's lm-eval sends seed=1234 with every request (and stop lists): a refusal made it
    close its session. The seed is taken as best effort; answers say what served them."""
    client, *_ = stack
    kw = {"seed": 1234, "temperature": 0, "max_tokens": 5, "stop": ["\n\n", "Question:"]}
    first = client.completions.create(model="tiny", prompt="Question: 2+2?\nAnswer:", **kw)
    again = client.completions.create(model="tiny", prompt="Question: 2+2?\nAnswer:", **kw)
    chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "2+2?"}], **kw)
    assert first.system_fingerprint and first.system_fingerprint.startswith("fp_")
    assert again.system_fingerprint == first.system_fingerprint == chat.system_fingerprint  # one model build
    assert cut_at(first.choices[0].finish_reason, first.usage.completion_tokens, 5)
    chunks = list(client.chat.completions.create(model="tiny-chat", stream=True,
                                                 messages=[{"role": "user", "content": "2+2?"}], **kw))
    assert {c.system_fingerprint for c in chunks} == {first.system_fingerprint}


@pytest.mark.slow
def test_models_lists_what_is_served_with_openai_types(stack):
    from openai.types import Model

    client, api, _, _ = stack
    models = {m.id: m for m in client.models.list()}
    for model in models.values():
        Model.model_validate(model.model_dump())
    chat, base = models["tiny-chat"], models["tiny-base"]
    extra = chat.model_extra or {}
    # One worker serves tiny-chat (counted from its heartbeat in Redis); none serves tiny-base.
    assert (extra["chat"], extra["workers"], extra["aliases"]) == (True, 1, ["tiny"])
    assert ((base.model_extra or {})["chat"], (base.model_extra or {})["workers"]) == (False, 0)
    assert extra["context_length"] == 256 and extra["defaults"] == {"max_new_tokens": 8}
    assert chat.owned_by == "batchgen" and chat.created > 0  # its files are on this machine
    assert models["meta-llama/Llama-2-70b-chat-hf"].created == 0  # not converted here
    assert "demo" in models
