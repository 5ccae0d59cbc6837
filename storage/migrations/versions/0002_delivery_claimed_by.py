"""Deliveries remember which exporter claimed them (``claimed_by``, ``host:pid:kind:random``),
so that a node restarting after a crash releases its own claims at once on a shared
PostgreSQL queue instead of waiting out their lease.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("claimed_by")
