"""The bulk consumer against a real Redis: many messages per round trip, highest priority first,
recorded as unacked in kombu's own format (kombu's restore brings back what a dead worker held),
acked together once settled, handed back to the head of the queue at shutdown."""

from __future__ import annotations

import base64
import json
import time
import uuid
from concurrent.futures import Future

import pytest
import redis as redis_lib

from core.queueing import celery_config, celery_priority, publish, queue_keys
from core.settings import Settings
from worker.batcher import Requeue
from worker.consumer import Consumer


@pytest.fixture
def env(redis_server):  # type: ignore[no-untyped-def]
    settings = Settings(redis_url=redis_server.url, redis_prefix=f"t{uuid.uuid4().hex[:8]}:", visibility_timeout_s=1)
    client = redis_lib.Redis.from_url(redis_server.url)
    yield settings, client
    for key in client.scan_iter(match=settings.redis_prefix + "*"):
        client.delete(key)
    client.close()


class Submissions:
    """What the consumer hands over (the batcher's ``submit``): futures the test settles."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Future[None]]] = []

    def __call__(self, ids: list[str]) -> Future[None]:
        future: Future[None] = Future()
        self.calls.append((ids, future))
        return future


def wait_for(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def queued(client, settings) -> int:  # type: ignore[no-untyped-def]
    return sum(client.llen(k) for k in queue_keys(settings, "m"))


def test_many_messages_per_round_trip_highest_priority_first_acked_together(env):
    settings, client = env
    publish(client, settings, model="m", request_ids=[f"low{i}" for i in range(40)], priority=3, per_message=4)
    publish(client, settings, model="m", request_ids=[f"high{i}" for i in range(8)], priority=9, per_message=4)
    submit = Submissions()
    consumer = Consumer(client, settings, "m", submit, inflight=100, requeue=Requeue)
    taken = consumer.fetch(100)
    assert len(taken) == 12 and consumer.fetches == 1  # every message in one round trip
    for raw in taken:
        consumer._deliver(raw)
    assert [ids for ids, _ in submit.calls][:2] == [["high0", "high1", "high2", "high3"],
                                                    ["high4", "high5", "high6", "high7"]]
    assert [i for ids, _ in submit.calls[2:] for i in ids] == [f"low{i}" for i in range(40)]  # in order
    # Held as kombu holds a message it delivered: in the unacked hash (message, exchange, queue)
    # and its index, so that a worker that dies now has them restored.
    unacked = client.hgetall(settings.redis_prefix + "unacked")
    assert len(unacked) == 12 and client.zcard(settings.redis_prefix + "unacked_index") == 12
    message, exchange, routing_key = json.loads(next(iter(unacked.values())))
    assert (exchange, routing_key) == ("", settings.queue_for("m")) and message["headers"]["task"] == "batchgen.generate"
    consumer.start()
    for _, future in submit.calls:
        future.set_result(None)
    wait_for(lambda: client.hlen(settings.redis_prefix + "unacked") == 0)
    assert client.zcard(settings.redis_prefix + "unacked_index") == 0
    assert consumer.acks < 12  # settled together, acked together
    consumer.close()


def test_at_most_inflight_messages_are_held(env):
    settings, client = env
    publish(client, settings, model="m", request_ids=[f"r{i}" for i in range(30)], per_message=1)
    submit = Submissions()
    consumer = Consumer(client, settings, "m", submit, inflight=8, requeue=Requeue).start()
    wait_for(lambda: len(submit.calls) == 8)
    time.sleep(0.3)
    assert len(submit.calls) == 8 and queued(client, settings) == 22
    for _, future in submit.calls[:5]:
        future.set_result(None)
    wait_for(lambda: len(submit.calls) == 13)  # room for five more
    consumer.close()


def test_a_message_with_nothing_waiting_is_taken_as_soon_as_it_comes(env):
    settings, client = env
    submit = Submissions()
    consumer = Consumer(client, settings, "m", submit, inflight=8, requeue=Requeue).start()
    time.sleep(0.2)  # blocked, waiting
    publish(client, settings, model="m", request_ids=["late"], per_message=1)
    wait_for(lambda: len(submit.calls) == 1, 3)
    assert client.hlen(settings.redis_prefix + "unacked") == 1  # recorded as held at once
    submit.calls[0][1].set_result(None)
    wait_for(lambda: client.hlen(settings.redis_prefix + "unacked") == 0)
    consumer.close()


def test_handed_back_messages_go_to_the_head_of_their_queue(env):
    settings, client = env
    publish(client, settings, model="m", request_ids=["a", "b", "c"], priority=7, per_message=1)
    submit = Submissions()
    consumer = Consumer(client, settings, "m", submit, inflight=2, requeue=Requeue).start()
    wait_for(lambda: len(submit.calls) == 2)
    consumer.stop_fetching()
    submit.calls[0][1].set_exception(Requeue("shutting down"))
    submit.calls[1][1].set_result(None)
    consumer.close()
    key = queue_keys(settings, "m")[celery_priority(7)]
    ids = [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0][0] for raw in client.lrange(key, 0, -1)]
    assert ids == ["c", "a"]  # "a" is next to be taken (consumers take from the right)
    assert client.hlen(settings.redis_prefix + "unacked") == 0


def test_kombu_restores_what_a_dead_consumer_held(env):
    """The consumer takes messages and dies without acking; kombu's own restore (which every
    Celery worker runs) puts them back on their queue after the visibility timeout."""
    from kombu import Connection

    settings, client = env
    publish(client, settings, model="m", request_ids=[f"r{i}" for i in range(6)], priority=5, per_message=2)
    submit = Submissions()
    consumer = Consumer(client, settings, "m", submit, inflight=10, requeue=Requeue)
    for raw in consumer.fetch(10):
        consumer._deliver(raw)
    assert queued(client, settings) == 0 and len(submit.calls) == 3
    time.sleep(1.5)  # past the visibility timeout
    config = celery_config(settings)
    with Connection(settings.redis_url, transport_options=config["broker_transport_options"]) as conn:
        channel = conn.default_channel
        channel.qos.restore_visible(num=100)
    assert queued(client, settings) == 3 and client.hlen(settings.redis_prefix + "unacked") == 0
    again = Consumer(client, settings, "m", Submissions(), inflight=10, requeue=Requeue)
    assert len(again.fetch(10)) == 3


def test_an_unreadable_message_is_dropped_and_the_others_run(env):
    settings, client = env
    publish(client, settings, model="m", request_ids=["a"], priority=5, per_message=1)
    client.lpush(queue_keys(settings, "m")[celery_priority(5)], "not a message at all")
    publish(client, settings, model="m", request_ids=["b"], priority=5, per_message=1)
    submit = Submissions()
    consumer = Consumer(client, settings, "m", submit, inflight=10, requeue=Requeue).start()
    wait_for(lambda: len(submit.calls) == 2)
    assert [ids for ids, _ in submit.calls] == [["a"], ["b"]] and queued(client, settings) == 0
    assert client.hlen(settings.redis_prefix + "unacked") == 2  # the two readable ones, held
    for _, future in submit.calls:
        future.set_result(None)
    wait_for(lambda: client.hlen(settings.redis_prefix + "unacked") == 0)
    consumer.close()
