"""scheduler runs and job store

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 03:16:51.162972
"""
import sqlalchemy as sa
from alembic import op

import node.store.db
import node.store.runs  # noqa: F401  (registers these tables on node.store.db.Base, as env.py does)


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('apscheduler_jobs',
    sa.Column('id', sa.Unicode(length=191), nullable=False),
    sa.Column('next_run_time', sa.Float(precision=25), nullable=True),
    sa.Column('job_state', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('apscheduler_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_apscheduler_jobs_next_run_time'), ['next_run_time'], unique=False)

    op.create_table('scheduler_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job', sa.String(length=32), nullable=False),
    sa.Column('started_at', node.store.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', node.store.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.Enum('RUNNING', 'OK', 'FAILED', 'BREACH', name='outcome', native_enum=False, length=16), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('summary', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('scheduler_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scheduler_runs_job'), ['job'], unique=False)
        batch_op.create_index(batch_op.f('ix_scheduler_runs_started_at'), ['started_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('scheduler_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scheduler_runs_started_at'))
        batch_op.drop_index(batch_op.f('ix_scheduler_runs_job'))

    op.drop_table('scheduler_runs')
    with op.batch_alter_table('apscheduler_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_apscheduler_jobs_next_run_time'))

    op.drop_table('apscheduler_jobs')
