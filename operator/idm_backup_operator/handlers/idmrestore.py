"""IdmRestore: one restore, run once, by the pipeline in idm_backup_operator.idmrestore.pipeline."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import GROUP, IDMRESTORE, IDMRESTORES, VERSION
from idm_backup_operator.api.phase import Phase, is_finished
from idm_backup_operator.api.spec import parse_restore_spec
from idm_backup_operator.api.times import parse_time
from idm_backup_operator.handlers.idmbackup import keep_unwritten, wait_again, write_again
from idm_backup_operator.idmrestore import pipeline
from idm_backup_operator.idmrestore import status as restore_status
from idm_backup_operator.kube.reporting import StatusReporter


@kopf.on.create(GROUP, VERSION, IDMRESTORES)
async def restore(
    body: kopf.Body,
    status: kopf.Status,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    resource = ResourceIdentity(
        body.metadata.namespace or "", body.metadata.name or "", body.metadata.uid or ""
    )
    # The same bookkeeping as a backup's (handlers/idmbackup.py says why): uids are unique across kinds.
    finished: set[str] = memo.backups_finished
    if is_finished(status.get("phase")) or resource.uid in finished:
        return
    report = StatusReporter(
        memo.api,
        resource,
        kind=IDMRESTORE,
        plural=IDMRESTORES,
        generation=body.metadata.get("generation") or 1,
        status=dict(body.status),
    )
    unwritten: dict[str, dict[str, Any]] = memo.unwritten_outcomes
    if resource.uid in unwritten:
        await asyncio.to_thread(write_again, report, unwritten, resource.uid)
    else:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(memo.backup_executor, _run_once, resource, body, memo, report, logger)
    finished.add(resource.uid)


def _run_once(
    resource: ResourceIdentity,
    body: kopf.Body,
    memo: kopf.Memo,
    report: StatusReporter,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    keep_unwritten(lambda: _run(resource, body, memo, report, logger), memo, resource.uid, logger)


def _run(
    resource: ResourceIdentity,
    body: kopf.Body,
    memo: kopf.Memo,
    report: StatusReporter,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    status = body.status
    started = parse_time(status.get("startTime"))
    try:
        spec = parse_restore_spec(body.spec)
    except KeyError as err:
        restore_status.set_failed(report, started, "InvalidSpec", f"invalid spec: {err} is missing")
        return
    except ValueError as err:
        restore_status.set_failed(report, started, "InvalidSpec", f"invalid spec: {err}")
        return
    try:
        if status.get("phase") == Phase.RUNNING:
            # Only a previous operator process leaves a restore Running: it ends Failed, cleaned up.
            pipeline.recover_interrupted(resource, dict(status), memo.services, report)
        else:
            if status.get("phase") is None:
                report.update(phase=Phase.PENDING.value, step="pre-flight checks", message="")
            pipeline.restore(resource, spec, memo.services, report)
    except pipeline.MustWait as wait:
        wait_again(
            report,
            body,
            wait.reason,
            str(wait),
            event="RestoreWaiting",
            fail=lambda reason, message: restore_status.set_failed(report, started, reason, message),
        )
    except pipeline.RestoreFailed as failed:
        restore_status.set_failed(report, started, failed.reason, failed.message)
    except Exception as err:
        logger.exception("restore %s/%s failed unexpectedly", resource.namespace, resource.name)
        restore_status.set_failed(report, started, "InternalError", f"unexpected {type(err).__name__}: {err}")
