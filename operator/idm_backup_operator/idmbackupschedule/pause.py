"""A schedule paused by a restore: while an IdmRestore holds the lock of the server a schedule backs up,
the schedule says so in its own status (condition `Paused`), not only in the backups that wait.

The truth is the server's Lease (kube.locking), the same one that keeps every backup off the server
during the restore, so the condition cannot claim a pause the lock does not enforce, nor miss one. The
schedule's target is matched to the Lease's pod by every pod it could designate, ready or not: a server
being restored is often not ready.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from idm_backup_operator.api.names import IDMRESTORE
from idm_backup_operator.api.spec import parse_target
from idm_backup_operator.kube import locking, references
from idm_backup_operator.kube.errors import ApiError, api_message
from idm_backup_operator.kube.services import Reporter, Services

log = logging.getLogger(__name__)

PAUSED = "Paused"


def restore_holding(services: Services, namespace: str, template_spec: Mapping[str, Any]) -> str | None:
    """The IdmRestore holding the lock of a server this schedule's template targets, as the Lease names it."""
    restoring = {
        pod: holder
        for pod, holder in locking.holders(services.coordination, namespace).items()
        if holder.startswith(f"{IDMRESTORE} ")
    }
    if not restoring:
        return None
    target = parse_target(template_spec["target"])
    for pod in sorted(references.matching_pod_names(services.core, namespace, target) & restoring.keys()):
        return f"{restoring[pod]} on pod {pod}"
    return None


def report_pause(services: Services, schedule: Mapping[str, Any], report: Reporter) -> None:
    """Write `Paused` when a restore holds the server, and once more when it no longer does."""
    namespace = schedule["metadata"]["namespace"]
    try:
        holder = restore_holding(services, namespace, schedule["spec"]["template"]["spec"])
    except ApiError as err:
        # Only a report: the lock itself keeps backups off the server whatever this says.
        name = schedule["metadata"]["name"]
        log.warning(
            "cannot tell whether a restore holds %s/%s's server: %s", namespace, name, api_message(err)
        )
        return
    if holder is not None:
        report.condition(
            PAUSED,
            True,
            "RestoreInProgress",
            f"{holder} holds the server's lock: this schedule's backups wait until it ends",
        )
        return
    conditions = (schedule.get("status") or {}).get("conditions") or []
    if any(c.get("type") == PAUSED and c.get("status") == "True" for c in conditions):
        report.condition(PAUSED, False, "NoRestore", "no IdmRestore holds the server's lock")
