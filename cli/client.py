"""The user's side of ``batchgen``: submit, status, results, cancel, jobs, against a running server.

Server and key come from flags, else ``BATCHGEN_SERVER`` and ``BATCHGEN_API_KEY``, else the local
defaults: ``http://<BATCHGEN_HOST>:<BATCHGEN_PORT>`` and the key `make run` wrote to
``var/dev-api-key``. Only the standard library is used, so the command works wherever batchgen is
installed.

Exit status: 0 when it did what was asked; 1 on an error (one line on stderr, the API's own
message), or when ``--wait`` saw the job end other than ``completed``; 130 on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

ENDED = ("completed", "failed", "cancelled", "expired")
DEFAULT_SERVER = "http://127.0.0.1:8000"


class CliError(Exception):
    """A failure to report in one line; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --- where and who ------------------------------------------------------------------------


def default_server() -> str:
    """``BATCHGEN_SERVER``, else where `make run` serves (BATCHGEN_HOST/PORT)."""
    if os.environ.get("BATCHGEN_SERVER"):
        return os.environ["BATCHGEN_SERVER"]
    host = os.environ.get("BATCHGEN_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    port = os.environ.get("BATCHGEN_PORT") or "8000"
    return f"http://{host}:{port}"


def webhook_secret(args: Any) -> str | None:
    """A webhook key of the user's: from ``--webhook-secret-file``, else ``BATCHGEN_WEBHOOK_SECRET``
    (a key on the command line would show in ``ps`` to every user of the machine)."""
    if getattr(args, "webhook_secret_flag", None):
        raise CliError("--webhook-secret is not taken: a key on the command line shows in `ps`; put it in a file "
                       "(--webhook-secret-file) or BATCHGEN_WEBHOOK_SECRET")
    path = getattr(args, "webhook_secret_file", None)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"cannot read the webhook secret: {exc}") from None
    return (os.environ.get("BATCHGEN_WEBHOOK_SECRET") or "").strip() or None


def find_key(flag: str | None) -> str:
    """The API key: --key, ``BATCHGEN_API_KEY``, or the development key `make run` wrote."""
    if flag:
        return flag.strip()
    if os.environ.get("BATCHGEN_API_KEY"):
        return os.environ["BATCHGEN_API_KEY"].strip()
    path = Path(os.environ.get("BATCHGEN_VAR_DIR") or "var") / "dev-api-key"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        raise CliError("no API key: pass --key, set BATCHGEN_API_KEY, or run `make run` here "
                       "(it writes var/dev-api-key)") from None


class Api:
    """A small HTTP client for the native API."""

    def __init__(self, server: str, key: str, timeout: float = 60.0) -> None:
        self.server = server.rstrip("/")
        self.key = key
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
             stream: bool = False) -> Any:
        """The parsed JSON answer (or the open response when ``stream``); ``CliError`` otherwise."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 - the user's server
        except urllib.error.HTTPError as exc:
            raise CliError(describe_error(exc.code, exc.read()), exc.code) from None
        except urllib.error.URLError as exc:
            raise CliError(f"cannot reach {self.server} ({getattr(exc, 'reason', exc)}); is the server "
                           "running (`make run`)? Point to it with --server or BATCHGEN_SERVER") from None
        except (TimeoutError, ConnectionError) as exc:
            raise CliError(f"{self.server} did not answer ({exc})") from None
        if stream:
            return resp
        with resp:
            return json.loads(resp.read() or b"null")


def describe_error(status: int, raw: bytes) -> str:
    """One line from an error answer: status, code, message, the first problem, the request id."""
    try:
        body = json.loads(raw)
        err = body.get("error", body) if isinstance(body, dict) else {}
    except ValueError:
        err = {}
    if not isinstance(err, dict) or "message" not in err:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        return f"HTTP {status}: {text[0][:200] if text else 'no details'}"
    line = f"{status} {err.get('code') or err.get('type') or 'error'}: {err['message']}"
    details = err.get("details") or []
    if isinstance(details, list) and details and isinstance(details[0], dict):  # problems with the input
        first = details[0]
        line += f": {first.get('loc', '')}: {first.get('message', '')}".replace(": : ", ": ")
        if len(details) > 1:
            line += f" (and {len(details) - 1} more)"
    elif isinstance(details, dict) and "retry_after" in details:  # a limit: when to come back
        line += f" (retry after {details['retry_after']} s)"
    if err.get("request_id"):
        line += f" [request {err['request_id']}]"
    return line


# --- reading input ------------------------------------------------------------------------


def parse_value(raw: str) -> Any:
    """``--param`` values: JSON where it parses (numbers, lists, true), else the text itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def pairs(items: list[str] | None, what: str, parse: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} {item!r} is not KEY=VALUE")
        out[key] = parse_value(value) if parse else value
    return out


