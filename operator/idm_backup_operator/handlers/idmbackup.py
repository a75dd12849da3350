"""IdmBackup: one backup, taken once, by the pipeline in idm_backup_operator.idmbackup.pipeline."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from typing import Any, NoReturn

import kopf
from kubernetes import client

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import GROUP, IDMBACKUP, IDMBACKUPS, VERSION
from idm_backup_operator.api.phase import Phase, is_finished
from idm_backup_operator.api.spec import parse_backup_spec
from idm_backup_operator.api.times import parse_time
from idm_backup_operator.archive import stored
from idm_backup_operator.freeipa import InvalidBackupOptions
from idm_backup_operator.idmbackup import pipeline, removal, validation
from idm_backup_operator.idmbackup import status as idmbackup_status
from idm_backup_operator.kube.reporting import CANCEL_CHECK_SECONDS, StatusNotWritten, StatusReporter
from idm_backup_operator.slots import BackupSlots, MiB, Queued, TooLarge
from idm_backup_operator.storage.s3 import PARTS_IN_MEMORY

# How often a backup waiting for another one of the same server, or for its pod, checks again.
WAIT_RETRY_SECONDS = 10
# How long a backup waits for its pod to become ready, e.g. after the previous backup restarted IPA and
# before the readiness probe saw it.
NOT_READY_PATIENCE = datetime.timedelta(minutes=5)
WAIT_STEPS = {
    "TargetBusy": "waiting for the server's lock",
    "TargetNotReady": "waiting for the pod to be ready",
}


def _reporter(memo: kopf.Memo, resource: ResourceIdentity, body: kopf.Body) -> StatusReporter:
    return StatusReporter(
        memo.api,
        resource,
        kind=IDMBACKUP,
        plural=IDMBACKUPS,
        generation=body.metadata.get("generation") or 1,
        status=dict(body.status),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _fail(report: StatusReporter, status: kopf.Status, reason: str, message: str) -> None:
    idmbackup_status.set_failed(report, parse_time(status.get("startTime")), reason, message)


def _requeue(report: StatusReporter, message: str) -> NoReturn:
    """Stopped cleanly by a shutdown: Pending again, and kopf's retry (kept in the resource's annotations)
    makes the next operator take it from the start, as a Job's pod is started again after an eviction."""
    message = f"{message}; the next operator takes it again from the start"
    report.condition(
        "Waiting",
        True,
        pipeline.SHUTDOWN,
        message,
        also={
            "phase": Phase.PENDING.value,
            "step": "waiting for the operator to start again",
            "message": message,
        },
    )
    report.event("BackupInterrupted", message, warning=True)
    raise kopf.TemporaryError(message, delay=WAIT_RETRY_SECONDS)


def condition_true(status: kopf.Status, type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or [])


