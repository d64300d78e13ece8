"""Files: batch inputs uploaded by clients, and the output and error files batches produce.

Content lives in the database, so every API process on every machine serves the same files, in
numbered parts of up to ``PART_BYTES`` (``file_parts``): an upload is copied in a part at a
time, a batch's output is written a part at a time as it is rendered, and a download or a batch
input is read a part at a time, each in a short transaction; no file is ever whole in memory. A
file row carries no content, so listing files reads none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from sqlalchemy import Connection, Row, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from core.db import Database
from core.errors import NotFoundError
from core.ids import new_id
from core.tables import File, FilePart, utcnow

PURPOSES_ACCEPTED = ("batch",)  # what clients may upload
PART_BYTES = 4 * 1024 * 1024


def create_file(*, session: Session, owner: str, purpose: str, filename: str,
                content: bytes | BinaryIO) -> File:
    """Store a file, its content copied from bytes or read from a stream a part at a time."""
    file = new_file(session=session, owner=owner, purpose=purpose, filename=filename)
    read = content.read if hasattr(content, "read") else iter([bytes(content)]).__next__
    size = seq = 0
    while True:
        try:
            data = read(PART_BYTES) if hasattr(content, "read") else read()
        except StopIteration:
            break
        if not data:
            break
        for start in range(0, len(data), PART_BYTES):
            piece = data[start:start + PART_BYTES]
            session.add(FilePart(file_id=file.id, seq=seq, content=piece))
            session.flush()  # one part in memory at a time
            seq += 1
            size += len(piece)
    file.bytes = size
    session.flush()
    return file


def new_file(*, session: Session, owner: str, purpose: str, filename: str) -> File:
    """A file row with no content yet (parts are added by ``add_part``)."""
    file = File(id=new_id("file"), owner=owner, purpose=purpose, filename=filename[:255] or "upload",
                bytes=0, created_at=utcnow())
    session.add(file)
    session.flush()
    return file


def add_part(*, session: Session, file_id: str, seq: int, content: bytes) -> None:
    """Append part ``seq`` of a file being written, and count its bytes."""
    session.add(FilePart(file_id=file_id, seq=seq, content=content))
    session.execute(update(File).where(File.id == file_id).values(bytes=File.bytes + len(content)))


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


def parts(db: Database, file_id: str) -> Iterator[bytes]:
    """A file's content a part at a time, each read in a transaction of its own."""
    seq = 0
    while True:
        with db.read() as session:
            content = session.scalar(select(FilePart.content).where(FilePart.file_id == file_id,
                                                                    FilePart.seq == seq))
        if content is None:
            return
        yield bytes(content)
        seq += 1


def lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines (without their ends: LF, CR or CRLF) of content given in pieces, a line or a
    CRLF split between pieces included, holding no more than a piece and the line in progress."""
    rest = b""
    skip_lf = False  # the last piece ended with CR: an LF starting the next one ends no new line
    for chunk in chunks:
        if skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        skip_lf = False
        if not chunk:
            continue
        pieces = (rest + chunk).splitlines(keepends=True)
        rest = b""
        if pieces[-1].endswith(b"\r"):
            skip_lf = True
        elif not pieces[-1].endswith(b"\n"):
            rest = pieces.pop()
        for piece in pieces:
            yield piece.removesuffix(b"\n").removesuffix(b"\r")
    if rest:
        yield rest


# What a file read shows (a file row carries no content).
_f = File.__table__.c
FILE_FIELDS = (_f.id, _f.owner, _f.purpose, _f.filename, _f.bytes, _f.created_at)
_FILE = select(*FILE_FIELDS)


def file_row(conn: Session | Connection, *, file_id: str, owner: str | None) -> Row[Any]:
    """The file as ``FILE_FIELDS``, or ``NotFoundError`` (also when it belongs to another owner)."""
    row = conn.execute(_FILE.where(_f.id == bindparam("id")), {"id": file_id}).first()
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(f"no file {file_id!r}")
    return row


def list_files(*, session: Session | Connection, owner: str | None, after: str | None = None, limit: int = 100,
               order: str = "desc", purpose: str | None = None) -> tuple[list[Row[Any]], bool]:
    """The owner's files as ``FILE_FIELDS`` by creation time (ids are time-ordered); and whether
    more follow."""
    query = _FILE
    if owner is not None:
        query = query.where(_f.owner == owner)
    if purpose is not None:
        query = query.where(_f.purpose == purpose)
    if after is not None:
        query = query.where(_f.id < after if order == "desc" else _f.id > after)
    query = query.order_by(_f.id.desc() if order == "desc" else _f.id.asc()).limit(limit + 1)
    rows = session.execute(query).all()
    return rows[:limit], len(rows) > limit


def delete_file(*, session: Session, file_id: str, owner: str | None) -> None:
    """Remove a file and its content (a batch made from it keeps running)."""
    get_file(session=session, file_id=file_id, owner=owner)
    session.execute(delete(FilePart).where(FilePart.file_id == file_id))
    session.execute(delete(File).where(File.id == file_id))
