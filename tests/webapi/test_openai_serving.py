"""Batch output rendering for every way a request can end, checked with openai's own types."""

import json
from datetime import UTC, datetime

from openai.types import Completion

from core.tables import Batch, JobRequest
from webapi.openai.serving import batch_line

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def render_batch_files(batch, rows):
    """Both files as the finalizer writes them, line by line."""
    lines = [batch_line(r, batch.endpoint, batch.model) for r in rows]
    return b"".join(line for ok, line in lines if ok), b"".join(line for ok, line in lines if not ok)


def row(i, status, **kw):
    return JobRequest(id=f"req_{i:026d}", idx=i, custom_id=f"c{i}", status=status, created_at=NOW, completed_at=NOW, **kw)


def test_each_ending_goes_to_the_right_file_in_the_right_shape():
    batch = Batch(id="batch_x", endpoint="/v1/completions", model="m")
    rows = [row(0, "succeeded", text="hi", finish_reason="length", prompt_tokens=3, completion_tokens=2),
            row(1, "failed", error_code="context_length_exceeded", error_message="too long"),
            row(2, "failed", error_code="generation_failed", error_message="boom"),
            row(3, "expired"), row(4, "cancelled")]
    output, errors = render_batch_files(batch, iter(rows))
    out = [json.loads(x) for x in output.decode().splitlines()]
    err = [json.loads(x) for x in errors.decode().splitlines()]
    assert [o["custom_id"] for o in out] == ["c0"] and out[0]["id"] == f"batch_req_{0:026d}"
    body = Completion.model_validate(out[0]["response"]["body"])
    assert body.choices[0].text == "hi" and body.usage.total_tokens == 5
    assert [(e["custom_id"], e["response"] and e["response"]["status_code"]) for e in err] == [
        ("c1", 400), ("c2", 500), ("c3", None), ("c4", None)]
    assert err[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert [e["error"]["code"] for e in err[2:]] == ["batch_expired", "batch_cancelled"]


def test_no_file_when_nothing_goes_in_it():
    batch = Batch(id="batch_y", endpoint="/v1/chat/completions", model="m")
    output, errors = render_batch_files(batch, iter([row(0, "succeeded", text="a", finish_reason="stop",
                                                         prompt_tokens=1, completion_tokens=1)]))
    assert output and errors == b""


def test_the_system_fingerprint_follows_the_weights(tmp_path):
    import os

    from webapi.openai.serving import system_fingerprint

    (tmp_path / "model.bin").write_bytes(b"w" * 10)
    os.utime(tmp_path / "model.bin", (1_700_000_000, 1_700_000_000))
    first = system_fingerprint("m", tmp_path)
    assert first.startswith("fp_") and system_fingerprint("m", tmp_path) == first
    assert system_fingerprint("other", tmp_path) != first
    (tmp_path / "model.bin").write_bytes(b"w" * 11)  # new weights: another build
    os.utime(tmp_path / "model.bin", (1_700_000_000, 1_700_000_000))
    assert system_fingerprint("m", tmp_path) != first
