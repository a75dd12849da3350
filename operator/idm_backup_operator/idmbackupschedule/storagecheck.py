"""Is a schedule's storage reachable now, before its next backup finds out? A periodic, read-only check.

Like Velero's BackupStorageLocation phase: every `CheckConfig.interval` seconds (environment variable
IDM_BACKUP_STORAGE_CHECK_INTERVAL_SECONDS, default 300; 0 turns the check off) each IdmBackupSchedule's
storage, as its template names it, is opened with its namespace's credentials (`Services.opened_store`)
and asked for one listing that finds nothing: the keys under ``.idm-backup-storage-check/``. Nothing is
written. For S3 that is one ListObjectsV2 call (permission ``s3:ListBucket``, which the operator needs
anyway), which fails for an unreachable endpoint, a missing bucket, refused credentials or a bad CA;
for a PVC, opening it checks that the claim is mounted in the operator, and the listing that its
sub-path stays inside the volume. The probe is bounded by `CheckConfig.timeout` (environment variable
IDM_BACKUP_STORAGE_CHECK_TIMEOUT_SECONDS, default 30) through `Store.set_deadline`.

What the pre-flight test write of a backup finds (StorageUnavailable) is not all of this check's: a
bucket that refuses writes (s3:PutObject missing, a full volume) passes a listing. The check warns
early of what happens between backups: a bucket deleted, credentials rotated, an endpoint gone.

Schedules that share a location (the same storage spec in the same namespace, so the same credentials)
share a probe: a result younger than half the interval is used again. Each schedule's first check waits
a fixed part of the interval (`first_delay`, at most a minute), so that hundreds of schedules do not
check at once when the operator starts.

Each schedule reports its own changes, as Events on the schedule: Warning ``StorageUnavailable`` when its
storage turns unavailable (or is unavailable at the first check), Normal ``StorageAvailable`` when it
recovers. Suspended schedules and schedules whose template cannot be read are not checked.

This module knows neither kopf nor the Kubernetes client: handlers/storagecheck.py runs `check` from a
kopf daemon and hands the result to the metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.spec import PvcStorage, S3Storage, parse_backup_spec
from idm_backup_operator.kube.references import ResolveError
from idm_backup_operator.kube.services import Reporter, Services
from idm_backup_operator.storage import DeadlineExceeded, StorageError, Store

log = logging.getLogger(__name__)

INTERVAL_ENV = "IDM_BACKUP_STORAGE_CHECK_INTERVAL_SECONDS"
TIMEOUT_ENV = "IDM_BACKUP_STORAGE_CHECK_TIMEOUT_SECONDS"
DEFAULT_INTERVAL_SECONDS = 300.0
DEFAULT_TIMEOUT_SECONDS = 30.0
# A prefix no backup writes under: the listing costs one call and returns nothing.
PROBE_PREFIX = ".idm-backup-storage-check/"

UNAVAILABLE, AVAILABLE = "StorageUnavailable", "StorageAvailable"

Storage = S3Storage | PvcStorage


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    interval: float = DEFAULT_INTERVAL_SECONDS  # seconds between checks of a schedule; 0: no checks
    timeout: float = DEFAULT_TIMEOUT_SECONDS  # the bound of one probe

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CheckConfig:
        """The settings from the environment; a value that is not a number (or is negative) is
        logged and the default used: the check is a warning system, never a reason not to start."""
        env = os.environ if environ is None else environ
        return cls(
            interval=_seconds(env, INTERVAL_ENV, DEFAULT_INTERVAL_SECONDS, zero=True),
            timeout=_seconds(env, TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS, zero=False),
        )


def _seconds(env: Mapping[str, str], name: str, default: float, *, zero: bool) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        log.warning("%s=%r is not a valid number of seconds: using %g", name, text, default)
        return default
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """One check of one location: whether it answered, and if not, why."""

    location: str
    available: bool
    message: str  # why it is unavailable; "" when it is available
    checked: float  # when the check ended, Unix seconds


def location(storage: Storage) -> str:
    """A short name of a storage location, for the metric's label and messages."""
    if isinstance(storage, PvcStorage):
        return f"pvc://{storage.claim_name}/{storage.sub_path.strip('/')}".rstrip("/")
    return f"s3://{storage.bucket}/{storage.prefix.strip('/')}".rstrip("/")


