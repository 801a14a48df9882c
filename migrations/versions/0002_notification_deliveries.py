"""deliveries also carry notifications: kind (dicom | webhook | hl7) and payload

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 11:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows are C-STORE deliveries: the server default says so.
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="dicom",
                                   nullable=False))
        batch.add_column(sa.Column("payload", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("payload")
        batch.drop_column("kind")
