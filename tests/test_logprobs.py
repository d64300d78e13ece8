"""Log probabilities, echo and scoring jobs through the API and a real worker (tiny-chat, int8).

The values themselves are checked against transformers in tests/worker/test_logprobs_reference.py;
here: every interface returns them in its shape, they agree with each other, and one scoring job
gives what an echo gives for the same text.
"""

import json
import math

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

pytestmark = pytest.mark.slow


def spelled(byte_lists):
    """The text tokens' bytes spell, or None where they are not UTF-8 (random weights emit stray
    byte tokens; the tokenizer then shows U+FFFD per byte, a decoder's choice, not a fact to check)."""
    try:
        return b"".join(bytes(b) for b in byte_lists).decode("utf-8")
    except UnicodeDecodeError:
        return None


def run_job(api, body):
    created = api.http.post(f"{api.url}/v1/jobs", json=body, timeout=30)
    assert created.status_code == 202, created.text
    job = api.wait_for_job(created.json()["id"])
    results = api.http.get(f"{api.url}/v1/jobs/{job['id']}/results", timeout=30).json()["data"]
    return job, results


def test_native_logprobs_list_every_generated_token_with_its_alternatives(openai_stack):
    _, api, worker = openai_stack
    job, results = run_job(api, {"model": "tiny-chat", "params": {"temperature": 0, "max_new_tokens": 6},
                                 "requests": [{"prompt": "Once upon", "params": {"top_logprobs": 3}},
                                              {"prompt": "Once upon", "params": {"logprobs": True}},
                                              {"prompt": "Once upon"}]})
    assert job["status"] == "completed", worker.log()
    top, plain, none = results
    assert none["logprobs"] is None and none["scores"] is None
    assert top["text"] == plain["text"] == none["text"]  # greedy, one batch: log probabilities change nothing
    for r in (top, plain):
        tokens = r["logprobs"]["content"]
        assert len(tokens) == r["completion_tokens"] and r["logprobs"]["prompt"] is None
        assert spelled(t["bytes"] for t in tokens) in (r["text"], None)
        assert all(t["logprob"] < 0 for t in tokens)
    assert [t["logprob"] for t in plain["logprobs"]["content"]] == pytest.approx(
        [t["logprob"] for t in top["logprobs"]["content"]], abs=1e-4)
    for t in top["logprobs"]["content"]:
        alts = t["top_logprobs"]
        assert len(alts) == 3 and [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
        # Greedy decoding picked the most likely token: it heads the alternatives.
        assert alts[0]["bytes"] == t["bytes"] and alts[0]["logprob"] == pytest.approx(t["logprob"], abs=1e-5)
        assert sum(math.exp(a["logprob"]) for a in alts) <= 1.0 + 1e-5


def test_a_scoring_job_scores_texts_and_continuations(openai_stack):
    _, api, worker = openai_stack
    job, results = run_job(api, {"model": "tiny-chat", "kind": "score", "requests": [
        {"prompt": "The sky is blue."},
        {"prompt": "Question: what colour is the sky?", "continuations": [" Blue.", " Green and purple."]}]})
    assert job["status"] == "completed" and job["kind"] == "score", worker.log()
    text, choice = results
    assert text["text"] is None and text["completion_tokens"] == 0 and choice["continuations"] == [
        " Blue.", " Green and purple."]
    [whole] = text["scores"]
    assert whole["continuation"] is None
    assert whole["logprob"] == pytest.approx(sum(t["logprob"] for t in whole["tokens"]), abs=1e-4)
    assert whole["perplexity"] == pytest.approx(math.exp(-whole["logprob"] / len(whole["tokens"])), rel=1e-6)
    blue, green = choice["scores"]
    assert (blue["continuation"], green["continuation"]) == (" Blue.", " Green and purple.")
    # Each scored token list spells its continuation.
    assert b"".join(bytes(t["bytes"]) for t in blue["tokens"]).decode() == " Blue."
    assert b"".join(bytes(t["bytes"]) for t in green["tokens"]).decode() == " Green and purple."
    assert job["usage"]["prompt_tokens"] == text["prompt_tokens"] + choice["prompt_tokens"]
    assert job["usage"]["completion_tokens"] == 0


def test_scoring_jobs_refuse_what_does_not_apply(openai_stack):
    _, api, _ = openai_stack
    bad = api.http.post(f"{api.url}/v1/jobs", timeout=30, json={
        "model": "tiny-chat", "kind": "score", "params": {"temperature": 0.5},
        "requests": [{"prompt": "x", "params": {"max_new_tokens": 3}}]})
    assert bad.status_code == 422
    locs = {d["loc"] for d in bad.json()["error"]["details"]}
    assert locs == {"params.temperature", "requests[0].params.max_new_tokens"}
    gen = api.http.post(f"{api.url}/v1/jobs", timeout=30, json={
        "model": "tiny-chat", "requests": [{"prompt": "x", "continuations": ["a"]}]})
    assert gen.status_code == 422 and gen.json()["error"]["details"][0]["loc"] == "requests[0].continuations"
    zero = api.http.post(f"{api.url}/v1/jobs", timeout=30, json={
        "model": "tiny-chat", "prompts": ["x"], "params": {"max_new_tokens": 0}})
    assert zero.status_code == 422 and zero.json()["error"]["details"][0]["loc"] == "params.max_new_tokens"


def test_echo_with_no_new_tokens_gives_the_scoring_jobs_loglikelihood(openai_stack):
    """What evaluation harnesses do for loglikelihood tasks (echo, max_tokens 0 or 1, logprobs 1)
    and what a scoring job gives for the same text agree."""
    client, api, _ = openai_stack
    prompt, continuation = "Question: what colour is the sky?", " Blue."
    _, [scored] = run_job(api, {"model": "tiny-chat", "kind": "score",
                                "requests": [{"prompt": prompt, "continuations": [continuation]}]})
    [score] = scored["scores"]
    echo = client.completions.create(model="tiny-chat", prompt=prompt + continuation, max_tokens=0, echo=True,
                                     logprobs=1, temperature=0)
    Completion.model_validate(echo.model_dump())
    choice = echo.choices[0]
    assert choice.text == prompt + continuation and echo.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == choice.text  # ASCII text: every token is whole characters
    assert [choice.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == lp.tokens
    n = len(score["tokens"])
    assert lp.tokens[-n:] == [t["token"] for t in score["tokens"]]
    assert sum(lp.token_logprobs[-n:]) == pytest.approx(score["logprob"], abs=1e-4)
    # lm-eval's greedy check: each token's log probability is the best of its top_logprobs or not.
    greedy = all(lp.token_logprobs[i] >= max(lp.top_logprobs[i].values()) - 1e-6 for i in range(len(lp.tokens) - n,
                                                                                                len(lp.tokens)))
    assert greedy == score["is_greedy"]
    # max_tokens 1, as lm-eval asks: the same prompt entries and one generated token after them.
    one = client.completions.create(model="tiny-chat", prompt=prompt + continuation, max_tokens=1, echo=True,
                                    logprobs=1, temperature=0, seed=1234)
    assert len(one.choices[0].logprobs.tokens) == len(lp.tokens) + one.usage.completion_tokens
    assert one.choices[0].logprobs.token_logprobs[:len(lp.tokens)] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_openai_logprobs_sync_stream_and_batch_agree(openai_stack):
    client, api, worker = openai_stack
    messages = [{"role": "user", "content": "Tell me a story"}]
    kw = {"model": "tiny-chat", "max_tokens": 8, "temperature": 0, "messages": messages}
    sync = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
    ChatCompletion.model_validate(sync.model_dump())
    content = sync.choices[0].logprobs.content
    assert len(content) == sync.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert spelled(t.bytes for t in content) in (sync.choices[0].message.content, None)

    chunks = list(client.chat.completions.create(logprobs=True, top_logprobs=2, stream=True, **kw))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == sync.choices[0].message.content

    plain = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=5, temperature=0,
                                      logprobs=2)
    lines = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
              "body": {**kw, "logprobs": True, "top_logprobs": 2}}]
    upload = client.files.create(file=("lp.jsonl", ("\n".join(json.dumps(x) for x in lines) + "\n").encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = api.wait_for_batch(client, batch.id) if hasattr(api, "wait_for_batch") else _wait(client, batch.id)
    assert done.status == "completed", worker.log()
    [line] = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    body = ChatCompletion.model_validate(line["response"]["body"])
    assert [t.token for t in body.choices[0].logprobs.content] == [t.token for t in content]
    assert [t.logprob for t in body.choices[0].logprobs.content] == pytest.approx([t.logprob for t in content],
                                                                                  abs=1e-4)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == plain.usage.completion_tokens and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def _wait(client, batch_id, timeout=60):
    import time

    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


def test_token_id_prompts_as_lm_eval_sends_them(openai_stack, tiny_model):
    """lm-eval's local-completions sends each loglikelihood request as token ids (its own
    tokenization of context + continuation, no BOS), echo, max_tokens 1, logprobs 1, and sums
    token_logprobs[ctxlen:-1]: that sum is the scoring job's log probability of the continuation."""
    from tokenizers import Tokenizer

    client, api, _ = openai_stack
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    context, continuation = "Question: what colour is the sky?", " Blue."
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctxlen = len(tokenizer.encode(context, add_special_tokens=False).ids)
    assert whole[:ctxlen] == tokenizer.encode(context, add_special_tokens=False).ids
    answer = client.completions.create(model="tiny-chat", prompt=[whole], max_tokens=1, echo=True, logprobs=1,
                                       temperature=0, seed=1234)
    Completion.model_validate(answer.model_dump())
    lp = answer.choices[0].logprobs
    assert len(lp.token_logprobs) == len(whole) + answer.usage.completion_tokens
    assert answer.choices[0].text.startswith(context + continuation)
    _, [scored] = run_job(api, {"model": "tiny-chat", "kind": "score",
                                "requests": [{"prompt": context, "continuations": [continuation]}]})
    [score] = scored["scores"]
    assert len(lp.token_logprobs[ctxlen:-1]) == len(score["tokens"])
    assert sum(lp.token_logprobs[ctxlen:-1]) == pytest.approx(score["logprob"], abs=1e-4)
    # Ids the model does not have, and an empty id list, are refused, not run.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt=[[]], max_tokens=1)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-chat", prompt=[1, 10**6], max_tokens=1)
    assert "vocabulary" in err.value.body["message"]


def test_logprobs_false_is_off_and_a_chat_continuation_follows_the_template(openai_stack):
    client, api, _ = openai_stack
    off = client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=3, logprobs=False)
    assert off.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=3, extra_body={"logprobs": True})
    assert err.value.body["param"] == "logprobs"
    # A chat turn's answer follows "[/INST] ": the continuation is scored with that space.
    _, [chat] = run_job(api, {"model": "tiny-chat", "kind": "score", "requests": [
        {"messages": [{"role": "user", "content": "Colour of the sky?"}], "continuations": ["Blue.", " Blue."]}]})
    first, second = chat["scores"]
    assert spelled(t["bytes"] for t in first["tokens"]) == " Blue."
    assert first["logprob"] == pytest.approx(second["logprob"], abs=1e-4)
