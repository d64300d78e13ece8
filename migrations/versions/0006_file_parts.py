"""File contents in parts, and batches found by status.

- ``file_parts``: a file's content as numbered parts of up to 4 MiB, written and read one part
  per short transaction: an upload, a batch's output file or a download never needs the whole
  file in memory or one long transaction. Replaces ``file_blobs`` (one row per file).
- ``ix_batches_status``: the API's finalizer looks up batches whose job has ended.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "file_parts",
        sa.Column("file_id", sa.String(40), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("content", sa.LargeBinary(), nullable=False),
    )
    op.execute("INSERT INTO file_parts (file_id, seq, content) SELECT file_id, 0, content FROM file_blobs")
    op.drop_table("file_blobs")
    op.create_index("ix_batches_status", "batches", ["status"])


def downgrade() -> None:
    op.drop_index("ix_batches_status", "batches")
    op.create_table(
        "file_blobs",
        sa.Column("file_id", sa.String(40), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("content", sa.LargeBinary(), nullable=False),
    )
    bind = op.get_bind()
    parts: dict[str, list[bytes]] = {}
    for file_id, content in bind.execute(sa.text("SELECT file_id, content FROM file_parts ORDER BY file_id, seq")):
        parts.setdefault(file_id, []).append(bytes(content))
    for file_id, chunks in parts.items():
        bind.execute(sa.text("INSERT INTO file_blobs (file_id, content) VALUES (:f, :c)"),
                     {"f": file_id, "c": b"".join(chunks)})
    op.drop_table("file_parts")
