"""`batchgen submit|status|results|cancel|jobs` against the real stack (API over HTTP, a worker)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from cli.main import build_parser, main


@pytest.fixture
def cli(served, monkeypatch, capsys):
    """Run ``batchgen ARGS`` in this process against the served API; returns (status, out, err)."""
    api, _, _, token = served
    monkeypatch.setenv("BATCHGEN_SERVER", api.url)
    monkeypatch.setenv("BATCHGEN_API_KEY", token)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.mark.slow  # a worker serves the API it talks to
def test_submit_wait_status_results_jobs(cli, served, tmp_path):
    api = served[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about the sea.\n\nWhat is a hash map?\nWrite a haiku.\n")
    status, out, err = cli("submit", str(prompts), "--model", "tiny", "--param", "max_new_tokens=5",
                           "--name", "sea", "--wait")
    job_id = out.strip()
    assert status == 0 and job_id.startswith("job_"), err
    assert f"submitted {job_id}: 3 requests for tiny-chat" in err
    assert err.strip().splitlines()[-1].startswith("[" + "#" * 30 + "] 3/3 completed")  # the progress bar
    job = api.http.get(f"{api.url}/v1/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["metadata"] == {"name": "sea"}
    assert job["params"]["max_new_tokens"] == 5

    status, out, _ = cli("status", job_id)
    assert status == 0 and "status:        completed" in out and "3 total: 3 succeeded" in out and "(sea)" in out
    status, out, _ = cli("status", job_id, "--json")
    assert json.loads(out)["id"] == job_id

    target = tmp_path / "out.jsonl"
    status, _, err = cli("results", job_id, "-o", str(target))
    lines = [json.loads(x) for x in target.read_text().splitlines()]
    expected = api.http.get(f"{api.url}/v1/jobs/{job_id}/results").json()["data"]
    assert status == 0 and lines == expected and f"3 results to {target}" in err
    assert not list(tmp_path.glob("*.partial"))
    status, out, _ = cli("results", job_id, "--status", "failed")
    assert status == 0 and out == ""

    assert "409 " in one_line_error(cli("cancel", job_id))  # it has ended

    status, out, _ = cli("jobs", "--limit", "100")
    row = next(line for line in out.splitlines() if line.startswith(job_id))
    assert status == 0 and out.startswith("JOB") and "completed" in row and "3/3" in row
    status, out, _ = cli("jobs", "--status", "completed", "--json")
    assert job_id in [j["id"] for j in json.loads(out)["data"]]


@pytest.mark.slow  # a worker serves the API it talks to
def test_a_scoring_job_from_a_jsonl_file(cli, served, tmp_path):
    requests_file = tmp_path / "choices.jsonl"
    requests_file.write_text(json.dumps({"prompt": "The sky is", "continuations": [" blue", " green"]}) + "\n")
    status, out, err = cli("submit", str(requests_file), "--model", "tiny", "--kind", "score", "--wait")
    assert status == 0, err
    status, results, _ = cli("results", out.strip())
    [line] = [json.loads(x) for x in results.splitlines()]
    assert status == 0 and [s["continuation"] for s in line["scores"]] == [" blue", " green"]
    assert all(s["logprob"] < 0 and len(s["tokens"]) >= 1 for s in line["scores"])


@pytest.mark.slow  # a worker serves the API it talks to
def test_wait_polls_when_the_server_refuses_more_streams(cli, served, tmp_path, monkeypatch):
    api = served[0]
    # As if the process served as many streams as it may (streams of earlier tests may still end).
    monkeypatch.setattr(api.server.app.extensions["batchgen"].limits.long_calls, "limit", 0)  # until the test ends
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    status, out, err = cli("submit", str(prompts), "--model", "tiny", "--param", "max_new_tokens=5", "--wait")
    assert status == 0, err
    assert err.strip().splitlines()[-1].startswith("[" + "#" * 30 + "] 2/2 completed")
    assert api.http.get(f"{api.url}/v1/jobs/{out.strip()}").json()["status"] == "completed"


@pytest.mark.slow  # a worker serves the API it talks to
def test_jsonl_requests_and_cancel(cli, served, tmp_path):
    api = served[0]
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text(json.dumps({"custom_id": "a", "prompt": "one"}) + "\n"
                             + json.dumps({"custom_id": "b", "prompt": "two", "params": {"max_new_tokens": 3}})
                             + "\n" + json.dumps("three") + "\n")
    # tiny-base has no worker: the job waits in the queue, and can be cancelled whole.
    status, out, _ = cli("submit", str(requests_file), "--model", "tiny-base", "--param", "temperature=0",
                         "--param", 'stop=["\\n"]', "--priority", "2", "--json")
    job = json.loads(out)
    assert status == 0 and job["status"] == "queued" and job["counts"]["total"] == 3 and job["priority"] == 2
    assert job["params"]["temperature"] == 0 and job["params"]["stop"] == ["\n"]
    results = api.http.get(f"{api.url}/v1/jobs/{job['id']}/results").json()["data"]
    assert [r["custom_id"] for r in results] == ["a", "b", None] and results[2]["prompt"] == "three"

    status, out, _ = cli("cancel", job["id"])
    assert status == 0 and out.strip() == f"{job['id']} cancelled: 3 requests cancelled"
    status, _, err = cli("status", job["id"], "--wait")
    assert status == 1 and f"{job['id']} ended cancelled" in err  # --wait: 1 unless it completed
    status, out, _ = cli("cancel", job["id"])  # cancelling a cancelled job changes nothing
    assert status == 0 and out.strip() == f"{job['id']} cancelled: 3 requests cancelled"


def one_line_error(result: tuple[int, str, str]) -> str:
    status, out, err = result
    assert status == 1 and out == "" and len(err.strip().splitlines()) == 1, (status, out, err)
    assert err.startswith("batchgen: ")
    return err


@pytest.mark.slow  # a worker serves the API it talks to
def test_errors_are_one_line_and_exit_1(cli, served, tmp_path, monkeypatch):
    api = served[0]
    before = len(api.http.get(f"{api.url}/v1/jobs", params={"limit": 100}).json()["data"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert "unknown model 'nope'" in one_line_error(cli("submit", str(prompts), "--model", "nope"))
    err = one_line_error(cli("submit", str(prompts), "--model", "tiny", "--param", "top_p=7"))
    assert "422" in err and "params.top_p" in err and "[request rid_" in err
    assert "404" in one_line_error(cli("status", "job_doesnotexist"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    assert "line 2 is not JSON" in one_line_error(cli("submit", str(bad), "--model", "tiny"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "has no prompts" in one_line_error(cli("submit", str(empty), "--model", "tiny"))
    assert "cannot read" in one_line_error(cli("submit", str(tmp_path / "missing.txt"), "--model", "tiny"))
    assert "is not KEY=VALUE" in one_line_error(cli("submit", str(prompts), "--model", "tiny", "--param", "x"))
    assert "401" in one_line_error(cli("jobs", "--key", "key_wrong.secret"))
    assert "cannot reach http://127.0.0.1:9" in one_line_error(cli("jobs", "--server", "http://127.0.0.1:9"))
    monkeypatch.delenv("BATCHGEN_API_KEY")
    monkeypatch.setenv("BATCHGEN_VAR_DIR", str(tmp_path / "empty"))
    assert "no API key" in one_line_error(cli("jobs"))
    # Nothing was submitted by any of these.
    assert len(api.http.get(f"{api.url}/v1/jobs", params={"limit": 100}).json()["data"]) == before


def test_every_command_explains_itself_with_an_example(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    helps = {}
    for name in commands:
        argv = [name, "--help"]
        if name == "keys":
            for action in ("create", "list", "revoke"):
                with pytest.raises(SystemExit) as stop:
                    main([name, action, "--help"])
                assert stop.value.code == 0
                helps[f"keys {action}"] = capsys.readouterr().out
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
        helps[name] = capsys.readouterr().out
    assert {"submit", "status", "results", "cancel", "jobs", "up", "api", "worker", "migrate", "build-model",
            "convert", "keys", "models"} <= set(helps)
    for name, text in helps.items():
        assert f"usage: batchgen {name}" in text and "examples:\n  batchgen " in text, name


@pytest.mark.slow  # a worker serves the API it talks to
def test_as_a_command_reading_standard_input(served):
    api, _, _, token = served
    env = {**os.environ, "BATCHGEN_SERVER": api.url, "BATCHGEN_API_KEY": token}
    done = subprocess.run([sys.executable, "-m", "cli", "submit", "-", "--model", "tiny", "--param",
                           "max_new_tokens=3", "--wait"], input="first\nsecond\n", capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("job_") and "\r" not in done.stderr  # not a terminal: plain lines, no redraws
    assert done.stderr.strip().splitlines()[-1].startswith("[" + "#" * 30 + "] 2/2 completed")
    failed = subprocess.run([sys.executable, "-m", "cli", "status", "job_nope"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert failed.returncode == 1 and failed.stderr.startswith("batchgen: 404 ") and failed.stdout == ""


def test_an_error_line_says_when_to_retry_a_limit():
    from cli.client import describe_error

    body = {"error": {"code": "queue_full", "message": "model tiny-chat has more than 3 requests waiting",
                      "details": {"retry_after": 30}, "request_id": "rid_1"}}
    assert describe_error(429, json.dumps(body).encode()) == (
        "429 queue_full: model tiny-chat has more than 3 requests waiting (retry after 30 s) [request rid_1]")


def test_submit_with_a_webhook_prints_its_secret_once_and_shows_refusals(cli, served, tmp_path, monkeypatch):
    api = served[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n")
    # A public name is accepted (its addresses are checked when the event is sent).
    status, out, err = cli("submit", str(prompts), "--model", "tiny", "--webhook", "https://hooks.example.com/b")
    job_id = out.strip()
    secret = next(line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("webhook secret"))
    assert status == 0 and secret.startswith("whsec_"), err
    job = api.http.get(f"{api.url}/v1/jobs/{job_id}").json()
    assert job["webhook"]["url"] == "https://hooks.example.com/b" and job["webhook"]["secret"] is None
    # A key of the user's comes from a file or the environment, never the command line (`ps` shows it).
    own = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"  # 24 bytes
    key_file = tmp_path / "webhook.key"
    key_file.write_text(own + "\n")
    status, out, err = cli("submit", str(prompts), "--model", "tiny", "--webhook", "https://hooks.example.com/b",
                           "--webhook-secret-file", str(key_file))
    assert status == 0 and "webhook secret" not in err
    monkeypatch.setenv("BATCHGEN_WEBHOOK_SECRET", "whsec_???")  # not a key: the API says so
    message = one_line_error(cli("submit", str(prompts), "--model", "tiny", "--webhook", "https://hooks.example.com/b"))
    assert "422" in message and "secret" in message, message
    monkeypatch.delenv("BATCHGEN_WEBHOOK_SECRET")
    message = one_line_error(cli("submit", str(prompts), "--model", "tiny", "--webhook", "https://hooks.example.com/b",
                                 "--webhook-secret", own))  # the old flag is refused, and says why
    assert "ps" in message and own not in message, message
    # The service's own network is not a tenant's to call.
    message = one_line_error(cli("submit", str(prompts), "--model", "tiny", "--webhook", "http://127.0.0.1:6379/"))
    assert "422" in message and "webhook" in message, message
