"""Hostile input over the wire, served by gunicorn as deployed (Flask's test client forgives what
a real server refuses): every answer a clear 4xx with the envelope, never a 5xx."""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

import pytest

from tests.conftest import make_key
from tests.support import GunicornApi, wait_until

DEEP = 100_000  # far past the JSON parser's recursion limit


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_server, registry_file, sqlite_template):  # type: ignore[no-untyped-def]
    import shutil
    import uuid

    from core.settings import Settings

    var = tmp_path_factory.mktemp("wire")
    shutil.copy(sqlite_template, var / "batchgen.db")
    settings = Settings.model_validate({
        "var_dir": var, "database_url": f"sqlite:///{var / 'batchgen.db'}", "redis_url": redis_server.url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:8]}:", "registry_file": registry_file,
        "calibrate": "off", "rate_limit_per_minute": 0})
    server = GunicornApi(settings, make_key(settings.database_url)).start()
    yield server
    assert server.stop() == 0, server.log()


def test_json_nested_past_the_parser_limit_is_a_400(api):
    body = '{"model": "tiny", "prompts": ' + "[" * DEEP + "]" * DEEP + "}"
    for path in ("/v1/jobs", "/v1/completions", "/v1/batches"):
        resp = api.http.post(api.url + path, data=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (path, resp.status_code, resp.text[:300])
        error = resp.json()["error"]
        assert "nests too deeply" in error["message"], error


def test_a_batch_file_line_nested_past_the_limit_fails_the_batch_with_its_line(api):
    good = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny-base", "prompt": "hi", "max_tokens": 2}}
    content = json.dumps(good) + "\n" + "[" * DEEP + "]" * DEEP + "\n"
    upload = api.http.post(api.url + "/v1/files", data={"purpose": "batch"},
                           files={"file": ("deep.jsonl", content.encode())})
    assert upload.status_code == 200, upload.text
    batch = api.http.post(api.url + "/v1/batches", json={
        "input_file_id": upload.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    assert batch.json()["status"] == "failed"
    errors = batch.json()["errors"]["data"]
    assert [(e["line"], e["code"]) for e in errors] == [(2, "invalid_json_line")]
    assert "nests too deeply" in errors[0]["message"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/files", "/v1/batches", "/v1/jobs/job_x/results"])
@pytest.mark.parametrize("value", ["²", "١٢", "1e3", "-1", "99999999999999999999999"])
def test_query_integers_that_are_not_ascii_digits_are_a_4xx(api, path, value):
    resp = api.http.get(api.url + path, params={"limit": value})
    assert resp.status_code in (400, 422), (path, value, resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert "limit" in error["message"]


@pytest.mark.parametrize("name", ['résumé-日本".jsonl', "naïve; filename=evil.sh", "plain.jsonl"])
def test_an_uploaded_file_downloads_under_its_own_name(api, name):
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny-base", "prompt": "hi"}})
    upload = api.http.post(api.url + "/v1/files", data={"purpose": "batch"},
                           files={"file": (name, line.encode())})
    assert upload.status_code == 200, upload.text
    assert upload.json()["filename"] == name
    resp = api.http.get(f"{api.url}/v1/files/{upload.json()['id']}/content")
    assert resp.status_code == 200, resp.text
    assert resp.content == line.encode()
    disposition = resp.headers["Content-Disposition"]
    encoded = re.search(r"filename\*=UTF-8''(\S+)$", disposition)
    assert encoded is not None and unquote(encoded.group(1)) == name, disposition
    fallback = re.search(r'filename="([^"]*)"', disposition)
    assert fallback is not None and fallback.group(1).isascii(), disposition


def test_results_download_names_its_file(api):
    job = api.http.post(api.url + "/v1/jobs", json={"model": "tiny", "prompts": ["x"]})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    resp = wait_until(lambda: api.http.get(f"{api.url}/v1/jobs/{job_id}/results.jsonl"), 10)
    assert resp.status_code == 200
    assert f"filename*=UTF-8''{job_id}.jsonl" in resp.headers["Content-Disposition"]
