"""instance versions: a repeat with other content is a new version of the job

Revision ID: 0002_instance_versions
Revises: 0002_review_reasons
Create Date: 2026-12-02 10:00:00
"""
import sqlalchemy as sa
from alembic import op


revision = '0002_instance_versions'
down_revision = '0002_review_reasons'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('version', sa.Integer(), server_default='1', nullable=False))
        batch_op.add_column(sa.Column('content_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('content_sha256')
        batch_op.drop_column('version')
