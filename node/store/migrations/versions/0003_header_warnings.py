"""jobs.header_warnings: what the tolerant header reading repaired or left out, by tag

Revision ID: 0002_header_warnings
Revises: 0002
Create Date: 2026-12-02 10:05:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0002_header_warnings'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('header_warnings', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('header_warnings')
