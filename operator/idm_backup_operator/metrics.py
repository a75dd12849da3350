"""Prometheus metrics, derived from the IdmBackup and IdmBackupSchedule resources themselves.

Names follow Velero's ``velero_backup_*`` so that existing dashboards and alerts translate directly.
Every series about backups has the labels ``schedule`` (the ``idm-backup.io/schedule`` label of a
backup, "" for a backup created by hand) and ``namespace``.

Three kinds of numbers, with three different sources of truth:

* **Gauges** (last success, last failure, last status, archive size, in progress, schedules, next run)
  are computed at scrape time from the resources as they are now. Nothing is remembered across
  restarts, so nothing can drift: a restarted operator lists the resources once at start-up and shows
  exactly what the one before it showed.
* **Counters and the duration histogram** count what *this process* saw happen, once per backup uid:
  a backup that was already finished when the process started is not counted again (that would
  count the same backup once per restart, and ``increase()`` would see a burst after each restart).
  A restart is a counter reset, which Prometheus' ``rate()`` and ``increase()`` handle.
* **Drills** (``idm_backup_drill_*``) are read from each schedule's own status (``lastDrill``,
  ``lastSuccessfulDrill``, ``lastFailedDrill``, ``consecutiveDrillFailures``: idmbackupschedule/drills.py),
  which outlives the drills' IdmRestores (a schedule keeps only its last few). They are gauges, like the
  backups' last success and failure, and exist only for schedules with ``spec.drill``.
* **Storage checks** (``idm_backup_storage_available``, ``idm_backup_storage_last_check_timestamp_seconds``,
  with a third label ``location``) are the result of this process's last periodic check of each
  schedule's storage (idmbackupschedule/storagecheck.py, handlers/storagecheck.py). They are absent
  until the schedule's first check, within a minute of the process seeing it.

Counters and the histogram are prometheus-client's own ``Counter`` and ``Histogram``, one child per
(schedule, namespace); a deleted schedule's children are removed with ``.remove()``. Their
``_created`` samples are left out, so the exposition has exactly the series listed in
docs/monitoring.md. Timestamps are Unix seconds and their names end in ``_timestamp_seconds``.

The registry also carries prometheus-client's process, platform and garbage-collector collectors
(``process_*``, ``python_info``, ``python_gc_*``) and ``idm_backup_build_info``.

The state is fed by kopf event handlers (handlers/observe.py) and read by the HTTP server's thread,
hence the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import platform
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from idm_backup_operator import __version__
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

LABELS = ("schedule", "namespace")
STORAGE_LABELS = ("schedule", "namespace", "location")

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


def build_info() -> dict[str, str]:
    """The labels of idm_backup_build_info: this operator's version, Python's and kopf's."""
    try:
        kopf_version = importlib.metadata.version("kopf")
    except importlib.metadata.PackageNotFoundError:
        kopf_version = "unknown"
    return {"version": __version__, "python": platform.python_version(), "kopf": kopf_version}


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
    # The ServicesRunning condition, where the backup set one (after stopping IPA, or failing): whether
    # IPA ran when it ended.
    services: bool | None = None
    # Breaks ties between backups finished in the same second (timestamps have 1 s resolution), the
    # same way before and after a restart: the one created later counts as the later one.
    order: tuple[str, str] = ("", "")
    attempt_counted: bool = False
    result_counted: bool = False


@dataclasses.dataclass(frozen=True)
class _Drills:
    """What a schedule's status says about its drills."""

    last_success: float | None
    last_failure: float | None
    last_succeeded: bool | None  # the newest drill's result; None before the first
    restore_seconds: float | None  # of the last successful drill
    consecutive_failures: int


@dataclasses.dataclass
class _Schedule:
    key: Key
    next_run: float | None
    drills: _Drills | None = None  # None: the schedule has no spec.drill


