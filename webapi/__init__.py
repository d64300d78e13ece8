"""The batchgen HTTP API: ``create_app(settings)`` builds a Flask app (and wires the objects its
views share); nothing happens at import."""

from __future__ import annotations

from flask import Flask

from core.settings import Settings
from webapi import auth, compat, errors, health, jobs, openapi, ops, tokenizer, web
from webapi.finalizer import Finalizer
from webapi.limits import Limits
from webapi.openai import router as openai_router
from webapi.openai.serving import fingerprint_of
from webapi.services import Services
from webapi.sync import SyncRunner
from webapi.views import job_view
from webapi.watch import JobWatch


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API for ``settings`` (default: from ``BATCHGEN_*`` environment variables)."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    svc = Services(settings)
    svc.limits = Limits(settings)
    svc.sync = SyncRunner(svc)
    svc.watch = JobWatch(svc.db, view=job_view)
    svc.finalizer = Finalizer(svc.db, interval_s=settings.finalize_interval_s,
                              fingerprint=lambda model: fingerprint_of(svc.registry(), model))
    svc.init_app(app)
    errors.init_app(app)  # first: every answer, a 401 too, carries a request id
    auth.init_app(app)
    openapi.init_app(app)
    ops.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(openai_router.bp)
    app.register_blueprint(compat.dashscope)
    app.register_blueprint(compat.eas)
    app.register_blueprint(web.bp)
    app.register_blueprint(tokenizer.bp)
    return app
