"""The names the API is spelled with: group, version, kinds and plurals, and the labels and annotations the
operator writes. Every module takes them from here, so a rename is one line.
"""

from __future__ import annotations

import hashlib

GROUP = "idm-backup.io"
VERSION = "v1alpha1"

IDMBACKUP = "IdmBackup"
IDMBACKUPS = "idmbackups"
IDMBACKUPSCHEDULE = "IdmBackupSchedule"
IDMBACKUPSCHEDULES = "idmbackupschedules"
IDMRESTORE = "IdmRestore"
IDMRESTORES = "idmrestores"

# On an IdmBackup a schedule made: the schedule's name (selects a schedule's backups).
SCHEDULE_LABEL = f"{GROUP}/schedule"
# On an IdmBackup retention must never delete.
PINNED_LABEL = f"{GROUP}/pinned"
# On an IdmBackup a schedule made: the tick it was made for (RFC 3339).
TICK_ANNOTATION = f"{GROUP}/scheduled-for"
# On an IdmBackup `idm-backup-operator backup-now` made from a schedule.
MANUAL_ANNOTATION = f"{GROUP}/manual"
# On the scratch pod, claim and NetworkPolicy of a restore drill: the IdmRestore's name.
DRILL_LABEL = f"{GROUP}/drill"
MANAGED_BY_LABELS = {"app.kubernetes.io/managed-by": "idm-backup-operator"}
# kopf's finalizer and its bookkeeping annotations (progress, last handled configuration).
FINALIZER = f"{GROUP}/finalizer"
KOPF_ANNOTATION_PREFIX = GROUP

# Kubernetes object names of the kinds the operator creates: DNS labels, so that they can also be label
# values and parts of other names.
NAME_LIMIT = 63


def bounded_name(base: str, suffix: str) -> str:
    """`<base><suffix>` within NAME_LIMIT characters; a base too long is cut and given a hash of itself, so
    that two long names with a common prefix do not end in the same name."""
    if len(base) + len(suffix) <= NAME_LIMIT:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = NAME_LIMIT - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"