def _drills(body: Mapping[str, Any]) -> _Drills | None:
    status = body.get("status") or {}
    if not (body.get("spec") or {}).get("drill"):
        return None
    success = status.get("lastSuccessfulDrill") or {}
    failure = status.get("lastFailedDrill") or {}
    last = status.get("lastDrill") or {}
    seconds = success.get("restoreSeconds")
    return _Drills(
        last_success=_timestamp(success.get("time")),
        last_failure=_timestamp(failure.get("time")),
        last_succeeded=None if not last.get("result") else last["result"] == Phase.SUCCEEDED,
        restore_seconds=float(seconds) if seconds is not None else None,
        consecutive_failures=int(status.get("consecutiveDrillFailures") or 0),
    )


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: Key
    location: str
    available: bool
    checked: float


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
        self._storage: dict[str, _Storage] = {}  # schedule uid -> its storage's last check
        # Schedules deleted while this process ran: their backups are being garbage-collected, and a
        # late event of one of them must not bring the schedule's series back.
        self._deleted_schedules: set[str] = set()
        # The counters and the histogram: prometheus-client's own, not registered by themselves but
        # collected by this collector, under its lock, so that a scrape sees them and the gauges at
        # one moment. A child per key, created with zeros as soon as the key is known.
        self._attempts = Counter("idm_backup_attempt", "Backups started", LABELS, registry=None)
        self._successes = Counter("idm_backup_success", "Backups that succeeded", LABELS, registry=None)
        self._failures = Counter("idm_backup_failure", "Backups that failed", LABELS, registry=None)
        self._durations = Histogram(
            "idm_backup_duration_seconds",
            "Duration of finished backups",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        # The keys that have children: those of the schedules and backups known now, and those that
        # counted something (a counter never goes down, so it stays until its schedule is deleted).
        self._series: set[Key] = set()
        self._counted: set[Key] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # What the default registry has and a custom one does not: process, platform and GC.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Info(
            "idm_backup_build", "The operator's version, and Python's and kopf's", registry=self.registry
        ).info(build_info())

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
                self._add_series(record.key)
            record.phase = phase
            record.completed = _timestamp(status.get("completionTime"))
            size = (status.get("archive") or {}).get("sizeBytes")
            record.size = int(size) if size is not None else None
            record.services = _services_running(status)
            if started and not record.attempt_counted:
                record.attempt_counted = True
                self._attempts.labels(*record.key).inc()
                self._counted.add(record.key)
            if is_finished(phase) and not record.result_counted:
                record.result_counted = True
                counter = self._successes if phase == Phase.SUCCEEDED else self._failures
                counter.labels(*record.key).inc()
                self._counted.add(record.key)
                duration = status.get("durationSeconds")
                if duration is not None:
                    self._durations.labels(*record.key).observe(float(duration))

    def forget_backup(self, body: Mapping[str, Any]) -> None:
        """A deleted backup: it no longer counts in the gauges (its counts stay in the counters)."""
        with self._lock:
            record = self._backups.pop(_meta(body).get("uid") or "", None)
            if record is not None and not self._still_known(record.key):
                self._remove_series(record.key)

    def observe_schedule(self, body: Mapping[str, Any]) -> None:
        meta = _meta(body)
        uid = meta.get("uid")
        if not uid:
            return
        next_run = _timestamp((body.get("status") or {}).get("nextScheduleTime"))
        with self._lock:
            if uid in self._deleted_schedules:
                return
            key = (meta.get("name") or "", meta.get("namespace") or "")
            self._schedules[uid] = _Schedule(key, next_run, _drills(body))
            # Every schedule has its counters from its creation on, with zeros, so that alerts such as
            # `increase(idm_backup_failure_total[1d]) > 0` work before a schedule's first failure.
            self._add_series(key)

    def forget_schedule(self, body: Mapping[str, Any]) -> None:
        """A deleted schedule: every series labelled with it goes, counters included."""
        uid = _meta(body).get("uid") or ""
        with self._lock:
            schedule = self._schedules.pop(uid, None)
            self._storage.pop(uid, None)
            self._deleted_schedules.add(uid)
            key = (
                schedule.key
                if schedule
                else (_meta(body).get("name") or "", _meta(body).get("namespace") or "")
            )
            # Its backups are garbage-collected by Kubernetes; they stop counting now, not one by one.
            for backup_uid in [u for u, b in self._backups.items() if b.owner_uid == uid or b.key == key]:
                del self._backups[backup_uid]
            self._remove_series(key)

    def observe_storage(
        self, schedule_uid: str, key: Key, location: str, *, available: bool, checked: float
    ) -> None:
        """The result of a check of a schedule's storage: `key` is its (schedule, namespace), `checked`
        when the storage answered or failed to (Unix seconds). A later check replaces it, also one of
        another location when the schedule's template changed."""
        with self._lock:
            if schedule_uid in self._deleted_schedules:
                return
            self._storage[schedule_uid] = _Storage(key, location, available, checked)

    def forget_storage(self, schedule_uid: str) -> None:
        """A schedule whose storage is not checked (suspended, or an invalid template): no series."""
        with self._lock:
            self._storage.pop(schedule_uid, None)

    def _add_series(self, key: Key) -> None:
        if key not in self._series:
            self._series.add(key)
            for metric in (self._attempts, self._successes, self._failures, self._durations):
                metric.labels(*key)

    def _still_known(self, key: Key) -> bool:
        return (
            key in self._counted
            or any(s.key == key for s in self._schedules.values())
            or any(b.key == key for b in self._backups.values())
        )

    def _remove_series(self, key: Key) -> None:
        self._series.discard(key)
        self._counted.discard(key)
        for metric in (self._attempts, self._successes, self._failures, self._durations):
            # prometheus-client before 0.21 raises KeyError for a child that does not exist.
            with contextlib.suppress(KeyError):
                metric.remove(*key)

    # -- collecting -----------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format, as served on /metrics."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            backups = [dataclasses.replace(b) for b in self._backups.values()]
            schedules = list(self._schedules.values())
            storage = sorted(self._storage.values(), key=lambda s: (s.key, s.location))
            keys = sorted({s.key for s in schedules} | {b.key for b in backups} | self._series)
            counted = [
                _without_created(family)
                for metric in (self._attempts, self._successes, self._failures, self._durations)
                for family in metric.collect()
            ]
        labels = list(LABELS)

        last_success = GaugeMetricFamily(
            "idm_backup_last_successful_timestamp_seconds",
            "Completion time of the last successful backup (Unix seconds)",
            labels=labels,
        )
        last_failure = GaugeMetricFamily(
            "idm_backup_last_failure_timestamp_seconds",
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
        ipa_running = GaugeMetricFamily(
            "idm_backup_last_services_running",
            "Whether IPA's services ran when the last backup that checked them ended: 1 running, 0 not",
            labels=labels,
        )
        ipa_checked = GaugeMetricFamily(
            "idm_backup_last_services_check_timestamp_seconds",
            "Completion time of that backup (Unix seconds)",
            labels=labels,
        )
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
            if with_services := [b for b in done if b.services is not None]:
                ipa_running.add_metric(list(key), 1 if with_services[-1].services else 0)
                ipa_checked.add_metric(list(key), _completed(with_services[-1]))
        yield from (last_success, last_failure, last_status, size, in_progress, ipa_running, ipa_checked)

        # idm_backup_attempt_total, _success_total, _failure_total, then idm_backup_duration_seconds.
        yield from counted

        per_namespace: dict[str, int] = {}
        for schedule in schedules:
            per_namespace[schedule.key[1]] = per_namespace.get(schedule.key[1], 0) + 1
        schedule_count = GaugeMetricFamily("idm_backup_schedules", "IdmBackupSchedules", labels=["namespace"])
        for namespace, number in sorted(per_namespace.items()):
            schedule_count.add_metric([namespace], number)
        yield schedule_count
        next_run = GaugeMetricFamily(
            "idm_backup_schedule_next_run_timestamp_seconds",
            "When the schedule runs next (Unix seconds)",
            labels=labels,
        )
        for schedule in sorted(schedules, key=lambda s: s.key):
            if schedule.next_run is not None:
                next_run.add_metric(list(schedule.key), schedule.next_run)
        yield next_run

        available = GaugeMetricFamily(
            "idm_backup_storage_available",
            "Whether the last check reached the schedule's storage: 1 available, 0 not",
            labels=list(STORAGE_LABELS),
        )
        checked = GaugeMetricFamily(
            "idm_backup_storage_last_check_timestamp_seconds",
            "When the schedule's storage was last checked (Unix seconds)",
            labels=list(STORAGE_LABELS),
        )
        for result in storage:
            values = [*result.key, result.location]
            available.add_metric(values, 1 if result.available else 0)
            checked.add_metric(values, result.checked)
        yield from (available, checked)
        yield from _drill_families(schedules)


def _drill_families(schedules: Sequence[_Schedule]) -> Iterator[Metric]:
    labels = list(LABELS)
    last_success = GaugeMetricFamily(
        "idm_backup_drill_last_successful_timestamp_seconds",
        "Completion time of the schedule's last successful restore drill (Unix seconds)",
        labels=labels,
    )
    last_failure = GaugeMetricFamily(
        "idm_backup_drill_last_failure_timestamp_seconds",
        "Completion time of the schedule's last failed restore drill (Unix seconds)",
        labels=labels,
    )
    last_status = GaugeMetricFamily(
        "idm_backup_drill_last_status",
        "Result of the schedule's last finished restore drill: 1 succeeded, 0 failed",
        labels=labels,
    )
    duration = GaugeMetricFamily(
        "idm_backup_drill_last_duration_seconds",
        "Restore time of the last successful drill, staging to the end of the check: the expected RTO",
        labels=labels,
    )
    failures = GaugeMetricFamily(
        "idm_backup_drill_consecutive_failures",
        "Restore drills of the schedule that failed since its last successful one",
        labels=labels,
    )
    for schedule in sorted(schedules, key=lambda s: s.key):
        drills, key = schedule.drills, list(schedule.key)
        if drills is None:
            continue
        if drills.last_success is not None:
            last_success.add_metric(key, drills.last_success)
        if drills.last_failure is not None:
            last_failure.add_metric(key, drills.last_failure)
        if drills.last_succeeded is not None:
            last_status.add_metric(key, 1 if drills.last_succeeded else 0)
        if drills.restore_seconds is not None:
            duration.add_metric(key, drills.restore_seconds)
        failures.add_metric(key, drills.consecutive_failures)
    yield from (last_success, last_failure, last_status, duration, failures)


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


def _services_running(status: Mapping[str, Any]) -> bool | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "ServicesRunning" and condition.get("status") in ("True", "False"):
            return bool(condition["status"] == "True")
    return None


def _without_created(family: Metric) -> Metric:
    """A counter's or histogram's family without its `_created` samples (the time its child was made):
    they would add a series per child that nothing here reads."""
    family.samples = [s for s in family.samples if not s.name.endswith("_created")]
    return family


def _completed(backup: _Backup) -> float:
    return backup.completed or 0.0


def _finish_order(backup: _Backup) -> tuple[float, tuple[str, str]]:
    return (_completed(backup), backup.order)


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
