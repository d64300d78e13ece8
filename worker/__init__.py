"""The batchgen worker: Celery, the batching engine, the CTranslate2 runner, model conversion."""
