"""Keys, and owner isolation on every route: another owner's job does not exist for you."""

import hashlib

import pytest
from sqlalchemy import select

from core.auth import authenticate, create_key, revoke_key
from core.db import Database
from core.tables import ApiKey
from tests.conftest import authed, make_key


def envelope(resp, status, code):
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["error"]["code"] == code and body["error"]["request_id"] == resp.headers["X-Request-Id"]
    return body["error"]


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer", "Bearer nonsense", "Bearer key_x.y",
                                    "Bearer key_01m8cp8t2p02217t3hc9c42h9x.wrongsecret"])
def test_requests_without_a_valid_key_are_401(app, header):
    client = app.test_client()
    headers = {"Authorization": header} if header else {}
    resp = client.get("/v1/jobs", headers=headers)
    envelope(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_health_and_documentation_need_no_key(app):
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_a_revoked_key_is_refused(app, settings):
    db = Database(settings.database_url)
    with db.write() as s:
        key, token = create_key(session=s, owner="carol")
    with db.write() as s:
        revoke_key(session=s, key_id=key.id)
    db.dispose()
    envelope(authed(app, token).get("/v1/jobs"), 401, "unauthorized")


def test_keys_are_stored_only_as_salted_hashes(settings):
    db = Database(settings.database_url)
    with db.write() as s:
        key_a, token_a = create_key(session=s, owner="o")
        key_b, _ = create_key(session=s, owner="o")
    with db.read() as s:
        rows = s.scalars(select(ApiKey)).all()
        assert authenticate(session=s, token=token_a).owner == "o"
        assert authenticate(session=s, token=token_a[:-1] + ("A" if token_a[-1] != "A" else "B")) is None
    secret = token_a.split(".", 1)[1]
    for row in rows:
        assert secret not in row.secret_hash and secret not in row.salt and len(row.secret_hash) == 64
        assert row.secret_hash != hashlib.sha256(secret.encode()).hexdigest()  # salted, not a bare hash
    assert key_a.salt != key_b.salt
    db.dispose()


JOB_ROUTES = [("get", "/v1/jobs/{id}"), ("get", "/v1/jobs/{id}/results"), ("get", "/v1/jobs/{id}/results.jsonl"),
              ("get", "/v1/jobs/{id}/events"), ("post", "/v1/jobs/{id}/cancel"), ("delete", "/v1/jobs/{id}")]


def test_another_owners_job_is_not_found_on_every_route(app, client, settings):
    job = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["mine"]}).get_json()
    bob = authed(app, make_key(settings.database_url, owner="bob"))
    for method, route in JOB_ROUTES:
        envelope(getattr(bob, method)(route.format(id=job["id"])), 404, "not_found")
    assert bob.get("/v1/jobs").get_json()["data"] == []
    # ...and bob changed nothing: the job is still alice's and still queued.
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "queued"
    admin = authed(app, make_key(settings.database_url, owner="root", admin=True))
    assert admin.get(f"/v1/jobs/{job['id']}").get_json()["owner"] == "alice"
    assert [j["id"] for j in admin.get("/v1/jobs").get_json()["data"]] == [job["id"]]


def test_every_job_route_is_checked_above(app):
    documented = {(m.upper(), r.replace("{id}", "<job_id>")) for m, r in JOB_ROUTES}
    routes = {(method, rule.rule) for rule in app.url_map.iter_rules() if "<job_id>" in rule.rule
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == documented, "a job route was added: add it to JOB_ROUTES"
