"""One frozen, typed settings object, read from ``BATCHGEN_*`` environment variables.

Defaults serve a laptop: SQLite under ``var/``, an embedded Redis started by the launcher,
the demo model, the CPU. Every entry point builds a ``Settings`` once (``Settings.from_env()``)
and passes it down explicitly; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "BATCHGEN_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """Raised when the environment holds a setting that cannot be used."""


class Settings(BaseModel):
    """Everything a batchgen process can be configured with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Where local state lives (SQLite database, demo model, dev Redis, keys).
    var_dir: Path = PROJECT_ROOT / "var"
    # SQLAlchemy URL; empty means SQLite at ``var_dir/batchgen.db``.
    database_url: str = ""
    # Redis URL for the Celery broker; empty means "start an embedded one" (launcher only).
    redis_url: str = ""
    # Prefix for every Redis key kombu writes, so several deployments can share one Redis.
    redis_prefix: str = "batchgen:"
    # Prefix of queue names: ``<queue_prefix>.<model name>``.
    queue_prefix: str = "batchgen"

    # Models: where model directories live and an optional registry file adding entries.
    models_dir: Path = Field(default=Path(""))
    registry_file: Path | None = None

    # API server.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Bodies over 1 MiB (JSON, batch input files) parsed at once per API process; more wait their
    # turn (503 ``busy`` after 30 s): parsing costs several times a body's size in memory.
    large_bodies_at_once: int = Field(default=2, ge=1)
    max_requests_per_job: int = Field(default=50_000, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    # Jobs with more requests than this are dispatched by a background thread, not in the request.
    inline_dispatch_limit: int = Field(default=1_000, ge=0)
    # Request ids per queue message: a worker pays Celery's per-message cost once for this many,
    # and takes work from the queue in steps of this many (so, with several workers, one may hold
    # up to this many times its in-flight messages). 1 gives every request its own message.
    requests_per_message: int = Field(default=8, ge=1, le=256)
    # Backpressure (429 with Retry-After past these; 0 turns a limit off).
    max_pending_per_model: int = Field(default=1_000_000, ge=0)
    max_pending_per_key: int = Field(default=500_000, ge=0)
    rate_limit_per_minute: int = Field(default=600, ge=0)
    # Storage per owner (0 turns a quota off): bytes and number of uploaded files (413 / 429 past
    # them; files the service writes, batch outputs, do not count), and requests stored in jobs
    # of any status until deleted (429).
    max_file_bytes_per_owner: int = Field(default=2 * 1024**3, ge=0)
    max_files_per_owner: int = Field(default=1000, ge=0)
    max_stored_requests_per_owner: int = Field(default=10_000_000, ge=0)
    # Synchronous calls (completions, DashScope, PAI-EAS) give up after this long.
    sync_timeout_s: float = Field(default=600.0, gt=0)
    # An event stream ends after this long (clients reconnect, as the web page and CLI do): a
    # stream cannot hold its place, nor a revoked key's access, forever.
    stream_max_s: float = Field(default=600.0, gt=0)
    # How often each API process looks for batches whose job has ended, to write their files.
    finalize_interval_s: float = Field(default=1.0, gt=0)
    # Connections one API process serves at once (gunicorn's gevent workers: a waiting call, such as
    # an event stream or a synchronous completion, holds a connection but no thread). Past
    # max_long_calls streams, synchronous calls and downloads in one process (0: api_connections
    # - 100, so short calls always find room) more get 429.
    api_connections: int = Field(default=2000, ge=16)
    max_long_calls: int = Field(default=0, ge=0)
    # Event streams, synchronous calls and downloads one API key may hold open at once, across
    # every API process (429 past it; 0: no cap).
    max_long_calls_per_key: int = Field(default=128, ge=0)
    # Requests with keys that are not valid, per client address and minute, before 429 (0: no cap).
    auth_failures_per_minute: int = Field(default=60, ge=0)
    # The model PAI-EAS-style calls (POST /) run on; empty means BATCHGEN_MODEL.
    eas_model: str = ""

    # Worker.
    model: str = "demo"
    device: Literal["cpu", "cuda"] = "cpu"
    device_index: int = Field(default=0, ge=0)
    compute_type: str = "auto"
    inter_threads: int = Field(default=0, ge=0)  # 0: chosen per device
    intra_threads: int = Field(default=0, ge=0)  # 0: chosen per device
    max_batch_size: int = Field(default=0, ge=0)  # 0: chosen per device
    max_batch_tokens: int = Field(default=0, ge=0)  # 0: chosen per device
    # Unset: derived from how long a batch takes here (a tenth of it, 2-200 ms; 20 ms if that is
    # unknown). 0: a batch never waits to fill.
    max_wait_ms: float | None = Field(default=None, ge=0)
    # Calibration: "auto" measures the device once per model, device and version and caches it
    # under var_dir/calibration; "force" measures at every start; "off" uses fixed defaults.
    calibrate: Literal["auto", "force", "off"] = "auto"
    calibration_budget_s: float = Field(default=30.0, gt=0)
    # Where calibrations are cached; empty means ``var_dir/calibration``.
    calibration_dir: Path = Field(default=Path(""))
    worker_inflight: int = Field(default=256, ge=1)
    # Recovery: a message a worker took and never acked goes back to the queue after
    # visibility_timeout_s; a running request whose worker stopped renewing its lease (lease_s)
    # may run again, at most max_attempts times in all; the reconciler re-dispatches, every
    # reconcile_interval_s, requests older than reconcile_grace_s that no queue holds.
    visibility_timeout_s: int = Field(default=300, ge=1)
    lease_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    reconcile_grace_s: float = Field(default=60.0, ge=0)
    # Testing only: a worker SIGKILLs itself when a request's text contains this marker.
    fault_kill_on: str = ""
    # Fault injection for the fault tests: every generate call takes at least this long (a slow
    # device), so a test can act while a batch is generating. 0 in production.
    fault_generate_s: float = Field(default=0.0, ge=0)

    # How often each process publishes its metrics to Redis (what /metrics and /v1/models read).
    metrics_interval_s: float = Field(default=5.0, gt=0)

    log_level: str = "INFO"
    # "json": one JSON object per line (time, level, process, logger, message, job_id, request_id).
    log_format: Literal["text", "json"] = "text"

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
