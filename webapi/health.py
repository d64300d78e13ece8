"""Liveness: the process answers. (Readiness, with database and Redis checks, comes with ops.)"""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """Alive."""
    return {"status": "ok"}
