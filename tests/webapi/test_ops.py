"""Readiness, metrics (parsed by prometheus_client's own parser), structured logs."""

import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from core.db import alembic_config, upgrade


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams, name):
    return [(s.name, s.labels, s.value) for f in fams.values() for s in f.samples if s.name == name]


def test_ready_when_database_redis_and_schema_are(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ready", "checks": {"database": "ok", "migrations": "ok", "redis": "ok"}}


def test_not_ready_without_redis_or_with_an_old_schema(make_settings, sqlite_url, tmp_path):
    from alembic import command

    from webapi import create_app

    app = create_app(make_settings(sqlite_url, redis_url="redis://127.0.0.1:1/0"))
    body = app.test_client().get("/readyz")
    assert body.status_code == 503 and body.get_json()["checks"]["redis"].startswith("unreachable")
    app.extensions["batchgen"].close()

    old = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(old, "0003")
    app = create_app(make_settings(old))
    checks = app.test_client().get("/readyz").get_json()["checks"]
    assert checks["migrations"].startswith("at 0003") and checks["database"] == "ok"
    command.upgrade(alembic_config(old), "head")
    assert app.test_client().get("/readyz").status_code == 200
    app.extensions["batchgen"].close()


def test_metrics_show_jobs_requests_queues_and_this_process(app, client, settings):
    client.post("/v1/jobs", json={"model": "tiny", "prompts": ["a", "b", "c"]})
    job = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["d"]}).get_json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    app.extensions["batchgen"].dispatcher.wait_idle()  # published by the dispatcher's thread
    app.extensions["batchgen"].exporter.publish()  # what the exporter thread does every 5 s
    resp = app.test_client().get("/metrics")  # public: Prometheus sends no key
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    fams = families(resp.get_data(as_text=True))
    jobs = {s[1]["status"]: s[2] for s in samples(fams, "batchgen_jobs")}
    assert jobs == {"queued": 1, "cancelled": 1}
    requests = {s[1]["status"]: s[2] for s in samples(fams, "batchgen_requests")}
    assert (requests["queued"], requests["cancelled"], requests["succeeded"]) == (3, 1, 0)
    depth = {s[1]["model"]: s[2] for s in samples(fams, "batchgen_queue_depth")}
    # Every message published, none consumed (no worker): a job's requests share a message (and
    # jobs submitted at the same moment may too).
    assert depth["tiny-chat"] in (1, 2)
    submit = samples(fams, "batchgen_submit_seconds_count")
    assert submit and submit[0][1]["process"].startswith("api:") and submit[0][2] == 2
    http = {(s[1]["route"], s[1]["status"]) for s in samples(fams, "batchgen_http_requests_total")}
    assert ("/v1/jobs", "202") in http and ("/v1/jobs/<job_id>/cancel", "200") in http


def test_json_logs_carry_job_and_request_ids(app, capsys):
    from core.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", process="api", fmt="json")
        log = logging.getLogger("batchgen.test")
        log.info("plain line")
        log.info("about a job", extra={"job_id": "job_x", "request_id": "req_y"})
        with app.test_request_context("/v1/jobs"):
            from flask import g

            g.request_id = "rid_123"
            log.warning("inside a request")
        lines = [json.loads(x) for x in capsys.readouterr().err.strip().splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [(x["message"], x["job_id"], x["request_id"]) for x in lines] == [
        ("plain line", None, None), ("about a job", "job_x", "req_y"), ("inside a request", None, "rid_123")]
    assert all(x["process"] == "api" and x["level"] and x["time"].endswith("+00:00") for x in lines)


def test_a_scraper_in_a_loop_cannot_load_the_database(client, app):
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import event

    aggregates = []

    def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if "sum(" in statement.lower() or "count(" in statement.lower():
            aggregates.append(statement)

    engine = app.extensions["batchgen"].db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: client.get("/metrics"), range(200)))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert {a.status_code for a in answers} == {200}
    assert all("batchgen_jobs" in a.get_data(as_text=True) or "batchgen_requests" in a.get_data(as_text=True)
               for a in answers)
    assert 1 <= len(aggregates) <= 4, len(aggregates)  # one refresh (two statements), not 200


def test_an_event_keeps_its_data_whatever_line_breaks_it_holds():
    from webapi import sse

    assert sse.event({"a": 1}, name="progress") == 'event: progress\ndata: {"a": 1}\n\n'
    assert sse.event("[DONE]") == "data: [DONE]\n\n"
    text = sse.event("one\r\ntwo\rthree\nfour\u2028five", id=3, comment="HTTP_STATUS/200")
    assert text == "id: 3\n: HTTP_STATUS/200\ndata: one\ndata: two\ndata: three\ndata: four\u2028five\n\n"
    # DashScope's own form: its SDK matches "event:error" before it strips the value.
    assert sse.event({"code": "X"}, id=1, name="error", comment="HTTP_STATUS/500", compact=True) == \
        'id:1\nevent:error\n:HTTP_STATUS/500\ndata:{"code": "X"}\n\n'
