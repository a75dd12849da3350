"""Every schedule's storage is checked now and then (idmbackupschedule/storagecheck.py).

The result goes to the metrics (idm_backup_storage_available) and, when it changes, to an Event on the
schedule. A kopf daemon per schedule that sleeps between checks, rather than a kopf timer: kopf cannot
cancel a timer, and one caught in a check when its schedule is deleted holds the finalizer for a minute
(kopf's cancellation polling); a daemon is cancelled at once, and the probe's thread ends by its own
bound. Daemons run only in the active operator when peering, and stop when the schedule is deleted.

The checks run in a small thread pool of their own: a storage that hangs until the probe's bound must
not hold the threads that the schedules' passes run in (handlers/idmbackupschedule.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import kopf

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import GROUP, IDMBACKUPSCHEDULE, IDMBACKUPSCHEDULES, VERSION
from idm_backup_operator.idmbackupschedule import storagecheck
from idm_backup_operator.kube.reporting import StatusReporter
from idm_backup_operator.metrics import BackupMetrics

CONFIG = storagecheck.CheckConfig.from_env()
CHECK_THREADS = 4


@kopf.on.startup()
def create_storage_checks(memo: kopf.Memo, **_: Any) -> None:
    # In the operator-wide memo: each object's memo is a shallow copy of it, so all schedules share it.
    memo.storage_checks = storagecheck.StorageChecks(CONFIG)
    memo.storage_check_threads = concurrent.futures.ThreadPoolExecutor(
        max_workers=CHECK_THREADS, thread_name_prefix="storage-check"
    )


@kopf.daemon(GROUP, VERSION, IDMBACKUPSCHEDULES, cancellation_timeout=5, when=lambda **_: CONFIG.enabled)
async def check_storage(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await stopped.wait(storagecheck.first_delay(body.metadata.uid or "", CONFIG.interval))
    while not stopped:
        await _check(body, memo)  # the body is a live view: each check sees the latest template
        await stopped.wait(CONFIG.interval)


@kopf.on.cleanup()
def stop_storage_checks(memo: kopf.Memo, **_: Any) -> None:
    threads: concurrent.futures.ThreadPoolExecutor | None = memo.get("storage_check_threads")
    if threads is not None:
        threads.shutdown(wait=False, cancel_futures=True)


async def _check(body: kopf.Body, memo: kopf.Memo) -> None:
    checks: storagecheck.StorageChecks | None = memo.get("storage_checks")
    threads: concurrent.futures.ThreadPoolExecutor | None = memo.get("storage_check_threads")
    if checks is None or threads is None or memo.get("services") is None:
        return
    meta = body.metadata
    schedule = ResourceIdentity(meta.namespace or "", meta.name or "", meta.uid or "")
    snapshot = {"metadata": dict(meta), "spec": dict(body.spec)}
    report = StatusReporter(
        memo.api,
        schedule,
        kind=IDMBACKUPSCHEDULE,
        plural=IDMBACKUPSCHEDULES,
        generation=meta.get("generation") or 1,
        status=None,
    )
    try:
        result = await asyncio.get_running_loop().run_in_executor(
            threads, checks.check, memo.services, snapshot, report
        )
    except RuntimeError:  # the pool is shut down: the operator is exiting
        return
    metrics: BackupMetrics | None = memo.get("metrics")
    if metrics is None:
        return
    if result is None:
        metrics.forget_storage(schedule.uid)
    else:
        key = (schedule.name, schedule.namespace)
        metrics.observe_storage(
            schedule.uid, key, result.location, available=result.available, checked=result.checked
        )
