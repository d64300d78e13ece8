"""One frozen, typed settings object, read from ``BATCHGEN_*`` environment variables.

Defaults serve a laptop: SQLite under ``var/``, an embedded Redis started by the launcher,
the demo model, the CPU. Every entry point builds a ``Settings`` once (``Settings.from_env()``)
and passes it down explicitly; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "BATCHGEN_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _setting(default: Any, doc: str, group: str, **constraints: Any) -> Any:
    """A setting's default, what it does and its group (for docs/configuration.md)."""
    return Field(default=default, description=doc, json_schema_extra={"group": group}, **constraints)


def _delays(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ValueError("seconds between retries, comma-separated numbers") from None
    if any(not 0 <= v < 10**7 for v in values):
        raise ValueError("delays are from 0 to 10,000,000 seconds")
    return values


class SettingsError(ValueError):
    """Raised when the environment holds a setting that cannot be used."""


class Settings(BaseModel):
    """Everything a batchgen process can be configured with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Each setting says what it does (``description``) and where it belongs (``group``):
    # docs/configuration.md is generated from them (``python -m cli.config_docs``), so no
    # setting goes undocumented.

    # --- where things are ---
    var_dir: Path = _setting(PROJECT_ROOT / "var", "Where local state lives: the SQLite database, models, "
                             "the embedded Redis's data, calibrations, the development key.", "Storage and broker")
    database_url: str = _setting("", "SQLAlchemy URL of the database (`postgresql://user:pass@host/db`); empty: "
                                 "SQLite at `var_dir/batchgen.db`.", "Storage and broker")
    redis_url: str = _setting("", "Redis URL of the broker (`redis://host:6379/0`); empty: `batchgen up` starts "
                              "an embedded Redis (other commands need one).", "Storage and broker")
    redis_prefix: str = _setting("batchgen:", "Prefix of every Redis key, so several deployments can share one "
                                 "Redis.", "Storage and broker")
    queue_prefix: str = _setting("batchgen", "Prefix of queue names: `<queue_prefix>.<model name>`.",
                                 "Storage and broker")
    models_dir: Path = _setting(Path(""), "Where model directories live; empty: `var_dir/models`.", "Models")
    registry_file: Path | None = _setting(None, "A registry file adding models to the built-in ones (`batchgen "
                                          "convert` writes `models_dir/models.json`).", "Models")

    # --- API ---
    host: str = _setting("127.0.0.1", "Where the API listens (`batchgen up`, `batchgen api`).", "API")
    port: int = _setting(8000, "The API's port.", "API", ge=1, le=65535)
    max_body_bytes: int = _setting(64 * 1024 * 1024, "Largest request body; larger ones get 413 before they "
                                   "are read.", "API", ge=1024)
    large_bodies_at_once: int = _setting(2, "Bodies over 1 MiB (JSON, batch input files) parsed at once per API "
                                         "process; more wait their turn (503 `busy` after 30 s): parsing costs "
                                         "several times a body's size in memory.", "API", ge=1)
    max_requests_per_job: int = _setting(50_000, "Requests one job may hold.", "API", ge=1)
    max_request_new_tokens: int = _setting(32768, "One request's samples (`n`, `best_of`) x `max_new_tokens`, at "
                                           "most.", "Limits and quotas", ge=1)
    request_weight_tokens: int = _setting(
        4096, "A request unit: the caps on pending and stored work count a request once per sample (or scored "
        "continuation) and per this many prompt + new tokens, so sixteen samples weigh sixteen short requests.",
        "Limits and quotas", ge=1)
    max_prompt_chars: int = _setting(200_000, "Characters one prompt (or one request's messages) may hold.",
                                     "API", ge=1)
    inline_dispatch_limit: int = _setting(1_000, "Jobs with more requests than this are marked dispatched only "
                                          "once all of them are on the queue.", "API", ge=0)
    requests_per_message: int = _setting(8, "Request ids per queue message: a worker acks a message once all "
                                         "its requests are stored, and takes work in steps of this many.",
                                         "API", ge=1, le=256)
    sync_timeout_s: float = _setting(600.0, "Synchronous calls (completions, DashScope, PAI-EAS) give up after "
                                     "this long (504).", "API", gt=0)
    stream_max_s: float = _setting(600.0, "An event stream ends after this long; clients reconnect.", "API", gt=0)
    finalize_interval_s: float = _setting(1.0, "How often each API process looks for batches whose job ended, "
                                          "to write their files.", "API", gt=0)
    api_connections: int = _setting(2000, "Connections one API process serves at once (gevent: a waiting call "
                                    "holds a connection, not a thread).", "API", ge=16)
    eas_model: str = _setting("", "The model PAI-EAS calls (`POST /`) run on; empty: `model`.", "API")

    # --- limits ---
    max_pending_per_model: int = _setting(1_000_000, "Request units waiting per model before submissions "
                                          "get 429 `queue_full` (0: off; a unit: see `request_weight_tokens`).", "Limits and quotas", ge=0)
    max_pending_per_key: int = _setting(500_000, "Request units waiting or running per owner before "
                                        "429 `too_many_pending` (0: off).", "Limits and quotas", ge=0)
    rate_limit_per_minute: int = _setting(600, "Requests per key per clock minute before 429 `rate_limited` "
                                          "(0: off).", "Limits and quotas", ge=0)
    max_file_bytes_per_owner: int = _setting(2 * 1024**3, "Bytes of uploaded files per owner (413 "
                                             "`storage_quota_exceeded`; 0: off).", "Limits and quotas", ge=0)
    max_files_per_owner: int = _setting(1000, "Uploaded files per owner (429 `too_many_files`; 0: off).",
                                        "Limits and quotas", ge=0)
    max_stored_requests_per_owner: int = _setting(10_000_000, "Request units kept in an owner's jobs of any "
                                                  "status until deleted (429 `storage_quota_exceeded`; 0: off).",
                                                  "Limits and quotas", ge=0)
    max_long_calls: int = _setting(0, "Event streams, synchronous calls and downloads one API process holds at "
                                   "once before 429 `too_many_streams`; 0: `api_connections` - 100.",
                                   "Limits and quotas", ge=0)
    max_long_calls_per_key: int = _setting(128, "The same, per key across every API process (0: off).",
                                           "Limits and quotas", ge=0)
    auth_failures_per_minute: int = _setting(60, "Requests with keys that are not valid, per client address "
                                             "(an IPv6 /64) and minute, before 429 (0: off).",
                                             "Limits and quotas", ge=0)
    tokenizer_routes: Literal["public", "key"] = _setting(
        "public", "`/tokenize`, `/detokenize`, `/tokenizer_info` (vLLM's, which lm-eval finds by itself): "
        "`public` as vLLM has them (lm-eval sends no key there unless given `auth_token`), or `key` to "
        "require an API key like every other route.", "Limits and quotas")
    tokenizer_per_minute: int = _setting(
        600, "Calls of the public tokenizer routes per client address (an IPv6 /64) and minute, before 429 "
        "`rate_limited` (0: off); with `tokenizer_routes=key` the key's `rate_limit_per_minute` applies instead.",
        "Limits and quotas", ge=0)

    # --- webhooks ---
    webhook_allowed_hosts: str = _setting(
        "*", "Where job and batch webhooks may go, comma-separated: `*` any host name that resolves only to "
        "public addresses; `*.example.com` names under it (public addresses only); `hooks.example.com` that "
        "name wherever it resolves; `10.0.0.0/8` or `127.0.0.1` those addresses. Empty: no webhooks. Checked "
        "when a job is submitted and on the resolved addresses at every send.", "Webhooks")
    webhook_allowed_ports: str = _setting(
        "80,443", "Ports a webhook may use on a host allowed only by a wildcard (`*`, `*.example.com`), "
        "comma-separated; a name or address `webhook_allowed_hosts` names exactly keeps any port.", "Webhooks")
    webhook_retry_s: str = _setting(
        "5,300,1800,7200,18000,36000,36000", "Seconds between a failed send and the next, one number per retry "
        "(Standard Webhooks' schedule); after the last the event fails.", "Webhooks")
    webhook_timeout_s: float = _setting(10.0, "A receiver has this long to answer a send.", "Webhooks", gt=0)
    webhook_interval_s: float = _setting(1.0, "How often each API process looks for webhook events to send.",
                                         "Webhooks", gt=0)
    webhook_per_owner: int = _setting(2, "Sends of one owner's events an API process runs at once (of its 4): "
                                      "a tenant's slow receivers slow only its own webhooks.", "Webhooks", ge=1)
    webhook_max_pending: int = _setting(1000, "Events of one owner waiting to be sent past which a new job or "
                                        "batch naming a webhook is refused (429 `webhook_backlog`); 0: no cap.",
                                        "Webhooks", ge=0)
    webhook_retention_s: float = _setting(7 * 86400.0, "Delivered and failed webhook events are deleted this long "
                                          "after they ended (the job or batch keeps its delivery status).",
                                          "Webhooks", gt=0)

    # --- worker ---
    model: str = _setting("demo", "The model a worker serves (and `make run` starts).", "Worker")
    device: Literal["cpu", "cuda"] = _setting("cpu", "`cuda` runs the worker on a GPU.", "Worker")
    device_index: int = _setting(0, "Which GPU (one worker process per GPU).", "Worker", ge=0)
    compute_type: str = _setting("auto", "CTranslate2 compute type; `auto`: the int8 type calibration found "
                                 "fastest.", "Worker")
    inter_threads: int = _setting(0, "CTranslate2 replicas; 0: measured per device.", "Worker", ge=0)
    intra_threads: int = _setting(0, "Threads per replica; 0: measured per device.", "Worker", ge=0)
    max_batch_size: int = _setting(0, "Requests per batch; 0: measured per device (set, it is never moved).",
                                   "Worker", ge=0)
    max_batch_tokens: int = _setting(0, "Prompt + new tokens per batch; 0: measured per device (set, it is "
                                     "never moved).", "Worker", ge=0)
    max_wait_ms: float | None = _setting(None, "How long a partial batch waits to fill; unset: a tenth of a "
                                         "batch's time here (2-200 ms); 0: never waits.", "Worker", ge=0)
    calibrate: Literal["auto", "force", "off"] = _setting("auto", "`auto`: measure the device once per model, "
                                                          "device and version, then read the cache; `force`: at "
                                                          "every start; `off`: fixed defaults.", "Worker")
    calibration_budget_s: float = _setting(30.0, "Time calibration may take.", "Worker", gt=0)
    calibration_dir: Path = _setting(Path(""), "Where calibrations are cached; empty: `var_dir/calibration`.",
                                     "Worker")
    worker_inflight: int = _setting(256, "Messages a worker holds at once (`--inflight`).", "Worker", ge=1)

    # --- recovery ---
    visibility_timeout_s: int = _setting(300, "A message a worker took and never acked goes back to the queue "
                                         "after this long.", "Recovery", ge=1)
    lease_s: float = _setting(60.0, "A running request whose worker stopped renewing its lease for this long "
                              "may run elsewhere.", "Recovery", gt=0)
    max_attempts: int = _setting(3, "Runs a request may take that killed its worker, before it fails alone "
                                 "(`attempts_exhausted`).", "Recovery", ge=1)
    reconcile_interval_s: float = _setting(30.0, "How often the reconciler re-dispatches requests the database "
                                           "says are queued but no queue holds.", "Recovery", gt=0)
    reconcile_grace_s: float = _setting(60.0, "Only requests older than this are re-dispatched.", "Recovery", ge=0)
    fault_kill_on: str = _setting("", "Testing only: a worker SIGKILLs itself when a request's text contains "
                                  "this marker.", "Testing")
    fault_generate_s: float = _setting(0.0, "Testing only: every generate call takes at least this long (a slow "
                                       "device).", "Testing", ge=0)
    fault_kill_before_ack: bool = _setting(False, "Testing only: a worker SIGKILLs itself once results are stored, "
                                           "before it acks their messages.", "Testing")

    # --- observability ---
    metrics_interval_s: float = _setting(5.0, "How often each process publishes its metrics to Redis (what "
                                         "`/metrics` and `/v1/models` read).", "Logs and metrics", gt=0)
    log_level: str = _setting("INFO", "Log level.", "Logs and metrics")
    log_format: Literal["text", "json"] = _setting("text", "`json`: one JSON object per line (time, level, "
                                                   "process, logger, message, job_id, request_id).",
                                                   "Logs and metrics")

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        # Derived defaults depend on var_dir, so they are filled after it is known.
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.var_dir / 'batchgen.db'}")
        if self.models_dir == Path(""):
            object.__setattr__(self, "models_dir", self.var_dir / "models")
        if self.calibration_dir == Path(""):
            object.__setattr__(self, "calibration_dir", self.var_dir / "calibration")
        return self

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _allow_list(cls, value: str) -> str:
        from core.webhooks import AllowList

        AllowList.parse(value)  # ValueError names an entry that cannot be used
        return value

    @field_validator("webhook_allowed_ports")
    @classmethod
    def _allowed_ports(cls, value: str) -> str:
        from core.webhooks import AllowList

        AllowList.parse("", value)  # ValueError says what is wrong
        return value

    @field_validator("webhook_retry_s")
    @classmethod
    def _retry_schedule(cls, value: str) -> str:
        _delays(value)
        return value

    @property
    def webhook_retries(self) -> tuple[float, ...]:
        """``webhook_retry_s`` as numbers."""
        return _delays(self.webhook_retry_s)

    @property
    def long_call_limit(self) -> int:
        """Event streams and synchronous calls one API process holds at once."""
        return self.max_long_calls or max(1, self.api_connections - 100)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``BATCHGEN_*`` variables; ``overrides`` win over the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None

    def to_env(self) -> dict[str, str]:
        """These settings as ``BATCHGEN_*`` variables, for a child process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is not None:
                env[ENV_PREFIX + name.upper()] = str(value)
        return env

    def queue_for(self, model_name: str) -> str:
        """The Redis queue that carries requests for one (canonical) model name."""
        return f"{self.queue_prefix}.{model_name}"
