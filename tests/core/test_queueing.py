"""The API writes task messages to Redis itself: they must be the messages Celery would write.

Celery (through kombu's Redis transport) publishes into a real Redis, ``publish`` publishes the
same request ids, and the two stored messages are compared field by field; the end-to-end tests
then have real Celery workers consume what ``publish`` writes."""

import base64
import json
import uuid

import pytest
import redis as redis_lib

from core.queueing import SCAN_CHUNK, celery_config, celery_priority, not_held, publish, queue_keys
from core.settings import Settings


@pytest.fixture
def env(redis_server):
    settings = Settings(redis_url=redis_server.url, redis_prefix=f"t{uuid.uuid4().hex[:8]}:")
    client = redis_lib.Redis.from_url(redis_server.url)
    yield settings, client
    for key in client.scan_iter(match=settings.redis_prefix + "*"):
        client.delete(key)
    client.close()


def stored(client, settings, model, priority):
    key = queue_keys(settings, model)[celery_priority(priority)]
    return [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]  # oldest first


def test_a_published_message_is_the_message_celery_writes(env):
    from celery import Celery

    settings, client = env
    app = Celery("reference", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.send_task("batchgen.generate", args=[["req_a", "req_b"]], queue=settings.queue_for("m"),
                  priority=celery_priority(7))
    (theirs,) = stored(client, settings, "m", 7)
    client.delete(*queue_keys(settings, "m"))

    assert publish(client, settings, model="m", request_ids=["req_a", "req_b"], priority=7, per_message=8) == 1
    (ours,) = stored(client, settings, "m", 7)
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    # reply_to names a result queue; batchgen keeps no results in Redis (task_ignore_result).
    assert set(ours["properties"]) == set(theirs["properties"]) - {"reply_to"}
    varying = {"id", "root_id", "origin"}
    assert {k: v for k, v in ours["headers"].items() if k not in varying} == \
        {k: v for k, v in theirs["headers"].items() if k not in varying}
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    for field in ("delivery_info", "priority", "body_encoding", "delivery_mode"):
        assert ours["properties"][field] == theirs["properties"][field]
    assert base64.b64decode(ours["body"]) == base64.b64decode(theirs["body"])
    assert ours["content-type"] == theirs["content-type"] and ours["content-encoding"] == theirs["content-encoding"]


def test_ids_are_split_into_messages_in_order(env):
    settings, client = env
    ids = [f"req_{i}" for i in range(20)]
    assert publish(client, settings, model="m", request_ids=ids, priority=5, per_message=8) == 3
    messages = stored(client, settings, "m", 5)
    bodies = [json.loads(base64.b64decode(m["body"]))[0][0] for m in messages]
    assert bodies == [ids[0:8], ids[8:16], ids[16:20]]  # the order a worker takes them in
    assert not_held(client, settings, "m", [*ids, "req_lost"]) == {"req_lost"}
    assert len({m["properties"]["delivery_tag"] for m in messages}) == 3


def test_held_ids_are_found_across_chunks_of_the_queue_and_of_unacked_messages(env):
    settings, client = env
    ids = [f"req_{i}" for i in range(3 * SCAN_CHUNK + 5)]
    publish(client, settings, model="m", request_ids=ids, per_message=1)
    # A worker holds some messages unacked (kombu keeps them in a hash: message, exchange, queue).
    for i in range(5):
        raw = client.rpop(queue_keys(settings, "m")[4])
        client.hset(settings.redis_prefix + "unacked", f"tag{i}",
                    json.dumps([json.loads(raw), "", settings.queue_for("m")]))
    assert not_held(client, settings, "m", ids[::97] + ["req_gone"]) == {"req_gone"}
    assert not_held(client, settings, "other", ids[:3]) == set(ids[:3])
