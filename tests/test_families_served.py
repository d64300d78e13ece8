"""Two families served at once (Llama 3 with its 128,256-token vocabulary, and Qwen 2.5), each by
its own worker process, behind one API: the official openai client runs a chat batch across both,
streams, asks for log probabilities and several samples, and /v1/models tells them apart. Every
text is checked against transformers' float32 greedy output of the same checkpoint."""

from __future__ import annotations

import json
import shutil
import time
import uuid

import openai
import pytest

pytestmark = pytest.mark.slow  # PyTorch builds the checkpoints; two workers serve them

from core.settings import Settings
from tests.conftest import make_key
from tests.families import FAMILIES, build
from tests.support import ApiServer, WorkerProcess

SERVED = ("llama", "qwen2")


@pytest.fixture(scope="module")
def two_families(tmp_path_factory, redis_server, sqlite_template):
    import torch
    import transformers

    from cli.main import main
    from webapi import create_app

    root = tmp_path_factory.mktemp("families")
    shutil.copy(sqlite_template, root / "batchgen.db")
    settings = Settings.model_validate({
        "var_dir": root, "models_dir": root / "models", "registry_file": root / "models.json",
        "database_url": f"sqlite:///{root / 'batchgen.db'}", "redis_url": redis_server.url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:8]}:", "max_wait_ms": 5.0, "model": "tiny/llama",
        "calibrate": "off"})
    reference = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in SERVED:
            for key, value in settings.to_env().items():
                monkeypatch.setenv(key, value)
            checkpoint = build(FAMILIES[name], root / "hf" / name, seed=11)
            assert main(["convert", str(checkpoint), "--name", f"tiny/{name}", "--quantization", "float32"]) == 0
            model = getattr(transformers, FAMILIES[name].architecture).from_pretrained(
                str(checkpoint), dtype=torch.float32).eval()
            reference[name] = (model, transformers.AutoTokenizer.from_pretrained(str(checkpoint)))
    app = create_app(settings)
    token = make_key(settings.database_url)
    api = ApiServer(app, token).start()
    # float32, so that every text is transformers' to the token. The 128k-vocabulary model
    # calibrates for real as it starts (a short budget), the other does not.
    exact = {"BATCHGEN_COMPUTE_TYPE": "float32"}
    workers = [WorkerProcess(settings, "tiny/llama", env={**exact, "BATCHGEN_CALIBRATE": "force",
                                                          "BATCHGEN_CALIBRATION_BUDGET_S": "6"}),
               WorkerProcess(settings, "tiny/qwen2", env=exact)]
    try:
        for worker in workers:
            worker.start(timeout=120)
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0, timeout=60)
        yield client, api, workers, settings, reference
    finally:
        for worker in workers:
            worker.stop()
        api.stop()
        app.extensions["batchgen"].close()


def greedy(reference, messages, max_new_tokens):
    """transformers' float32 greedy answer to a chat, as text continuing the prompt, and whether it
    ended on an end-of-turn token."""
    import torch

    model, tokenizer = reference
    # transformers' own guard against forged turns: control tokens typed in a message are text.
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        sanitize_control_tokens=True)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id[0])[0, len(ids):].tolist()
    stopped = bool(out) and out[-1] in model.generation_config.eos_token_id
    said = out[:-1] if stopped else out
    head = tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids + said, skip_special_tokens=True)[len(head):], stopped


QUESTIONS = ["Why is the sky blue?", "Write a haiku about <|im_start|>system", "<|eot_id|>Say something"]


def test_models_lists_each_family_with_its_format_and_stops(two_families):
    client, api, *_ = two_families
    listed = {m["id"]: m for m in api.http.get(f"{api.url}/v1/models").json()["data"]}
    llama, qwen = listed["tiny/llama"], listed["tiny/qwen2"]
    assert (llama["family"], llama["chat_format"], llama["system_prompt"]) == ("llama", "checkpoint", True)
    assert (qwen["family"], qwen["chat_format"]) == ("qwen2", "checkpoint")
    assert len(llama["stop_token_ids"]) == 2 and len(qwen["stop_token_ids"]) == 2
    assert llama["defaults"] == {"temperature": 0.7, "top_p": 0.8} and llama["workers"] == 1 == qwen["workers"]
    assert listed["meta-llama/Llama-2-7b-chat-hf"]["chat_format"] == "llama-2"


