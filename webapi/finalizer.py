"""Batch output files, written by the API's finalizer once a batch's job has ended.

Each API process runs one finalizer thread. Every ``interval_s`` it looks for batches whose job
has ended; it takes one (an UPDATE only one process can win), reads its requests a chunk at a
time, renders their OpenAI result lines and writes the output and error files a part of up to
4 MiB at a time, each chunk and each part in a short transaction of its own, then ends the
batch. No read of a batch (``GET /v1/batches``) ever writes, nothing is whole in memory, and no
write transaction lasts longer than one part. A finalizer that dies midway is replaced (after
``core.batches.FINALIZE_STALE_S``), its half-written files deleted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from core import batches as batch_service
from core import files as file_service
from core import jobs as job_service
from core.db import Database
from webapi.openai.serving import batch_line

log = logging.getLogger("batchgen.finalizer")

CHUNK_REQUESTS = 1000


class _Output:
    """One file being written a part at a time (created at its first line)."""

    def __init__(self, db: Database, owner: str, filename: str) -> None:
        self.db, self.owner, self.filename = db, owner, filename
        self.file_id: str | None = None
        self.buffer: list[bytes] = []
        self.size = 0
        self.seq = 0

    def add(self, line: bytes) -> None:
        self.buffer.append(line)
        self.size += len(line)
        if self.size >= file_service.PART_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        data = b"".join(self.buffer)
        self.buffer, self.size = [], 0
        with self.db.write() as session:
            if self.file_id is None:
                self.file_id = file_service.new_file(session=session, owner=self.owner, purpose="batch_output",
                                                     filename=self.filename).id
            for start in range(0, len(data), file_service.PART_BYTES):
                file_service.add_part(session=session, file_id=self.file_id, seq=self.seq,
                                      content=data[start:start + file_service.PART_BYTES])
                self.seq += 1


class Finalizer:
    """The finalizer thread of one API process."""

    def __init__(self, db: Database, interval_s: float = 1.0,
                 fingerprint: Callable[[str], str | None] | None = None) -> None:
        self.db, self.interval_s = db, interval_s
        # The system_fingerprint of a model's answers (webapi.openai.serving.system_fingerprint).
        self.fingerprint = fingerprint or (lambda model: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Finalizer:
        self._thread = threading.Thread(target=self._loop, name="finalizer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # the database may be away; try again next round
                log.exception("finalizing batches failed")

    def run_once(self) -> list[str]:
        """Finalize every batch that is due now; returns their ids."""
        with self.db.read() as session:
            due = batch_service.due(session=session)
        return [batch_id for batch_id in due if self.finalize(batch_id)]

    def finalize(self, batch_id: str) -> bool:
        """Render and store the batch's files and end it; False if another process has it."""
        with self.db.write() as session:
            batch = batch_service.begin_finalize(session=session, batch_id=batch_id)
            if batch is None:
                return False
            owner, job_id, endpoint, model = batch.owner, batch.job_id, batch.endpoint, batch.model or ""
        assert job_id is not None
        fingerprint = self.fingerprint(model)
        out_name, err_name = batch_service.output_names(batch_id)
        output, errors = _Output(self.db, owner, out_name), _Output(self.db, owner, err_name)
        after = -1
        while True:  # a chunk of requests per read transaction
            with self.db.read() as session:
                rows = job_service.results_after(session=session, job_id=job_id, after_idx=after,
                                                 limit=CHUNK_REQUESTS)
                rendered = [batch_line(row, endpoint, model, fingerprint) for row in rows]
            if not rows:
                break
            after = rows[-1].idx
            for ok, line in rendered:
                (output if ok else errors).add(line)
            with self.db.write() as session:
                batch_service.touch(session=session, batch_id=batch_id)
        output.flush()
        errors.flush()
        with self.db.write() as session:
            batch_service.end_finalize(session=session, batch_id=batch_id, output_file_id=output.file_id,
                                       error_file_id=errors.file_id)
        log.info("batch %s finalized", batch_id, extra={"job_id": job_id})
        return True
