"""The job's progress line: rows done of the total, pairs/s and the time left, at most every interval."""

import logging

import pytest

from jobs.progress import Progress

pytestmark = pytest.mark.unit


def test_the_line_reads_rows_rate_and_eta(monkeypatch):
    clock = iter([0.0, 0.0, 20.0, 20.0])
    monkeypatch.setattr("jobs.progress.time.monotonic", lambda: next(clock))
    progress = Progress("stage 1", total_rows=100_000, interval_s=1e9)
    progress.rows, progress.pairs = 25_000, 24_000
    assert progress.line() == "stage 1: rows 25,000 of 100,000 (25.0%), 1,200 pairs/s, ETA 1m00s"


def test_one_line_per_interval_and_one_at_the_end(monkeypatch, caplog):
    now = [0.0]
    monkeypatch.setattr("jobs.progress.time.monotonic", lambda: now[0])
    progress = Progress("stage 2", total_rows=40, interval_s=10)
    with caplog.at_level(logging.INFO, logger="jobs.rescore"):
        for _ in range(4):
            now[0] += 4
            progress.add(10, 10)
        progress.log()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("stage 2: rows 30 of 40 (75.0%)")
    assert lines[-1] == "stage 2: rows 40 of 40 (100.0%), 2 pairs/s, done"
