"""What views need, built once per app: settings, database, registry, the submission service."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Flask, current_app

from core.db import Database
from core.dispatch import Dispatcher
from core.registry import ModelSpec, Registry, load_registry, registry_path
from core.settings import Settings
from core.submission import Submissions
from core.tokens import TokenCounter, counter_for
from core.webhooks import AllowList, Deliverer

if TYPE_CHECKING:  # built by create_app, which imports them: this module imports no other of webapi
    from webapi.finalizer import Finalizer
    from webapi.limits import Limits
    from webapi.sync import SyncRunner
    from webapi.watch import JobWatch


class Services:
    """The app's shared objects; views reach them with ``services()``. The core ones are made
    here; the API's own (limits, synchronous calls, job watch, finalizer) are made by
    ``webapi.create_app``, which knows them all, and set on it before the app serves."""

    limits: Limits
    sync: SyncRunner
    watch: JobWatch
    finalizer: Finalizer

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.dispatcher = Dispatcher(settings)
        self.submissions = Submissions(settings=settings, db=self.db, registry=self.registry,
                                       dispatcher=self.dispatcher, token_counter=self.token_counter)
        self.deliverer = Deliverer(self.db, AllowList.of(settings), settings.webhook_retries,
                                   timeout_s=settings.webhook_timeout_s, interval_s=settings.webhook_interval_s,
                                   per_owner=settings.webhook_per_owner, retention_s=settings.webhook_retention_s)
        self._registry_file: Path = registry_path(settings)
        self._registry_stamp: float | None = None
        self._registry: Registry | None = None
        self._lock = threading.Lock()
        self._counters: dict[str, TokenCounter | None] = {}

    def init_app(self, app: Flask) -> None:
        app.extensions["batchgen"] = self
        self.finalizer.start()
        if self.deliverer.allow.enabled:  # webhooks off: nothing can be due
            self.deliverer.start()

    def close(self) -> None:
        """Stop background work and close connections (tests, shutdown)."""
        self.dispatcher.wait_idle(timeout=10)  # what was accepted goes on the queue first
        exporter = getattr(self, "exporter", None)
        if exporter is not None:
            exporter.stop()
        self.limits.key_calls.close()
        self.watch.close()
        self.sync.notifier.close()
        self.finalizer.stop()
        self.deliverer.stop()
        self.submissions.group_commit.close()
        self.db.dispose()

    def registry(self) -> Registry:
        """The model registry, re-read when its file changes (``batchgen convert`` adds models)."""
        try:
            stamp: float | None = self._registry_file.stat().st_mtime
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if self._registry is None or stamp != self._registry_stamp:
                self._registry = load_registry(self.settings)
                self._registry_stamp = stamp
            return self._registry

    def token_counter(self, spec: ModelSpec) -> TokenCounter | None:
        """The model's token counter, if its tokenizer is on this machine (checked once)."""
        with self._lock:
            if spec.name not in self._counters:
                self._counters[spec.name] = counter_for(spec.directory(self.settings.models_dir))
            return self._counters[spec.name]


def services() -> Services:
    """The services of the app handling the current request."""
    return current_app.extensions["batchgen"]  # type: ignore[no-any-return]
