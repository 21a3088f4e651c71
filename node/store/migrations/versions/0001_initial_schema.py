"""initial schema: jobs, deliveries, users, verdicts

Revision ID: 0001
Revises: 
Create Date: 2026-11-28 03:10:36.302576
"""
import sqlalchemy as sa
from alembic import op

import node.store.db


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('calling_aet', sa.String(length=16), nullable=False),
    sa.Column('calling_host', sa.String(length=64), nullable=True),
    sa.Column('spool_path', sa.String(length=512), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('state', sa.Enum('RECEIVED', 'RUNNING', 'ENCODED', 'DELIVERING', 'SENT', 'SKIPPED', 'REJECTED', 'FAILED', 'FAILED_DELIVERY', name='jobstate', native_enum=False, length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('delivery_attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', node.store.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('next_attempt_at', node.store.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('received_at', node.store.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', node.store.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('encoded_at', node.store.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', node.store.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('model_name', sa.String(length=64), nullable=True),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.Column('model_sha256', sa.String(length=64), nullable=True),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('uncertainty', sa.Float(), nullable=True),
    sa.Column('positive', sa.Boolean(), nullable=True),
    sa.Column('review_required', sa.Boolean(), nullable=True),
    sa.Column('location_row', sa.Float(), nullable=True),
    sa.Column('location_col', sa.Float(), nullable=True),
    sa.Column('location_radius', sa.Float(), nullable=True),
    sa.Column('embedding', sa.LargeBinary(), nullable=True),
    sa.Column('quality_flags', sa.String(length=256), nullable=True),
    sa.Column('stage_seconds', sa.Text(), nullable=True),
    sa.Column('results_dir', sa.String(length=512), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_calling_aet'), ['calling_aet'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('role', sa.Enum('REVIEWER', 'ADJUDICATOR', 'ADMIN', name='role', native_enum=False, length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=256), nullable=False),
    sa.Column('api_token_hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', node.store.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('api_token_hash'),
    sa.UniqueConstraint('username')
    )
    op.create_table('deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=32), nullable=False),
    sa.Column('state', sa.Enum('PENDING', 'SENT', 'FAILED', name='deliverystate', native_enum=False, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_status', sa.String(length=64), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('sent_at', node.store.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'destination')
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_job_id'), ['job_id'], unique=False)

    op.create_table('verdicts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('reviewer', sa.String(length=64), nullable=False),
    sa.Column('role', sa.Enum('REVIEWER', 'ADJUDICATOR', 'ADMIN', name='role', native_enum=False, length=16), nullable=False),
    sa.Column('nodule_present', sa.Boolean(), nullable=False),
    sa.Column('location_row', sa.Float(), nullable=True),
    sa.Column('location_col', sa.Float(), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('created_at', node.store.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('superseded_by', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['superseded_by'], ['verdicts.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('verdicts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_verdicts_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_verdicts_reviewer'), ['reviewer'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('verdicts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_verdicts_reviewer'))
        batch_op.drop_index(batch_op.f('ix_verdicts_job_id'))

    op.drop_table('verdicts')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_job_id'))

    op.drop_table('deliveries')
    op.drop_table('users')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_jobs_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_jobs_calling_aet'))

    op.drop_table('jobs')
