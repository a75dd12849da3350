"""IdmBackupSchedule: one sleeping task per schedule, woken at its next tick (of its backups or of its
drills) or when one of its backups or drills ends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
from typing import Any

import kopf
from kubernetes import client

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import (
    GROUP,
    IDMBACKUPS,
    IDMBACKUPSCHEDULE,
    IDMBACKUPSCHEDULES,
    IDMRESTORES,
    SCHEDULE_LABEL,
    VERSION,
)
from idm_backup_operator.api.phase import is_finished
from idm_backup_operator.idmbackupschedule import drills, pause, reconcile
from idm_backup_operator.kube.backups import DrillRestores, IdmBackups
from idm_backup_operator.kube.reporting import StatusReporter

# Even with nothing due, look again this often: it bounds how long a missed wake-up (a lost watch
# event) can delay a status update or retention.
MAX_SLEEP_SECONDS = 300.0
# Schedules are evaluated at whole minutes; waking a little late keeps a tick from being seen as
# "not yet due" because of clock granularity.
TICK_GRACE_SECONDS = 0.2
PASS_THREADS = 32
RECORD_SPREAD_SECONDS = 20


def _wakeups(memo: kopf.Memo) -> dict[tuple[str, str], asyncio.Event]:
    # Created at start-up in the operator-wide memo: each object's memo is a shallow copy of it, so
    # all of them share this one dict. Keyed by (namespace, uid): a restore wakes its namespace's.
    wakeups: dict[tuple[str, str], asyncio.Event] = memo.schedule_wakeups
    return wakeups


def wake_namespace(memo: kopf.Memo, namespace: str) -> None:
    """Every schedule of the namespace looks again now: a restore there took or gave back a server's
    lock. Called from the restore's thread; the events belong to the loop, so the loop sets them."""

    def wake() -> None:
        for (schedule_namespace, _), event in list(_wakeups(memo).items()):
            if schedule_namespace == namespace:
                event.set()

    memo.schedule_loop.call_soon_threadsafe(wake)


def _backups(memo: kopf.Memo) -> IdmBackups:
    return IdmBackups(client.CustomObjectsApi(memo.api))


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    return {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}


def _record(body: kopf.Body, memo: kopf.Memo, tick: reconcile.Tick | reconcile.Invalid) -> datetime.datetime:
    schedule = _snapshot(body)
    meta = schedule["metadata"]
    now = datetime.datetime.now(datetime.UTC)
    # RestoreVerified is Unknown until the first drill ends: the reporter writes it with the other conditions.
    schedule["status"]["conditions"] = drills.with_drill_condition(schedule["spec"], schedule["status"], now)
    report = StatusReporter(
        memo.api,
        ResourceIdentity(meta["namespace"], meta["name"], meta["uid"]),
        kind=IDMBACKUPSCHEDULE,
        plural=IDMBACKUPSCHEDULES,
        generation=meta.get("generation") or 1,
        status=schedule["status"],
    )
    next_time = reconcile.record(memo.services, _backups(memo), schedule, report, now, tick)
    if isinstance(tick, reconcile.Invalid):
        return next_time
    pause.report_pause(memo.services, schedule, report)
    restores = DrillRestores(memo.services.custom)
    next_drill = drills.reconcile_drills(restores, _backups(memo), schedule, report, now)
    return next_time if next_drill is None else min(next_time, next_drill)


def _spread(uid: str) -> float:
    """A fixed delay per schedule for the bookkeeping after a tick, so hundreds of schedules that fire
    in the same minute do not all write their status at once while others still create their backups."""
    return int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) % (RECORD_SPREAD_SECONDS * 1000) / 1000


@kopf.on.startup()
async def size_the_pass_threads(memo: kopf.Memo, **_: Any) -> None:
    # Passes run in the loop's default executor (asyncio.to_thread), which has only a handful of
    # threads; passes mostly wait on the API server, and a minute's ticks must not queue behind them.
    memo.schedule_loop = asyncio.get_running_loop()
    memo.schedule_loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=PASS_THREADS, thread_name_prefix="schedule-pass")
    )


@kopf.daemon(GROUP, VERSION, IDMBACKUPSCHEDULES, cancellation_timeout=10)
async def follow_schedule(
    stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any
) -> None:
    uid = body.metadata.uid or ""
    key = (body.metadata.namespace or "", uid)
    wakeup = _wakeups(memo).setdefault(key, asyncio.Event())
    try:
        while not stopped:
            wakeup.clear()
            try:
                # The body is a live view: each pass sees the latest spec and status.
                now = datetime.datetime.now(datetime.UTC)
                tick = await asyncio.to_thread(reconcile.take_tick, _backups(memo), _snapshot(body), now)
                if isinstance(tick, reconcile.Tick) and tick.created:
                    await _sleep(_spread(uid), asyncio.Event(), stopped)
                next_time = await asyncio.to_thread(_record, body, memo, tick)
                delay = (next_time - datetime.datetime.now(datetime.UTC)).total_seconds() + TICK_GRACE_SECONDS
            except client.ApiException as err:
                logger.warning(f"schedule pass failed, retrying in 10s: {err.reason}")
                delay = 10.0
            await _sleep(min(max(delay, 0.0), MAX_SLEEP_SECONDS), wakeup, stopped)
    finally:
        _wakeups(memo).pop(key, None)


async def _sleep(seconds: float, wakeup: asyncio.Event, stopped: kopf.DaemonStopped) -> None:
    waiters = [asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _wake_owner(body: kopf.Body, memo: kopf.Memo) -> None:
    if not is_finished(body.status.get("phase")) and body.metadata.get("deletionTimestamp") is None:
        return
    for owner in body.metadata.get("ownerReferences") or []:
        key = (body.metadata.namespace or "", owner.get("uid") or "")
        if owner.get("kind") == IDMBACKUPSCHEDULE and (event := _wakeups(memo).get(key)):
            event.set()


@kopf.on.event(GROUP, VERSION, IDMBACKUPS, labels={SCHEDULE_LABEL: kopf.PRESENT})
async def backup_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A schedule's backup finished or vanished: its schedule updates status and retention now.

    Async, so it runs on the event loop that owns the daemons' events.
    """
    _wake_owner(body, memo)


@kopf.on.event(GROUP, VERSION, IDMRESTORES, labels={SCHEDULE_LABEL: kopf.PRESENT})
async def drill_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A schedule's drill finished or vanished: its schedule records the outcome now."""
    _wake_owner(body, memo)


@kopf.on.event(GROUP, VERSION, IDMBACKUPSCHEDULES)
async def schedule_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A changed spec (a new cron, a resume) takes effect now, not when the task would next wake.

    Only a spec the task has not seen yet counts: its own status patches must not wake it in a loop.
    """
    unseen = body.metadata.get("generation") != body.status.get("observedGeneration")
    if unseen and (event := _wakeups(memo).get((body.metadata.namespace or "", body.metadata.uid or ""))):
        event.set()