def read_input(path: str, fmt: str | None) -> dict[str, Any]:
    """``{"prompts": [...]}`` from text (one prompt per line) or ``{"requests": [...]}`` from JSONL."""
    name = "standard input" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{name} is not UTF-8 text") from None
    fmt = fmt or ("jsonl" if path.lower().endswith((".jsonl", ".ndjson")) else "text")
    if fmt == "text":
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise CliError(f"{name} has no prompts (one per line)")
        return {"prompts": prompts}
    requests = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise CliError(f"{name} line {number} is not JSON ({exc}); nothing was sent") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise CliError(f"{name} line {number} must be a JSON object or string; nothing was sent")
        requests.append(value)
    if not requests:
        raise CliError(f"{name} has no requests (one JSON object per line)")
    return {"requests": requests}


# --- showing jobs -------------------------------------------------------------------------


def age(iso: str | None) -> str:
    if not iso:
        return "-"
    seconds = max(0.0, (datetime.now(UTC) - datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def done(counts: dict[str, int]) -> int:
    return counts["succeeded"] + counts["failed"] + counts["cancelled"] + counts["expired"]


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    c = job["counts"]
    total = c["total"] or 1
    filled = int(width * done(c) / total)
    extra = "".join(f" · {c[k]} {k}" for k in ("failed", "cancelled", "expired") if c[k])
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done(c)}/{c['total']} {job['status']}"
            f"{extra} · {job['usage']['total_tokens']} tokens")


def summary(job: dict[str, Any]) -> str:
    c = job["counts"]
    rows = [
        ("job", job["id"] + (f"  ({job['metadata']['name']})" if (job.get("metadata") or {}).get("name") else "")),
        ("status", job["status"]),
        ("model", job["model"]),
        ("requests", f"{c['total']} total: {c['succeeded']} succeeded, {c['failed']} failed, {c['queued']} queued, "
                     f"{c['running']} running, {c['cancelled']} cancelled, {c['expired']} expired"),
        ("tokens", f"{job['usage']['prompt_tokens']} prompt + {job['usage']['completion_tokens']} completion"),
        ("created", f"{job['created_at']} ({age(job['created_at'])})"),
    ]
    if job.get("completed_at"):
        rows.append(("ended", job["completed_at"]))
    elif job.get("estimated_completion_at"):
        rows.append(("estimated end", job["estimated_completion_at"]))
    return "\n".join(f"{k + ':':15}{v}" for k, v in rows)


def sse(resp: Any) -> Iterator[tuple[str, str]]:
    """(event, data) from a server-sent event stream."""
    event, data = "message", []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def wait(api: Api, job: dict[str, Any], out: IO[str]) -> dict[str, Any]:
    """Follow the job until it ends, drawing a progress bar on ``out``; returns the final job."""
    tty = out.isatty()
    last_line = ""

    def draw(j: dict[str, Any]) -> None:
        nonlocal last_line
        line = progress_line(j)
        if tty:
            out.write("\r" + line + "\x1b[K")
        elif line != last_line and (j["status"] in ENDED or done(j["counts"]) != done_before[0]):
            out.write(line + "\n")
        done_before[0] = done(j["counts"])
        last_line = line
        out.flush()

    done_before = [-1]
    draw(job)
    while job["status"] not in ENDED:
        try:
            with api.call("GET", f"/v1/jobs/{job['id']}/events", stream=True) as resp:
                for event, data in sse(resp):
                    body = json.loads(data)
                    if body.get("deleted"):
                        raise CliError(f"{job['id']} was deleted while waiting")
                    job = body
                    draw(job)
                    if event == "end":
                        break
        except (CliError, OSError) as exc:
            if isinstance(exc, CliError) and exc.status is not None and 400 <= exc.status < 500 \
                    and exc.status != 429:
                raise  # not found, not allowed: asking again will not help
            # The stream dropped (a server restart?) or the server is busy with streams (429):
            # read the job once, then try the stream again.
            time.sleep(1.0)
            job = api.call("GET", f"/v1/jobs/{job['id']}")
            draw(job)
    if tty:
        out.write("\n")
    return job


# --- the commands -------------------------------------------------------------------------


