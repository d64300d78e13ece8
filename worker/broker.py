"""kombu's Redis transport, with one change: a channel reuses its Redis client.

kombu's Redis channel builds a new redis-py client for every command it sends outside the event
loop (``Channel._create_client``): twice per message a worker consumes (recording the unacked
message, then acking it). A redis-py client copies some 170 response callbacks when it is built,
which made client construction a large part of the worker's own CPU per request. A client is
only a handle on the channel's connection pool and is thread-safe, so this channel keeps one per
pool; when kombu replaces the pool (after a connection error) a new client is made for the new one.

Selected by the worker's Celery app as ``broker_transport`` (see ``worker.celery_app``); the URL
and every transport option stay as they are.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A kombu Redis channel whose synchronous client is made once per connection pool."""

    _batchgen_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the event loop's BRPOP client: kombu manages it
            return super()._create_client(asynchronous=True)
        client = self._batchgen_client
        if client is None or client.connection_pool is not self.pool:
            client = self._batchgen_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel`` above."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
