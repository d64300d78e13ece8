"""Taking a model's messages from Redis many at a time, and acking them many at a time.

The messages are Celery's (protocol 2, as ``core.queueing`` writes them); the worker is a Celery
worker (its process model, signals, remote control and kombu's recovery of abandoned messages).
What Celery could not do is take them in bulk: kombu's Redis transport pops one message per
``BRPOP``, records it among the unacked with a round trip of its own, and acks each with
another, and Celery wraps each in a request object, a pool hand-off, a trace and an INFO line.
At a message per few requests that was the largest part of the worker's own CPU. So this module
does that part beside Celery, in kombu's own format, so that kombu's machinery still recovers
what a dead worker held:

- ``fetch``: one Lua script moves up to the free room's worth of messages, highest priority
  first, from the queue's lists into kombu's ``unacked`` hash and index (so a worker that dies
  holding them has them restored by kombu after the visibility timeout, as before). With nothing
  waiting it blocks in ``BRPOP`` and records the message it gets the same way (the one moment a
  crash can lose a message, as in kombu; the reconciler dispatches such requests again).
- the messages' request ids go to the batcher; a message is acked when all its requests are
  stored, and the acks of everything settled meanwhile go in one round trip.
- a message handed back (the worker is shutting down) goes back to the head of its queue,
  atomically and only if kombu has not restored it already.

``Consumer`` runs as a Celery bootstep (``install``): it starts once Celery's consumer is
connected and stops when the worker shuts down.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from core.queueing import GENERATE_TASK, queue_keys
from core.settings import Settings

log = logging.getLogger("batchgen.consumer")

# KEYS: the queue's lists (highest priority first), the unacked hash, the unacked index.
# ARGV: how many messages at most, the time (the index's score), the routing key.
_FETCH = """
local n = tonumber(ARGV[1])
local lists = #KEYS - 2
local hash, index = KEYS[lists + 1], KEYS[lists + 2]
local out, taken = {}, 0
for i = 1, lists do
  while taken < n do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    taken = taken + 1
    local ok, tag = pcall(function() return cjson.decode(m)['properties']['delivery_tag'] end)
    if ok and type(tag) == 'string' then
      redis.call('HSET', hash, tag, '[' .. m .. ',"",' .. cjson.encode(ARGV[3]) .. ']')
      redis.call('ZADD', index, ARGV[2], tag)
    end
    out[#out + 1] = m  -- an unreadable one too: the worker logs it and drops it
  end
  if taken >= n then break end
end
return out
"""

# KEYS: the unacked hash, its index, the list to put the message back on. ARGV: tag, message.
_REQUEUE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('RPUSH', KEYS[3], ARGV[2])
  return 1
end
return 0
"""


@dataclass
class Message:
    """A message taken from the queue: its tag, the list it came from, its raw text, its ids."""

    tag: str
    key: str
    raw: str
    request_ids: list[str]


def parse(raw: str, priority_key: Callable[[int], str]) -> Message | None:
    """The request ids of a ``generate`` message; None for a message that is not one."""
    message = json.loads(raw)
    if message.get("headers", {}).get("task") != GENERATE_TASK:
        return None
    args = json.loads(base64.b64decode(message["body"]))[0]
    properties = message["properties"]
    return Message(tag=properties["delivery_tag"], key=priority_key(int(properties.get("priority") or 0)),
                   raw=raw, request_ids=list(args[0]))


def _tag_of(raw: str) -> str | None:
    try:
        return str(json.loads(raw)["properties"]["delivery_tag"])
    except (ValueError, KeyError, TypeError):
        return None


class Consumer:
    """Feeds a model's queue to ``submit(request_ids) -> Future`` (the batcher), at most
    ``inflight`` messages at a time; ``Requeue`` (the ``requeue`` exception type) from a
    future puts its message back on the queue, anything else acks it."""

    def __init__(self, redis: Any, settings: Settings, model: str, submit: Callable[[list[str]], Future[None]],
                 *, inflight: int, requeue: type[BaseException], kill_before_ack: bool = False) -> None:
        self.redis, self.kill_before_ack = redis, kill_before_ack
        self.settings, self.submit, self.inflight, self.requeue_on = settings, submit, inflight, requeue
        self.lists = queue_keys(settings, model)
        self.queue = settings.queue_for(model)
        self.unacked = settings.redis_prefix + "unacked"
        self.index = settings.redis_prefix + "unacked_index"
        self._fetch = redis.register_script(_FETCH)
        self._requeue = redis.register_script(_REQUEUE)
        self._held: dict[str, Message] = {}
        self._cond = threading.Condition()
        self._settled: queue.Queue[tuple[str, BaseException | None] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.fetches = 0  # round trips that took messages (tests, the bench)
        self.acks = 0  # round trips that acked messages

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Consumer:
        self._threads = [threading.Thread(target=self._fetch_loop, name="fetcher", daemon=True),
                         threading.Thread(target=self._ack_loop, name="acker", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop_fetching(self, wait_s: float = 0.0) -> None:
        """Take no more messages (the worker is shutting down); ``wait_s``: wait that long for
        the fetcher to end (a message it was taking then goes back to its queue)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if wait_s and self._threads:
            self._threads[0].join(wait_s)

    def close(self, timeout: float = 10.0) -> None:
        """After the batcher stopped: ack or hand back what settled, then stop."""
        self.stop_fetching()
        self._settled.put(None)
        for thread in self._threads:
            thread.join(timeout)

    @property
    def held(self) -> int:
        with self._cond:
            return len(self._held)

    # --- taking messages ---------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        delay = 0.25
        while not self._stop.is_set():
            with self._cond:
                while len(self._held) >= self.inflight and not self._stop.is_set():
                    self._cond.wait(1.0)
                room = self.inflight - len(self._held)
            if self._stop.is_set():
                return
            try:
                raws = self.fetch(room)
                if not raws:
                    raws = self._wait_for_one()
                delay = 0.25
            except Exception as exc:  # Redis away: kombu's consumer reconnects the same way
                log.warning("could not take messages (%s); retrying in %.2fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            for raw in raws:
                if self._stop.is_set():  # the worker began to stop meanwhile: not ours to start
                    self._put_back(raw)
                    continue
                try:
                    self._deliver(raw)
                except Exception:  # a bug must not stop this worker's intake silently
                    log.exception("a message on %s could not be handed over; it goes back", self.queue)
                    self._put_back(raw)

    def fetch(self, count: int) -> list[str]:
        """Up to ``count`` messages, highest priority first, recorded as unacked in the same step."""
        raws = self._fetch(keys=[*self.lists, self.unacked, self.index], args=[count, time.time(), self.queue])
        if raws:
            self.fetches += 1
        return [r.decode() if isinstance(r, bytes) else r for r in raws]

    def _wait_for_one(self) -> list[str]:
        """Nothing waiting: block until a message comes (up to a second), and record it as
        unacked at once."""
        item = self.redis.brpop(self.lists, timeout=1)
        if item is None:
            return []
        raw = item[1].decode() if isinstance(item[1], bytes) else item[1]
        tag = json.loads(raw)["properties"]["delivery_tag"]
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.unacked, tag, f'[{raw},"",{json.dumps(self.queue)}]')
        pipe.zadd(self.index, {tag: time.time()})
        pipe.execute()
        return [raw]

    def _deliver(self, raw: str) -> None:
        try:
            message = parse(raw, lambda pri: self.lists[pri])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            message = None
            log.error("a message on %s could not be read (%s); dropped", self.queue, exc)
        if message is None:  # not ours to run (Celery itself drops a task it does not know)
            self._ack_now(_tag_of(raw))
            return
        with self._cond:
            self._held[message.tag] = message
        future = self.submit(message.request_ids)
        future.add_done_callback(lambda f, tag=message.tag: self._settled.put((tag, f.exception())))

    def _put_back(self, raw: str) -> None:
        """Return a message taken but not started to the head of its queue."""
        try:
            message = parse(raw, lambda pri: self.lists[pri])
            if message is not None:
                with self._cond:
                    self._held.pop(message.tag, None)
                    self._cond.notify_all()
                self._requeue(keys=[self.unacked, self.index, message.key], args=[message.tag, message.raw])
        except Exception as exc:  # kombu restores it after the visibility timeout
            log.warning("could not put a message back (%s)", exc)

    def _ack_now(self, tag: str | None) -> None:
        if tag is None:
            return
        try:
            self.redis.pipeline(transaction=False).hdel(self.unacked, tag).zrem(self.index, tag).execute()
        except Exception as exc:
            log.warning("could not drop an unreadable message (%s)", exc)

    # --- settling ----------------------------------------------------------------------------

    def _ack_loop(self) -> None:
        while True:
            first = self._settled.get()
            settled = [] if first is None else [first]
            stop = first is None
            while True:
                try:
                    nxt = self._settled.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    settled.append(nxt)
            if settled:
                self._settle(settled)
            if stop:
                return

    def _settle(self, settled: Sequence[tuple[str, BaseException | None]]) -> None:
        with self._cond:
            messages = [(self._held.get(tag), exc) for tag, exc in settled]
        acks = [m.tag for m, exc in messages if m is not None and not isinstance(exc, self.requeue_on)]
        back = [m for m, exc in messages if m is not None and isinstance(exc, self.requeue_on)]
        if acks and self.kill_before_ack:  # fault tests: results stored, messages not acked
            log.error("fault injection: killing this worker before it acks %d messages", len(acks))
            os.kill(os.getpid(), signal.SIGKILL)
        for attempt in range(5):
            try:
                if acks:
                    self.redis.pipeline(transaction=False).hdel(self.unacked, *acks).zrem(self.index, *acks).execute()
                    self.acks += 1
                for message in back:
                    self._requeue(keys=[self.unacked, self.index, message.key], args=[message.tag, message.raw])
                break
            except Exception as exc:
                # Unacked messages are restored by kombu after the visibility timeout, and their
                # requests, already stored, are not run again: a lost ack costs a redelivery.
                log.warning("could not ack %d messages (%s)", len(acks) + len(back), exc)
                time.sleep(min(0.25 * 2 ** attempt, 2.0))
        if back:
            log.info("%d messages handed back to %s", len(back), self.queue)
        with self._cond:
            for tag, _ in settled:
                self._held.pop(tag, None)
            self._cond.notify_all()


def install(app: Any, consumer: Consumer) -> None:
    """Run ``consumer`` as a bootstep of the Celery worker ``app``: started once Celery's own
    consumer is connected, told to take nothing more when the worker shuts down."""
    from celery import bootsteps

    class Step(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.connection:Connection",)
        started = False

        def start(self, c: Any) -> None:
            if not Step.started:  # Celery restarts its consumer after a broker error: start once
                Step.started = True
                consumer.start()

        def shutdown(self, c: Any) -> None:
            consumer.stop_fetching()

    app.steps["consumer"].add(Step)