def _api(args: Any) -> Api:
    return Api(args.server or default_server(), find_key(args.key))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _ended_well(job: dict[str, Any]) -> int:
    if job["status"] == "completed":
        return 0
    print(f"batchgen: {job['id']} ended {job['status']}", file=sys.stderr)
    return 1


def cmd_submit(args: Any) -> int:
    body: dict[str, Any] = {"model": args.model, **read_input(args.file, args.format)}
    params = pairs(args.param, "--param", parse=True)
    if params:
        body["params"] = params
    metadata = pairs(args.metadata, "--metadata", parse=False)
    if args.name:
        metadata["name"] = args.name
    if metadata:
        body["metadata"] = metadata
    for field in ("kind", "system", "priority", "completion_window"):
        if getattr(args, field, None) is not None:
            body[field] = getattr(args, field)
    secret = webhook_secret(args)
    if getattr(args, "webhook", None):
        body["webhook"] = {"url": args.webhook}
        if secret:
            body["webhook"]["secret"] = secret
    elif getattr(args, "webhook_secret_file", None):
        raise CliError("--webhook-secret-file signs a webhook: name one with --webhook URL")
    api = _api(args)
    job = api.call("POST", "/v1/jobs", body)
    if args.json and not args.wait:
        _print_json(job)
        return 0
    print(job["id"])
    print(f"submitted {job['id']}: {job['counts']['total']} requests for {job['model']}", file=sys.stderr)
    if job.get("webhook") and not secret:
        print(f"webhook secret (shown once): {job['webhook']['secret']}", file=sys.stderr)
    if not args.wait:
        print(f"follow it: batchgen status {job['id']} --wait", file=sys.stderr)
        return 0
    job = wait(api, job, sys.stderr)
    if args.json:
        _print_json(job)
    return _ended_well(job)


def cmd_status(args: Any) -> int:
    api = _api(args)
    job = api.call("GET", f"/v1/jobs/{quote(args.job)}")
    if args.wait:
        job = wait(api, job, sys.stderr)
    if args.json:
        _print_json(job)
    else:
        print(summary(job))
    return _ended_well(job) if args.wait else 0


def cmd_results(args: Any) -> int:
    api = _api(args)
    job = api.call("GET", f"/v1/jobs/{quote(args.job)}")
    if args.wait:
        job = wait(api, job, sys.stderr)
    count = 0
    target = Path(args.output) if args.output and args.output != "-" else None
    partial = target.with_name(target.name + ".partial") if target else None
    with api.call("GET", f"/v1/jobs/{quote(args.job)}/results.jsonl", params={"status": args.status},
                  stream=True) as resp:
        sink = open(partial, "wb") if partial else sys.stdout.buffer  # noqa: SIM115
        try:
            for line in resp:
                sink.write(line)
                count += 1
        except BaseException:
            if partial:
                sink.close()
                partial.unlink(missing_ok=True)
            raise
        finally:
            if partial:
                sink.close()
            else:
                sink.flush()
    if target and partial:
        partial.replace(target)  # a file is whole or not there
    where = f" to {target}" if target else ""
    note = "" if job["status"] in ENDED else f" (the job is {job['status']}: more to come)"
    print(f"{count} results{where}{note}", file=sys.stderr)
    return 0


def cmd_cancel(args: Any) -> int:
    job = _api(args).call("POST", f"/v1/jobs/{quote(args.job)}/cancel")
    if args.json:
        _print_json(job)
    elif job["status"] == "cancelling":
        print(f"{job['id']} cancelling: {job['counts']['running']} running requests finish first, "
              f"{job['counts']['cancelled']} cancelled")
    else:
        print(f"{job['id']} {job['status']}: {job['counts']['cancelled']} requests cancelled")
    return 0


def cmd_jobs(args: Any) -> int:
    page = _api(args).call("GET", "/v1/jobs", params={"limit": args.limit, "status": args.status})
    if args.json:
        _print_json(page)
        return 0
    if not page["data"]:
        print("no jobs" + (f" {args.status}" if args.status else ""))
        return 0
    print(f"{'JOB':32} {'STATUS':10} {'MODEL':28} {'DONE':>13} {'TOKENS':>9}  CREATED")
    for job in page["data"]:
        fraction = f"{done(job['counts'])}/{job['counts']['total']}"
        print(f"{job['id']:32} {job['status']:10} {job['model'][:28]:28} {fraction:>13} "
              f"{job['usage']['total_tokens']:>9}  {age(job['created_at'])}")
    if page["has_more"]:
        print(f"(more: --limit {min(100, args.limit * 2)})", file=sys.stderr)
    return 0


def quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")
