"""Jobs carry their units: what they count against the caps.

``jobs.units`` is the sum of its requests' weights (``core.jobs.request_weight``): a request
counts once per sample (or scored continuation) and per ``BATCHGEN_REQUEST_WEIGHT_TOKENS`` prompt
+ new tokens, so sixteen samples of a long answer weigh sixteen times one short one. The waiting
part of a job counts in proportion. Jobs stored before this revision count 1 per request, as
they did.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("units", sa.Integer(), nullable=False, server_default="1"))
    op.execute("UPDATE jobs SET units = total")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("units")