def storage_of(schedule: Mapping[str, Any]) -> Storage | None:
    """The storage a schedule's backups go to; None for a suspended schedule or an unreadable template
    (the schedule's Ready condition says what is wrong with it)."""
    spec = schedule.get("spec") or {}
    if spec.get("suspend"):
        return None
    try:
        return parse_backup_spec((spec.get("template") or {})["spec"]).storage
    except (KeyError, TypeError, ValueError):
        return None


def first_delay(uid: str, interval: float) -> float:
    """How long a schedule waits before its first check: a fixed part of the interval (of at most a
    minute) per schedule, so that the checks of hundreds of schedules, started together with the
    operator, do not all run at once and stay spread afterwards."""
    spread = min(interval, 60.0)
    return int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) % 1000 / 1000 * spread


def probe(store: Store, timeout: float) -> None:
    """Raise StorageError unless the store answers a listing within `timeout` seconds; writes nothing."""
    store.set_deadline(time.monotonic() + timeout)
    next(iter(store.list_objects(PROBE_PREFIX)), None)


@dataclasses.dataclass
class _Probe:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    result: Result | None = None
    at: float = 0.0  # monotonic time of the result


class StorageChecks:
    """The checks of one operator process: probes shared by the schedules of one location, and each
    schedule's last result, so that only changes become Events. Safe to call from several threads."""

    def __init__(
        self,
        config: CheckConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._wall_clock, self._monotonic = wall_clock, monotonic
        self._lock = threading.Lock()
        self._probes: dict[tuple[str, Storage], _Probe] = {}
        self._last: dict[str, Result] = {}  # schedule uid -> its last result

    def check(self, services: Services, schedule: Mapping[str, Any], report: Reporter) -> Result | None:
        """Check the schedule's storage, post an Event if its availability changed, and return the
        result; None when the schedule is not checked (suspended, unreadable template). If the check
        itself could not run (not the storage's fault), the schedule's last result is returned."""
        meta = schedule.get("metadata") or {}
        identity = ResourceIdentity(
            meta.get("namespace") or "", meta.get("name") or "", meta.get("uid") or ""
        )
        storage = storage_of(schedule)
        if storage is None:
            self.forget(identity.uid)
            return None
        try:
            result = self._result(services, identity.namespace, storage)
        except Exception as err:  # the check must not fail its daemon: the log says why
            log.warning(
                "could not check the storage of IdmBackupSchedule %s/%s: %s: %s",
                identity.namespace,
                identity.name,
                type(err).__name__,
                err,
            )
            with self._lock:
                return self._last.get(identity.uid)
        with self._lock:
            previous = self._last.get(identity.uid)
            self._last[identity.uid] = result
        if not result.available and (
            previous is None or previous.available or previous.location != result.location
        ):
            report.event(UNAVAILABLE, result.message, warning=True)
        elif result.available and previous is not None and not previous.available:
            report.event(AVAILABLE, f"{result.location} is available again")
        return result

    def forget(self, uid: str) -> None:
        """A schedule no longer checked (deleted, suspended): its next check starts afresh."""
        with self._lock:
            self._last.pop(uid, None)

    def _result(self, services: Services, namespace: str, storage: Storage) -> Result:
        key = (namespace, storage)
        fresh_for = self.config.interval / 2
        with self._lock:
            self._prune()
            shared = self._probes.setdefault(key, _Probe())
        # One probe per location at a time; a schedule that waited for another's probe uses its result.
        with shared.lock:
            if shared.result is not None and self._monotonic() - shared.at < fresh_for:
                return shared.result
            result = self._probe(services, namespace, storage)
            shared.result, shared.at = result, self._monotonic()
            return result

    def _probe(self, services: Services, namespace: str, storage: Storage) -> Result:
        where = location(storage)
        try:
            with services.opened_store(namespace, storage) as store:
                probe(store, self.config.timeout)
        except DeadlineExceeded:
            message = f"{where} did not answer within {self.config.timeout:g} s"
        except (ResolveError, StorageError) as err:
            message = f"{where} is unavailable: {err}"
        else:
            return Result(where, True, "", self._wall_clock())
        log.info("storage check of namespace %s: %s", namespace, message)
        return Result(where, False, message, self._wall_clock())

    def _prune(self) -> None:
        """Drop the probes of locations no schedule has asked for in a while (called under the lock)."""
        horizon = self._monotonic() - 2 * max(self.config.interval, self.config.timeout)
        for key, shared in list(self._probes.items()):
            # A probe running now holds its lock: it stays.
            if shared.result is not None and shared.at < horizon and not shared.lock.locked():
                del self._probes[key]
