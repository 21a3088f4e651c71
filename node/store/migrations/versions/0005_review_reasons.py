"""jobs: why a read was sent to review, and its out-of-distribution score (#17)

Revision ID: 0002_review_reasons
Revises: 0002_web_sessions
Create Date: 2026-12-02 10:00:00
"""
import sqlalchemy as sa
from alembic import op


revision = '0002_review_reasons'
down_revision = '0002_web_sessions'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('review_reasons', sa.String(length=256), nullable=True))
        batch.add_column(sa.Column('ood_score', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('ood_score')
        batch.drop_column('review_reasons')
