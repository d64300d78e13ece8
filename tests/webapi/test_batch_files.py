"""Batch output files: written by the API's finalizer once the job has ended, a part at a time,
in short transactions; reading a batch never writes; a finalizer that died is replaced."""

from __future__ import annotations

import io
import json
from datetime import timedelta

from sqlalchemy import event, select, update

from core import files as file_service
from core.tables import Batch, File, FilePart, utcnow
from tests.conftest import authed, make_key


def _app(make_settings, sqlite_url):  # type: ignore[no-untyped-def]
    from webapi import create_app

    # The finalizer's own thread looks only once an hour: the tests run it by hand.
    app = create_app(make_settings(sqlite_url, finalize_interval_s=3600, rate_limit_per_minute=0))
    return app, authed(app, make_key(sqlite_url))


def _ended_batch(client, n: int) -> str:  # type: ignore[no-untyped-def]
    """A batch of n requests whose job has ended (cancelled before any worker ran it)."""
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "tiny-base", "prompt": f"prompt {i} " + "x" * 200}}) + "\n"
                    for i in range(n))
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(lines.encode()), "in.jsonl")})
    batch = client.post("/v1/batches", json={"input_file_id": upload.get_json()["id"],
                                             "endpoint": "/v1/completions", "completion_window": "24h"}).get_json()
    assert batch["status"] == "in_progress", batch
    assert client.post(f"/v1/batches/{batch['id']}/cancel").get_json()["status"] == "cancelling"
    return batch["id"]


def test_reading_a_batch_never_writes_and_the_finalizer_writes_its_files_in_parts(
        make_settings, sqlite_url, monkeypatch):
    monkeypatch.setattr(file_service, "PART_BYTES", 4096)  # many parts from a small batch
    app, client = _app(make_settings, sqlite_url)
    svc = app.extensions["batchgen"]
    try:
        batch_id = _ended_batch(client, 60)
        writes = []

        def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
            if statement.lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
                writes.append(statement)

        event.listen(svc.db.engine, "before_cursor_execute", count)
        try:
            for _ in range(3):
                assert client.get(f"/v1/batches/{batch_id}").get_json()["status"] == "cancelling"
                assert client.get("/v1/batches").status_code == 200
        finally:
            event.remove(svc.db.engine, "before_cursor_execute", count)
        assert writes == []

        assert svc.finalizer.run_once() == [batch_id]
        done = client.get(f"/v1/batches/{batch_id}").get_json()
        assert done["status"] == "cancelled" and done["output_file_id"] is None and done["error_file_id"]
        with svc.db.read() as s:
            sizes = list(s.scalars(select(func_length(FilePart.content)).where(
                FilePart.file_id == done["error_file_id"]).order_by(FilePart.seq)))
            recorded = s.get(File, done["error_file_id"]).bytes
        assert len(sizes) > 3 and max(sizes) <= 4096 and sum(sizes) == recorded
        content = client.get(f"/v1/files/{done['error_file_id']}/content")
        assert len(content.data) == recorded
        rows = [json.loads(line) for line in content.data.decode().splitlines()]
        assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(60)]
        assert {r["error"]["code"] for r in rows} == {"batch_cancelled"}
        assert svc.finalizer.run_once() == []  # once
    finally:
        svc.close()


def func_length(column):  # type: ignore[no-untyped-def]
    from sqlalchemy import func

    return func.length(column)


def test_a_finalizer_that_died_midway_is_replaced_and_its_half_written_files_go(make_settings, sqlite_url):
    app, client = _app(make_settings, sqlite_url)
    svc = app.extensions["batchgen"]
    try:
        batch_id = _ended_batch(client, 5)
        # A finalizer took the batch, wrote part of a file, and died (its process was killed).
        with svc.db.write() as s:
            owner = s.get(Batch, batch_id).owner
            s.execute(update(Batch).where(Batch.id == batch_id)
                      .values(status="finalizing", finalizing_at=utcnow() - timedelta(hours=1)))
            partial = file_service.new_file(session=s, owner=owner, purpose="batch_output",
                                            filename=f"{batch_id}_error.jsonl")
            file_service.add_part(session=s, file_id=partial.id, seq=0, content=b'{"half": ')
        assert svc.finalizer.run_once() == [batch_id]
        done = client.get(f"/v1/batches/{batch_id}").get_json()
        assert done["status"] == "cancelled" and done["error_file_id"] != partial.id
        with svc.db.read() as s:
            assert s.get(File, partial.id) is None
        lines = client.get(f"/v1/files/{done['error_file_id']}/content").data.decode().splitlines()
        assert len(lines) == 5 and all(json.loads(line)["error"]["code"] == "batch_cancelled" for line in lines)
    finally:
        svc.close()
