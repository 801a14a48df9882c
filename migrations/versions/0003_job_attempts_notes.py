"""jobs keep their attempt history and the pipeline's notes; a superseded job
remembers the state it had, so that a version which brings nothing usable can
hand the series back to it

* ``attempt_log``: JSON list, one entry per failed attempt (attempt, at, error,
  transient); ``last_error`` is cleared when a job succeeds.
* ``notes``: JSON object: images the loader left out (``excluded``), models a
  hard constraint refused (``refused``), why a job was ``skipped``.
* ``superseded_state``: the state a job had when a newer version superseded it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 15:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempt_log", sa.Text(), nullable=True))
        batch.add_column(sa.Column("notes", sa.Text(), nullable=True))
        batch.add_column(sa.Column("superseded_state", sa.String(length=16), nullable=True))


def downgrade() -> None:
    # ``skipped`` is not a state the older schema's code knows: such jobs become done
    # (nothing was to be done) before the columns go.
    op.execute("UPDATE jobs SET state = 'done' WHERE state = 'skipped'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("superseded_state")
        batch.drop_column("notes")
        batch.drop_column("attempt_log")
