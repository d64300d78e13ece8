"""The API's entry point for gunicorn (``webapi.wsgi:app``): logging configured once, then the app."""

from core.logs import configure_logging
from core.settings import Settings
from webapi import create_app

settings = Settings.from_env()
configure_logging(settings.log_level, process="api", fmt=settings.log_format)
app = create_app(settings)
