"""status.progress while an archive streams: written from a thread of its own, never holding the stream.

The Reporter here records what the pipeline would patch into the status; the platform tests see the
last value in a real status (tests/test_integrity.py).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from idm_backup_operator.idmbackup.pipeline import reporting_progress
from idm_backup_operator.streams import Tally


class SlowReporter:
    """Records each progress patch; each write takes `delay` seconds, like a slow API server."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.writes: list[dict[str, Any]] = []
        self.threads: set[str] = set()

    def update(self, **status: Any) -> None:
        time.sleep(self.delay)
        self.writes.append(status["progress"])
        self.threads.add(threading.current_thread().name)

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        raise AssertionError("progress writes only status.progress")

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        raise AssertionError("progress posts no Events")

    def cancelled(self) -> bool:
        return False


def test_progress_starts_at_zero_grows_and_ends_at_what_was_read() -> None:
    report, tally = SlowReporter(), Tally()
    with reporting_progress(report, tally, total=3000, interval=0.02):
        for _ in range(3):
            tally.update(b"x" * 1000)
            time.sleep(0.06)
    read = [w["bytesRead"] for w in report.writes]
    assert report.writes[0] == {"bytesRead": 0, "totalBytes": 3000}
    assert report.writes[-1] == {"bytesRead": 3000, "totalBytes": 3000}
    assert read == sorted(read) and len(set(read)) >= 3  # it grew while the bytes came
    assert "backup-progress" in report.threads
    count = len(report.writes)
    time.sleep(0.1)
    assert len(report.writes) == count  # nothing after the transfer ended


def test_a_slow_status_write_does_not_hold_the_stream() -> None:
    report, tally = SlowReporter(delay=0.3), Tally()
    with reporting_progress(report, tally, total=10, interval=0.01):
        started = time.monotonic()
        for _ in range(10):
            tally.update(b"y")  # the stream goes on while the thread's write waits on the "API server"
        streamed = time.monotonic() - started
    assert streamed < report.delay  # not one write's wait
    assert report.writes[-1] == {"bytesRead": 10, "totalBytes": 10}
