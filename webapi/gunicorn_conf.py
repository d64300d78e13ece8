"""gunicorn settings for the API (``batchgen api`` and ``batchgen up`` pass ``-c python:webapi.gunicorn_conf``).

Workers are gevent workers: every connection is a greenlet, so a call that waits (an event
stream, a synchronous completion, a download) holds a connection but no thread, and one process
holds thousands (``BATCHGEN_API_CONNECTIONS``). The database driver (psycopg), Redis and the
service's own threads all yield to the loop while they wait (gevent patches the standard
library before the app is imported); SQLite calls are short and run in place.

On SIGTERM a gunicorn worker stops accepting and waits, up to its graceful timeout, for the calls
it is serving. An event stream would hold it there until killed (and the client would see a cut
connection): so the worker also tells open streams to end cleanly, and the clients reconnect to a
process that is still serving. Synchronous calls are left to finish.
"""

from __future__ import annotations

import os
import signal
from typing import Any

worker_class = "gevent"
worker_connections = int(os.environ.get("BATCHGEN_API_CONNECTIONS", "2000"))
graceful_timeout = 30
# No `gunicornc` control socket: batchgen does not use it, and its default place ($HOME/.gunicorn)
# is not writable for the images' unprivileged user (gunicorn logged an error at every start).
control_socket_disable = True


def _envelope_errors() -> None:
    """What gunicorn refuses before the app sees it (a request line past ``limit_request_line``,
    headers past their limits, a request it cannot parse) is answered in the error envelope, not
    gunicorn's HTML page: its workers write those through ``gunicorn.util.write_error``."""
    from gunicorn import util

    from webapi.errors import wire_error

    def write_error(sock: Any, status: int, reason: str, message: str) -> None:
        util.write_nonblock(sock, wire_error(status, reason, message or reason))

    util.write_error = write_error


def post_worker_init(worker: Any) -> None:
    from webapi.jobs import STOPPING

    _envelope_errors()

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        STOPPING.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def worker_exit(server: Any, worker: Any) -> None:
    # Jobs answered 202 whose requests the publishing thread still holds go on the queue before
    # this process ends (if it dies instead, the workers' reconciler dispatches them).
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("batchgen") if app is not None else None
    if services is not None:
        services.dispatcher.wait_idle(timeout=5)
