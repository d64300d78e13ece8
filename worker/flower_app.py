"""The Celery app Flower monitors (``celery --app worker.flower_app flower``): the broker and key
prefix of this deployment, from ``BATCHGEN_*`` variables. An entry module: it builds at import."""

from celery import Celery

from core.queueing import celery_config
from core.settings import Settings

app = Celery("batchgen", set_as_current=False)
app.conf.update(celery_config(Settings.from_env()))
