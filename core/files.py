"""Files: batch inputs uploaded by clients, and the output and error files batches produce.

Content lives in the database (``file_blobs``), so every API process on every machine serves the
same files; a file row carries no content, so listing files reads none.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.errors import NotFoundError
from core.ids import new_id
from core.tables import File, FileBlob, utcnow

PURPOSES_ACCEPTED = ("batch",)  # what clients may upload


def create_file(*, session: Session, owner: str, purpose: str, filename: str, content: bytes) -> File:
    """Store a file and its content."""
    file = File(id=new_id("file"), owner=owner, purpose=purpose, filename=filename[:255] or "upload",
                bytes=len(content), created_at=utcnow())
    session.add(file)
    session.flush()
    session.add(FileBlob(file_id=file.id, content=content))
    return file


def uploaded(*, session: Session, owner: str) -> tuple[int, int]:
    """(bytes, count) of the files an owner uploaded (not those the service wrote for it)."""
    total, count = session.execute(select(func.coalesce(func.sum(File.bytes), 0), func.count())
                                   .where(File.owner == owner, File.purpose.in_(PURPOSES_ACCEPTED))).one()
    return int(total), int(count)


def get_file(*, session: Session, file_id: str, owner: str | None) -> File:
    """The file, or ``NotFoundError`` (also when it belongs to another owner)."""
    file = session.get(File, file_id)
    if file is None or (owner is not None and file.owner != owner):
        raise NotFoundError(f"no file {file_id!r}")
    return file


def file_content(*, session: Session, file_id: str, owner: str | None) -> bytes:
    """A file's bytes."""
    get_file(session=session, file_id=file_id, owner=owner)
    blob = session.get(FileBlob, file_id)
    return blob.content if blob is not None else b""


def list_files(*, session: Session, owner: str | None, after: str | None = None, limit: int = 100,
               order: str = "desc", purpose: str | None = None) -> tuple[list[File], bool]:
    """The owner's files by creation time (ids are time-ordered); and whether more follow."""
    query = select(File)
    if owner is not None:
        query = query.where(File.owner == owner)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        query = query.where(File.id < after if order == "desc" else File.id > after)
    query = query.order_by(File.id.desc() if order == "desc" else File.id.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def delete_file(*, session: Session, file_id: str, owner: str | None) -> None:
    """Remove a file and its content (a batch made from it keeps running)."""
    get_file(session=session, file_id=file_id, owner=owner)
    session.execute(delete(FileBlob).where(FileBlob.file_id == file_id))
    session.execute(delete(File).where(File.id == file_id))