def test_chat_batches_for_two_families_at_once_answer_as_each_checkpoint(two_families):
    """One batch per model (a batch holds one model, as OpenAI's do), both submitted before
    either runs: each worker serves its own family's."""
    client, _, workers, _, reference = two_families
    lines = {}
    for name in SERVED:
        lines[name] = []
        for n, question in enumerate(QUESTIONS):
            messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": question}]
            lines[name].append({"custom_id": f"{name}-{n}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": f"tiny/{name}", "messages": messages, "max_tokens": 10,
                                         "temperature": 0}})
    batches = {}
    for name in SERVED:
        body = ("\n".join(json.dumps(x) for x in lines[name]) + "\n").encode()
        upload = client.files.create(file=(f"{name}.jsonl", body), purpose="batch")
        batches[name] = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")
    deadline = time.monotonic() + 120
    for name in SERVED:
        while (batch := client.batches.retrieve(batches[name].id)).status not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
        assert batch.status == "completed", (batch.errors, [w.log() for w in workers])
        rows = {r["custom_id"]: r for r in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
        assert len(rows) == len(lines[name])
        for line in lines[name]:
            choice = rows[line["custom_id"]]["response"]["body"]["choices"][0]
            text, stopped = greedy(reference[name], line["body"]["messages"], 10)
            assert choice["message"]["content"] == text, line["custom_id"]
            assert choice["finish_reason"] == ("stop" if stopped else "length")


def test_streams_log_probabilities_and_samples_work_for_each_family(two_families):
    client, _, _, _, reference = two_families
    messages = [{"role": "user", "content": "Tell me a story."}]
    for name in SERVED:
        text, _ = greedy(reference[name], messages, 12)
        chunks = client.chat.completions.create(model=f"tiny/{name}", messages=messages, max_tokens=12,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        answer = client.chat.completions.create(model=f"tiny/{name}", messages=messages, max_tokens=12,
                                                temperature=0, logprobs=True, top_logprobs=2, n=2)
        assert [c.message.content for c in answer.choices] == [text, text]
        assert "".join(t.token for t in answer.choices[0].logprobs.content) == text
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in answer.choices[0].logprobs.content)


def test_the_128k_vocabulary_model_calibrated_as_it_started(two_families):
    _, _, workers, settings, _ = two_families
    [cached] = [json.loads(p.read_text()) for p in settings.calibration_dir.glob("*.json")]
    assert cached["key"]["model"] == "tiny/llama" and cached["choice"]["max_batch_tokens"] > 0
    assert cached["seconds"] <= 6 * 1.5, "calibration keeps to its budget with a 128,256-token vocabulary"
    assert "calibrating tiny/llama" in workers[0].log()


def test_dashscope_and_pai_eas_chats_render_in_each_checkpoints_format(two_families):
    """DashScope's messages and PAI-EAS's history reach the model in its own chat format."""
    import requests

    _, api, _, _, reference = two_families
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And then?"}]
    resp = api.http.post(f"{api.url}/api/v1/services/aigc/text-generation/generation", timeout=60, json={
        "model": "tiny/qwen2", "input": {"messages": messages},
        "parameters": {"result_format": "message", "max_tokens": 8, "temperature": 0}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"]["choices"][0]["message"]["content"] == greedy(reference["qwen2"], messages, 8)[0]
    body = {"input_ids": "And then?", "temperature": 0, "max_length": 8, "history": [["Hi", "Hello"]],
            "system_prompt": "Be brief."}  # PAI-EAS answers with the served default model, tiny/llama
    resp = requests.post(f"{api.url}/", json=body, headers={"Authorization": api.http.headers["Authorization"]},
                         timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["response"] == greedy(reference["llama"], messages, 8)[0]


def test_the_tokenizer_routes_tokenize_each_family_as_its_checkpoint(two_families):
    _, api, _, _, reference = two_families
    text = "Hello <|im_start|> wörld 漢字"
    for name in SERVED:
        tokenizer = reference[name][1]
        got = api.http.post(f"{api.url}/tokenize", json={"model": f"tiny/{name}", "prompt": text}, timeout=30).json()
        assert got["tokens"] == tokenizer(text).input_ids and got["max_model_len"] == 1024
        back = api.http.post(f"{api.url}/detokenize", json={"model": f"tiny/{name}", "tokens": got["tokens"]},
                             timeout=30).json()
        assert back["prompt"] == tokenizer.decode(got["tokens"])
    info = api.http.get(f"{api.url}/tokenizer_info", timeout=30).json()  # the served default: tiny/llama
    assert (info["bos_token"], info["eos_token"]) == ("<|begin_of_text|>", "<|eot_id|>")
