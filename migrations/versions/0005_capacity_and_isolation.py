"""Exact capacity checks and poison isolation by bisection.

- ``ix_jobs_model_id``: the jobs submitted for a model since a given id, read under the
  capacity lock (``webapi.limits``), by an index range scan.
- ``job_requests.run_size``: how many requests the run that last claimed a request held. Only
  a death in a run of one counts against a request's attempts (``core.jobs.claim``); a batch
  whose worker died is split in halves until the request that kills it runs alone.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_model_id", "jobs", ["model", "id"])
    with op.batch_alter_table("job_requests") as batch:
        batch.add_column(sa.Column("run_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_requests") as batch:
        batch.drop_column("run_size")
    op.drop_index("ix_jobs_model_id", "jobs")
