"""node.health: the last 24 hours of the health page from job rows, and the CPU figure (never the first-call 0)."""
from __future__ import annotations

from datetime import timedelta

from node.health import CpuSampler, history
from node.store.db import Job, JobState, open_database, utcnow
from tests.conftest import poll


def _job(n: int, state: JobState, received, finished=None) -> Job:
    return Job(sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", study_instance_uid=f"1.2.4.{n}",
               series_instance_uid=f"1.2.5.{n}", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_aet="STORESCU",
               spool_path="/nonexistent", size_bytes=1, state=state, received_at=received, finished_at=finished)


def test_history_buckets_received_queue_depth_and_latency_by_hour(make_settings):
    settings = make_settings(destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}])
    settings.node.data_dir.mkdir(parents=True)
    sessions = open_database(settings.database_url)
    now = utcnow()
    hour = now.replace(minute=0, second=0, microsecond=0)
    with sessions.begin() as session:
        session.add(_job(1, JobState.RUNNING, now - timedelta(hours=30)))  # stuck since before the window
        for n, latency in ((2, 60), (3, 120), (4, 600)):  # three sent three hours ago
            received = hour - timedelta(hours=3) + timedelta(minutes=n)
            session.add(_job(n, JobState.SENT, received, received + timedelta(seconds=latency)))
        session.add(_job(5, JobState.RECEIVED, hour - timedelta(hours=2) + timedelta(minutes=5)))  # still waiting
        session.add(_job(6, JobState.SKIPPED, now))  # no finished_at (an old row): not counted as waiting
    hours = history(settings, sessions)
    assert len(hours) == 24 and hours[-1].start == hour and hours[0].start == hour - timedelta(hours=23)
    by_start = {h.start: h for h in hours}
    sent = by_start[hour - timedelta(hours=3)]
    assert (sent.received, sent.done, sent.latency_median_s) == (3, 3, 120.0)
    assert 500 < sent.latency_p95_s <= 600
    assert sent.queue_depth == 1  # the stuck job; the three left within their hour
    assert by_start[hour - timedelta(hours=2)].queue_depth == 2  # ... and the one received two hours ago
    assert hours[-1].received == 1 and hours[-1].queue_depth == 2
    assert hours[0].queue_depth == 1 and hours[0].done == 0 and hours[0].latency_p95_s is None


def test_the_cpu_figure_is_measured_over_a_window_not_the_first_call():
    sampler = CpuSampler()
    assert sampler.percent() is None  # no window measured yet: "measuring", never a made-up 0 %
    figure = poll(lambda: sampler.percent() is not None and [sampler.percent()], 10, "the first CPU window")[0]
    assert 0.0 <= figure <= 100.0
