"""The batchgen HTTP API: ``create_app(settings)`` builds a Flask app; nothing happens at import."""

from __future__ import annotations

from flask import Flask

from core.settings import Settings
from webapi.services import Services


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API for ``settings`` (default: from ``BATCHGEN_*`` environment variables)."""
    from webapi import auth, compat, errors, health, jobs, openapi, ops, tokenizer, web
    from webapi.openai import router as openai_router

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    Services(settings).init_app(app)
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
