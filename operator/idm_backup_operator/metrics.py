"""Prometheus metrics, derived from the IdmBackup and IdmBackupSchedule resources themselves.

Names follow Velero's ``velero_backup_*`` so that existing dashboards and alerts translate directly.
Every series has the labels ``schedule`` (the ``idm-backup.io/schedule`` label of a backup, "" for a
backup created by hand) and ``namespace``.

Two kinds of numbers, with two different sources of truth:

* **Gauges** (last success, last failure, last status, archive size, in progress, schedules, next run)
  are computed at scrape time from the resources as they are now. Nothing is remembered across
  restarts, so nothing can drift: a restarted operator lists the resources once at start-up and shows
  exactly what the one before it showed.
* **Counters and the duration histogram** count what *this process* saw happen, once per backup uid:
  a backup that was already finished when the process started is not counted again (that would
  count the same backup once per restart, and ``increase()`` would see a burst after each restart).
  A restart is a counter reset, which Prometheus' ``rate()`` and ``increase()`` handle.

The state is fed by kopf event handlers (handlers/observe.py) and read by the HTTP server's thread,
hence the lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from idm_backup_operator.api.names import IDMBACKUPSCHEDULE, SCHEDULE_LABEL
from idm_backup_operator.api.phase import Phase, is_finished
from idm_backup_operator.api.times import parse_time
from idm_backup_operator.slots import BackupSlots

log = logging.getLogger(__name__)

PORT_ENV = "IDM_BACKUP_METRICS_PORT"
ADDRESS_ENV = "IDM_BACKUP_METRICS_ADDRESS"
DEFAULT_PORT = 9090

# A backup takes minutes (Data, online) to hours (Full of a large directory): the buckets span 10 s to 8 h.
DURATION_BUCKETS: tuple[float, ...] = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)


Key = tuple[str, str]  # (schedule, namespace): the labels of every per-backup series


def default_address() -> str:
    """All interfaces in a pod, where Prometheus scrapes the pod IP; loopback anywhere else."""
    return "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST") else "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    port: int = DEFAULT_PORT  # 0 disables the endpoint
    address: str = "127.0.0.1"

    @classmethod
    def from_env(cls) -> MetricsConfig:
        return cls(
            port=int(os.environ.get(PORT_ENV, DEFAULT_PORT)),
            address=os.environ.get(ADDRESS_ENV) or default_address(),
        )


def _timestamp(value: str | None) -> float | None:
    moment = parse_time(value)
    return None if moment is None else moment.timestamp()


@dataclasses.dataclass
class _Backup:
    key: Key
    owner_uid: str | None  # the owning schedule's uid, if any
    phase: str | None
    completed: float | None
    size: int | None
    # Breaks ties between backups finished in the same second (timestamps have 1 s resolution), the
    # same way before and after a restart: the one created later counts as the later one.
    order: tuple[str, str] = ("", "")
    attempt_counted: bool = False
    result_counted: bool = False


@dataclasses.dataclass
class _Schedule:
    key: Key
    next_run: float | None


@dataclasses.dataclass
class _Histogram:
    buckets: list[int]  # cumulative counts are computed at collection; these are per-bucket counts
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(DURATION_BUCKETS):
            if value <= bound:
                self.buckets[index] += 1
                break
        self.total += value
        self.count += 1


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = body.get("metadata") or {}
    return meta


def _backup_key(body: Mapping[str, Any]) -> Key:
    meta = _meta(body)
    return ((meta.get("labels") or {}).get(SCHEDULE_LABEL, ""), meta.get("namespace") or "")


def _owner_schedule(body: Mapping[str, Any]) -> str | None:
    for ref in _meta(body).get("ownerReferences") or []:
        if ref.get("kind") == IDMBACKUPSCHEDULE:
            uid: str | None = ref.get("uid")
            return uid
    return None


class BackupMetrics(Collector):
    """The metric state of one operator process, and its Prometheus collector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backups: dict[str, _Backup] = {}
        self._schedules: dict[str, _Schedule] = {}
        # Schedules deleted while this process ran: their backups are being garbage-collected, and a
        # late event of one of them must not bring the schedule's series back.
        self._deleted_schedules: set[str] = set()
        self._attempts: dict[Key, int] = {}
        self._successes: dict[Key, int] = {}
        self._failures: dict[Key, int] = {}
        self._durations: dict[Key, _Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- feeding ------------------------------------------------------------------------------------

    def seed(self, backups: Iterable[Mapping[str, Any]], schedules: Iterable[Mapping[str, Any]]) -> None:
        """The resources as listed at start-up: the gauges' state, and nothing to count."""
        for schedule in schedules:
            self.observe_schedule(schedule)
        for backup in backups:
            self.observe_backup(backup, initial=True)

    def observe_backup(self, body: Mapping[str, Any], *, initial: bool = False) -> None:
        """A backup as it is now. `initial`: from a listing, not a change that this process watched.

        A backup first seen in a listing was handled by an earlier process (or by another replica) as
        far as its phase shows: only what happens to it from now on is counted.
        """
        meta = _meta(body)
        uid = meta.get("uid")
        if not uid:
            return
        owner = _owner_schedule(body)
        status = body.get("status") or {}
        phase = status.get("phase")
        started = phase == Phase.RUNNING or is_finished(phase)
        with self._lock:
            if owner is not None and owner in self._deleted_schedules:
                return
            record = self._backups.get(uid)
            if record is None:
                meta = _meta(body)
                record = _Backup(
                    key=_backup_key(body),
                    owner_uid=owner,
                    phase=None,
                    completed=None,
                    size=None,
                    order=(meta.get("creationTimestamp") or "", meta.get("name") or ""),
                )
                if initial:
                    record.attempt_counted = started
                    record.result_counted = is_finished(phase)
                self._backups[uid] = record
            record.phase = phase
            record.completed = _timestamp(status.get("completionTime"))
            size = (status.get("archive") or {}).get("sizeBytes")
            record.size = int(size) if size is not None else None
            if started and not record.attempt_counted:
                record.attempt_counted = True
                self._attempts[record.key] = self._attempts.get(record.key, 0) + 1
            if is_finished(phase) and not record.result_counted:
                record.result_counted = True
                counter = self._successes if phase == Phase.SUCCEEDED else self._failures
                counter[record.key] = counter.get(record.key, 0) + 1
                duration = status.get("durationSeconds")
                if duration is not None:
                    histogram = self._durations.setdefault(
                        record.key, _Histogram([0] * len(DURATION_BUCKETS))
                    )
                    histogram.observe(float(duration))

    def forget_backup(self, body: Mapping[str, Any]) -> None:
        """A deleted backup: it no longer counts in the gauges (its counts stay in the counters)."""
        with self._lock:
            self._backups.pop(_meta(body).get("uid") or "", None)

    def observe_schedule(self, body: Mapping[str, Any]) -> None:
        meta = _meta(body)
        uid = meta.get("uid")
        if not uid:
            return
        next_run = _timestamp((body.get("status") or {}).get("nextScheduleTime"))
        with self._lock:
            if uid in self._deleted_schedules:
                return
            self._schedules[uid] = _Schedule((meta.get("name") or "", meta.get("namespace") or ""), next_run)

    def forget_schedule(self, body: Mapping[str, Any]) -> None:
        """A deleted schedule: every series labelled with it goes, counters included."""
        uid = _meta(body).get("uid") or ""
        with self._lock:
            schedule = self._schedules.pop(uid, None)
            self._deleted_schedules.add(uid)
            key = (
                schedule.key
                if schedule
                else (_meta(body).get("name") or "", _meta(body).get("namespace") or "")
            )
            # Its backups are garbage-collected by Kubernetes; they stop counting now, not one by one.
            for backup_uid in [u for u, b in self._backups.items() if b.owner_uid == uid or b.key == key]:
                del self._backups[backup_uid]
            for counter in (self._attempts, self._successes, self._failures):
                counter.pop(key, None)
            self._durations.pop(key, None)

    # -- collecting -----------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format, as served on /metrics."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            backups = [dataclasses.replace(b) for b in self._backups.values()]
            schedules = list(self._schedules.values())
            attempts, successes, failures = dict(self._attempts), dict(self._successes), dict(self._failures)
            durations = {
                k: dataclasses.replace(h, buckets=list(h.buckets)) for k, h in self._durations.items()
            }
        labels = ["schedule", "namespace"]
        # Every schedule has series from its creation on, with zeros, so that alerts such as
        # `increase(idm_backup_failure_total[1d]) > 0` work before a schedule's first failure.
        keys = sorted(
            {s.key for s in schedules}
            | {b.key for b in backups}
            | {*attempts, *successes, *failures, *durations}
        )

        last_success = GaugeMetricFamily(
            "idm_backup_last_successful_timestamp",
            "Completion time of the last successful backup (Unix seconds)",
            labels=labels,
        )
        last_failure = GaugeMetricFamily(
            "idm_backup_last_failure_timestamp",
            "Completion time of the last failed backup (Unix seconds)",
            labels=labels,
        )
        last_status = GaugeMetricFamily(
            "idm_backup_last_status",
            "Result of the last finished backup: 1 succeeded, 0 failed",
            labels=labels,
        )
        size = GaugeMetricFamily(
            "idm_backup_archive_size_bytes",
            "Stored size of the last successful backup's archive",
            labels=labels,
        )
        in_progress = GaugeMetricFamily("idm_backup_in_progress", "Backups running now", labels=labels)
        for key in keys:
            mine = [b for b in backups if b.key == key]
            done = sorted(
                (b for b in mine if is_finished(b.phase) and b.completed is not None), key=_finish_order
            )
            succeeded = [b for b in done if b.phase == Phase.SUCCEEDED]
            failed = [b for b in done if b.phase == Phase.FAILED]
            if succeeded:
                last_success.add_metric(list(key), _completed(succeeded[-1]))
                if succeeded[-1].size is not None:
                    size.add_metric(list(key), succeeded[-1].size)
            if failed:
                last_failure.add_metric(list(key), _completed(failed[-1]))
            if done:
                last_status.add_metric(list(key), 1 if done[-1].phase == Phase.SUCCEEDED else 0)
            in_progress.add_metric(list(key), sum(1 for b in mine if b.phase == Phase.RUNNING))
        yield from (last_success, last_failure, last_status, size, in_progress)

        yield _counter("idm_backup_attempt", "Backups started", keys, attempts)
        yield _counter("idm_backup_success", "Backups that succeeded", keys, successes)
        yield _counter("idm_backup_failure", "Backups that failed", keys, failures)

        histogram = HistogramMetricFamily(
            "idm_backup_duration_seconds", "Duration of finished backups", labels=labels
        )
        for key in keys:
            observed = durations.get(key) or _Histogram([0] * len(DURATION_BUCKETS))
            cumulative, buckets = 0, []
            for bound, count in zip(DURATION_BUCKETS, observed.buckets, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            buckets.append(("+Inf", observed.count))
            histogram.add_metric(list(key), buckets, observed.total)
        yield histogram

        per_namespace: dict[str, int] = {}
        for schedule in schedules:
            per_namespace[schedule.key[1]] = per_namespace.get(schedule.key[1], 0) + 1
        schedule_count = GaugeMetricFamily("idm_backup_schedules", "IdmBackupSchedules", labels=["namespace"])
        for namespace, number in sorted(per_namespace.items()):
            schedule_count.add_metric([namespace], number)
        yield schedule_count
        next_run = GaugeMetricFamily(
            "idm_backup_schedule_next_run_timestamp",
            "When the schedule runs next (Unix seconds)",
            labels=labels,
        )
        for schedule in sorted(schedules, key=lambda s: s.key):
            if schedule.next_run is not None:
                next_run.add_metric(list(schedule.key), schedule.next_run)
        yield next_run


class SlotMetrics(Collector):
    """The operator's backup slots: the limit, how many are in use, and how many backups wait for one.

    A queue that stays long means backups start late: more slots, or schedules spread over the hour.
    """

    def __init__(self, slots: BackupSlots) -> None:
        self._slots = slots

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "idm_backup_slots", "Backups this operator runs at most at once", self._slots.limit
        )
        yield GaugeMetricFamily(
            "idm_backup_slots_in_use", "Backups this operator runs now", self._slots.in_use
        )
        yield GaugeMetricFamily(
            "idm_backup_queued", "Backups waiting for a free slot of this operator", self._slots.queued
        )


def _completed(backup: _Backup) -> float:
    return backup.completed or 0.0


def _finish_order(backup: _Backup) -> tuple[float, tuple[str, str]]:
    return (_completed(backup), backup.order)


def _bound(value: float) -> str:
    return f"{value:.1f}"


def _counter(name: str, documentation: str, keys: Sequence[Key], values: Mapping[Key, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=["schedule", "namespace"])
    for key in keys:
        family.add_metric(list(key), values.get(key, 0))
    return family


# -- start-up: the initial listing and the HTTP endpoint ---------------------------------------------------


def list_resources(
    custom: Any, group: str, version: str, plural: str, namespaces: Sequence[str]
) -> list[dict[str, Any]]:
    """All objects of a kind in the watched namespaces (or the whole cluster when there are none)."""
    if not namespaces:
        items: list[dict[str, Any]] = custom.list_cluster_custom_object(group, version, plural)["items"]
        return items
    found = []
    for namespace in namespaces:
        found += custom.list_namespaced_custom_object(group, version, namespace, plural)["items"]
    return found


class MetricsServer:
    """The /metrics endpoint, in a thread of its own: it answers even while the event loop is busy."""

    def __init__(self, metrics: BackupMetrics, config: MetricsConfig) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(config.port, config.address, metrics.registry)
        self.port: int = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