@kopf.on.create(GROUP, VERSION, IDMBACKUPS)
async def take_backup(
    body: kopf.Body,
    status: kopf.Status,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    resource = ResourceIdentity(
        body.metadata.namespace or "", body.metadata.name or "", body.metadata.uid or ""
    )
    phase = status.get("phase")
    if is_finished(phase):
        return
    finished: set[str] = memo.backups_finished
    if resource.uid in finished:
        # kopf replays older copies of an object it could not mark as handled: all the events queued
        # during the backup once the object is deleted, or one whose watch was slow to deliver kopf's
        # own last patch. Such a copy says Pending or Running: taking the backup again, or "recovering"
        # it as interrupted, would undo what this process did.
        logger.debug("%s/%s was already handled by this process", resource.namespace, resource.name)
        return
    report = _reporter(memo, resource, body)
    unwritten: dict[str, dict[str, Any]] = memo.unwritten_outcomes
    if resource.uid in unwritten:
        # This process ended the backup, and only its final status write failed: write that again.
        await asyncio.to_thread(write_again, report, unwritten, resource.uid)
        finished.add(resource.uid)
        return

    async def queued(why: Queued) -> None:
        # Best effort: a status write that fails must not cost the backup its place in the queue.
        try:
            await asyncio.to_thread(_report_queued, report, phase, why)
        except client.ApiException as err:
            logger.warning(f"could not report the queued backup: {err.status} {err.reason}")

    async def still_wanted() -> bool:
        return not await asyncio.to_thread(report.cancelled)

    slots: BackupSlots = memo.backup_slots
    try:
        async with slots.slot(
            resource.namespace,
            resource.uid,
            on_queued=queued,
            still_wanted=still_wanted,
            recheck_seconds=CANCEL_CHECK_SECONDS,
            memory=_upload_memory(body.spec),
        ) as wanted:
            if wanted:
                # Returns once the backup has ended either way; waiting for the server's lock raises
                # TemporaryError, the slot goes to the next backup, and kopf calls again.
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(
                    memo.backup_executor, _take_or_recover, resource, body, memo, logger
                )
    except TooLarge as err:
        message = f"invalid spec: spec.storage.s3.partSizeMiB: {err}"
        await asyncio.to_thread(_fail, report, status, "InvalidSpec", message)
    finished.add(resource.uid)


def _upload_memory(spec: kopf.Spec) -> int:
    """The memory a backup's upload holds: its S3 parts; a PVC upload writes each chunk as it comes."""
    s3 = (spec.get("storage") or {}).get("s3")
    return PARTS_IN_MEMORY * int(s3.get("partSizeMiB") or 16) * MiB if s3 else 0


def _report_queued(report: StatusReporter, phase: str | None, why: Queued) -> None:
    # A Running backup waits here only to be recovered after a restart: its step says where it stopped.
    where = (
        {} if phase == Phase.RUNNING else {"phase": Phase.PENDING.value, "step": "waiting for a backup slot"}
    )
    report.condition("Waiting", True, "OperatorBusy", why.message, also={**where, "message": why.message})


def write_again(report: StatusReporter, unwritten: dict[str, dict[str, Any]], uid: str) -> None:
    try:
        report.update(**unwritten[uid])
    except StatusNotWritten as lost:
        raise kopf.TemporaryError(f"{lost}; trying again", delay=WAIT_RETRY_SECONDS) from None
    del unwritten[uid]


def keep_unwritten(
    run: Callable[[], None], memo: kopf.Memo, uid: str, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    """Run a backup or restore once. Its outcome stands even when its record fails, even after retries:
    taking it for an interrupted run on kopf's next call would misreport it, so the very status is kept
    and written again (write_again)."""
    try:
        run()
    except StatusNotWritten as lost:
        logger.error(f"{lost}; writing it again in {WAIT_RETRY_SECONDS} s")
        memo.unwritten_outcomes[uid] = lost.status
        raise kopf.TemporaryError(str(lost), delay=WAIT_RETRY_SECONDS) from None


def wait_again(
    report: StatusReporter,
    body: kopf.Body,
    reason: str,
    message: str,
    *,
    event: str,
    fail: Callable[[str, str], None],
    keep_phase: bool = False,
) -> None:
    """Nothing was changed and the run must wait (the server's lock, its pod): Pending with the reason
    (`keep_phase`: a recovery stays Running, its step saying where the run stopped), and kopf calls again
    in WAIT_RETRY_SECONDS. A pod not ready for longer than NOT_READY_PATIENCE ends it TargetUnavailable."""
    created = parse_time(body.metadata.get("creationTimestamp"))
    if reason == "TargetNotReady" and created and _now() - created > NOT_READY_PATIENCE:
        fail("TargetUnavailable", f"{message} for more than {NOT_READY_PATIENCE}")
        return
    where = {} if keep_phase else {"phase": Phase.PENDING.value, "step": WAIT_STEPS[reason]}
    if not condition_true(body.status, "Waiting"):
        report.event(event, message)
    report.condition("Waiting", True, reason, message, also={**where, "message": message})
    raise kopf.TemporaryError(message, delay=WAIT_RETRY_SECONDS)


def _take_or_recover(
    resource: ResourceIdentity,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    report = _reporter(memo, resource, body)
    keep_unwritten(lambda: _run(resource, body, memo, report, logger), memo, resource.uid, logger)


def _run(
    resource: ResourceIdentity,
    body: kopf.Body,
    memo: kopf.Memo,
    report: StatusReporter,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    spec, status = body.spec, body.status
    phase = status.get("phase")
    try:
        parsed = parse_backup_spec(spec)
    except (InvalidBackupOptions, KeyError) as err:
        _fail(report, status, "InvalidSpec", f"invalid spec: {err}")
        return
    # Not for a backup left Running: its server may have IPA stopped, and recovery must put it back even
    # if a newer operator would refuse the spec (a rule added by an upgrade that caught it mid-run).
    if phase != Phase.RUNNING and (problems := validation.spec_problems(parsed)):
        _fail(report, status, "InvalidSpec", f"invalid spec: {'; '.join(problems)}")
        return
    try:
        if phase == Phase.RUNNING:
            # Only a previous operator process leaves a backup Running: this one never raises mid-run,
            # and stale copies of its own backups were set aside.
            pipeline.recover_interrupted(resource, parsed, dict(status), memo.services, report)
        else:
            if phase is None:
                report.update(phase=Phase.PENDING.value, step="pre-flight checks", message="")
            pipeline.take_backup(resource, parsed, memo.services, report)
    except pipeline.MustWait as wait:
        wait_again(
            report,
            body,
            wait.reason,
            str(wait),
            event="BackupWaiting",
            fail=lambda reason, message: _fail(report, status, reason, message),
            keep_phase=phase == Phase.RUNNING,
        )
    except pipeline.BackupFailed as failed:
        if failed.reason == pipeline.SHUTDOWN:
            _requeue(report, failed.message)
        _fail(report, status, failed.reason, failed.message)
    except Exception as err:
        logger.exception("backup %s/%s failed unexpectedly", resource.namespace, resource.name)
        _fail(report, status, "InternalError", f"unexpected {type(err).__name__}: {err}")


def _deletes_stored(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("deletionPolicy") == "Delete"


# Only backups whose policy is Delete get a finalizer: deleting a Retain backup never waits for us.
@kopf.on.delete(GROUP, VERSION, IDMBACKUPS, when=_deletes_stored)
def delete_stored(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo, **_: Any) -> None:
    resource = ResourceIdentity(
        body.metadata.namespace or "", body.metadata.name or "", body.metadata.uid or ""
    )
    try:
        parsed = parse_backup_spec(spec)
        removed = removal.delete_stored_backup(memo.services, resource, parsed, dict(status))
    except stored.StoredBackupError as err:
        # Keeping the finalizer would block the deletion forever on, say, a revoked credential: the
        # resource goes, and the Event says what was left behind.
        _reporter(memo, resource, body).event("StoredBackupNotDeleted", str(err), warning=True)
        return
    if removed:
        _reporter(memo, resource, body).event("StoredBackupDeleted", f"deleted {', '.join(removed)}")
