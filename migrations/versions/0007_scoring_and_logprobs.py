"""Scoring jobs and log probabilities.

- ``jobs.kind``: ``generate`` (every job so far) or ``score`` (log probabilities of given texts).
- ``job_requests.prompt_ids``: a prompt sent as token ids (OpenAI completions take them).
- ``job_requests.continuations``: a scoring request's continuations, when it has any.
- ``job_requests.detail``: what a result holds besides its text: ``{"logprobs": ...}`` for a
  generation asked for log probabilities, ``{"scores": [...]}`` for a scoring request.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="generate"))
    with op.batch_alter_table("job_requests") as batch:
        batch.add_column(sa.Column("prompt_ids", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("continuations", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("detail", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_requests") as batch:
        batch.drop_column("detail")
        batch.drop_column("continuations")
        batch.drop_column("prompt_ids")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("kind")
