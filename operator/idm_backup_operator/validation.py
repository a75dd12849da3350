"""What the CRD schema cannot check, checked when an object is applied (the admission webhook).

The schema and its CEL rules already refuse malformed fields and the option combinations ipa-backup
refuses. What is left needs code or the cluster: cron expressions and time zones, paths that must stay
inside their store, combinations CEL would spell badly, and the objects a spec refers to (Secrets, the
public keys in them, the PVC mounted in the operator, the target pod).

Every problem is one line naming the field, worded as the operator words the same failure at run time,
because the checks reuse the functions the backup itself runs.

References weigh differently by who creates the object. A person's IdmBackup with a missing Secret would
fail seconds later, so it is refused. A schedule only gets warnings: the Secret may be created after the
schedule (GitOps applies in any order). A backup a schedule creates is not checked against them at all:
refused at 3 a.m., it would leave no Failed backup behind to alert on, and warnings would only reach the
operator itself, for ~23 ms of CPU each (benchmarks/webhook.md).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from kubernetes import client

from idm_backup_operator import cluster, schedules, scheduling
from idm_backup_operator.encryption import KeyMaterialError
from idm_backup_operator.model import BackupSpec, PvcStorage, parse_backup_spec
from idm_backup_operator.storage import StorageError
from idm_backup_operator.storage.base import check_key


@dataclasses.dataclass
class Findings:
    """Problems that refuse the object, and warnings kubectl prints without refusing it."""

    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def extend(self, other: Findings) -> None:
        self.errors.extend(other.errors)
        self.warnings.extend(other.warnings)


# What to do with problems of the objects a spec refers to: see the module's docstring.
References = Literal["refuse", "warn", "skip"]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where references are looked up: the object's namespace, as the operator will see it."""

    core: client.CoreV1Api
    namespace: str
    pvc_root: Path
    ambient_s3_credentials: bool


# -- the spec alone -----------------------------------------------------------------------------------


def spec_problems(spec: BackupSpec, at: str = "spec") -> list[str]:
    """Also run when a backup starts: without the webhook, this is the earliest point left."""
    problems = []
    ldap = spec.target.ldap
    if ldap.start_tls and ldap.url.lower().startswith("ldaps://"):
        problems.append(
            f"{at}.target.ldap.startTLS: an ldaps:// URL is already encrypted; use ldap:// with startTLS, "
            "or ldaps:// without it"
        )
    selector = spec.target.pod_selector
    if selector is not None and not selector.match_labels and not selector.match_expressions:
        problems.append(f"{at}.target.podSelector: an empty selector matches every pod in the namespace")
    if not spec.encryption.enabled and spec.encryption.recipients:
        problems.append(
            f"{at}.encryption.recipients: set, but encryption.mode is None (nothing is encrypted)"
        )
    storage = spec.storage
    if isinstance(storage, PvcStorage):
        paths = [(f"{at}.storage.pvc.subPath", storage.sub_path)]
    else:
        paths = [(f"{at}.storage.s3.prefix", storage.prefix)]
        if storage.kms_key_id and storage.server_side_encryption != "aws:kms":
            problems.append(f"{at}.storage.s3.kmsKeyID: only used with serverSideEncryption aws:kms")
    for field, value in paths:
        try:
            check_key(value, prefix=True)
        except StorageError as err:
            problems.append(f"{field}: {err}")
    return problems


# -- what the spec refers to ----------------------------------------------------------------------------


def _reference_problems(spec: BackupSpec, at: str, where: Cluster) -> list[str]:
    core, namespace = where.core, where.namespace
    ldap, storage = spec.target.ldap, spec.storage
    checks: list[tuple[str, Callable[[], object]]] = [
        (f"{at}.target", lambda: cluster.find_target_pod(core, namespace, spec.target)),
        (
            f"{at}.target.ldap.passwordSecretRef",
            lambda: cluster.read_secret_key(core, namespace, ldap.password),
        ),
    ]
    if (ca := ldap.ca) is not None:
        checks.append((f"{at}.target.ldap.caSecretRef", lambda: cluster.read_secret_key(core, namespace, ca)))
    if spec.encryption.enabled:
        checks.append(
            (f"{at}.encryption", lambda: cluster.load_public_keys(core, namespace, spec.encryption))
        )
    if isinstance(storage, PvcStorage):
        checks.append((f"{at}.storage.pvc.claimName", lambda: cluster.pvc_mount(storage, where.pvc_root)))
    else:
        checks.append(
            (
                f"{at}.storage.s3.credentialsSecretRef",
                lambda: cluster.s3_credentials(
                    core, namespace, storage, ambient=where.ambient_s3_credentials
                ),
            )
        )
        if (s3_ca := storage.ca) is not None:
            checks.append(
                (f"{at}.storage.s3.caSecretRef", lambda: cluster.read_secret_key(core, namespace, s3_ca))
            )
    problems = []
    for field, check in checks:
        try:
            check()
        except (cluster.ResolveError, KeyMaterialError) as err:
            problems.append(f"{field}: {err}")
        except client.ApiException as err:
            problems.append(f"{field}: could not be checked ({err.status} {err.reason})")
    return problems


def backup_findings(
    raw: Mapping[str, Any], where: Cluster, *, at: str = "spec", references: References = "refuse"
) -> Findings:
    """The problems of an IdmBackup spec (or a schedule's template, at="spec.template.spec")."""
    try:
        spec = parse_backup_spec(raw)
    except ValueError as err:
        return Findings(errors=[f"{at}: {err}"])
    findings = Findings(errors=spec_problems(spec, at))
    if references == "skip":
        return findings
    problems = _reference_problems(spec, at, where)
    if references == "refuse":
        findings.errors.extend(problems)
    else:
        findings.warnings.extend(
            f"{problem} (the backup will fail until this is fixed)" for problem in problems
        )
    return findings


# -- schedules ------------------------------------------------------------------------------------------


def schedule_findings(spec: Mapping[str, Any], where: Cluster, now: datetime.datetime) -> Findings:
    findings = Findings()
    cron = zone = None
    try:
        cron = scheduling.CronSchedule.parse(spec["schedule"])
    except scheduling.InvalidSchedule as err:
        findings.errors.append(f"spec.schedule: {err}")
    try:
        zone = scheduling.parse_time_zone(spec.get("timeZone") or "UTC")
    except scheduling.InvalidSchedule as err:
        findings.errors.append(f"spec.timeZone: {err}")
    if cron is not None and zone is not None:
        try:
            scheduling.next_tick(cron, now, zone)
        except scheduling.InvalidSchedule as err:
            findings.errors.append(f"spec.schedule: {err}")
    try:
        schedules.retention_policy(spec)
    except ValueError as err:
        findings.errors.append(f"spec.retention: {err}")
    template = spec["template"]["spec"]
    findings.extend(backup_findings(template, where, at="spec.template.spec", references="warn"))
    return findings


def refusal(kind: str, name: str, findings: Findings) -> str:
    """One message for everything wrong, so a single kubectl apply shows all there is to fix."""
    count = len(findings.errors)
    problems = "; ".join(findings.errors)
    return f"{kind} {name} refused ({count} problem{'s' if count > 1 else ''}): {problems}"
