"""What the CRD schema cannot check in an IdmRestore, checked when it is created (the admission webhook).

An IdmRestore's spec cannot change (CEL: self == oldSelf), so it is checked once, on CREATE. Its target
is an IdmBackup's target and a `location` source's storage an IdmBackup's storage: both are checked by
the very functions that check an IdmBackup (idmbackup/validation.py), with the same words. Added here:

- the decryption Secret exists, has its key (default private.asc), and holds an OpenPGP *private* key;
  for a backup whose status names its recipients, one of them. The passphrase Secret exists and has its
  key, as UTF-8 text. Whether the passphrase unlocks the key is found only when the archive is verified;
- backupRef: the IdmBackup exists and has Succeeded, with a stored archive. One that Failed, or is being
  deleted, is refused: it will never have an archive to restore. One that has not finished (Pending,
  Running) only warns: the restore fails (SourceNotSucceeded) if the backup has not Succeeded when the
  restore starts, but a backup of the same server holds that server's lock, and the restore waits for the
  lock before it looks at its source, so restoring the backup that is being taken usually works. Its
  header (when known) is checked against the restore: a Full restore needs a FULL backup, confirm must be
  the FQDN the backup was taken on, and an encrypted archive needs spec.decryption;
- scheduleRef: the IdmBackupSchedule exists. Its latest Succeeded backup is chosen when the restore
  starts: without one yet, a warning; with one, that backup is checked as a backupRef would be, except
  that a different backup may be chosen by then;
- who asks: every Secret the restore will read on the requester's behalf must be readable by them (a
  SubjectAccessReview, as for IdmBackups): the target's LDAP password and CA, the private key and its
  passphrase, and the storage's S3 credentials and CA. For a backupRef or scheduleRef source those are
  the referenced IdmBackup's own storage Secrets: the restore reads the archive with them, so the
  requester must be able to read them too. A Secret the requester may not read is not looked up for them.

A drill (mode: Drill) has no target: its scratch pod's LDAP Secrets are checked instead, and every Secret
its pod template names (volumes, env, envFrom, imagePullSecrets) must be readable by the requester, since
the operator creates that pod for them. A drill the operator's own schedule creates is not asked about.

Not checked here: whether /etc/ipa of the target is a symlink (a Full restore into freeipa-container),
which needs an exec into the pod; the pipeline refuses that before anything changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from idm_backup_operator.api.phase import Phase
from idm_backup_operator.api.spec import (
    BackupSpec,
    RestoreSpec,
    SecretKeyRef,
    parse_backup_spec,
    parse_restore_spec,
)
from idm_backup_operator.archive import stored
from idm_backup_operator.archive.verify import key_fingerprints
from idm_backup_operator.freeipa.ipa_restore import RestoreType
from idm_backup_operator.idmbackup.validation import (
    Check,
    Findings,
    ReferenceScope,
    Requester,
    access_problems,
    check_problems,
    name_problems,
    object_name_problem,
    storage_checks,
    storage_names,
    storage_problems,
    storage_secret_refs,
    target_checks,
    target_names,
    target_problems,
    target_secret_refs,
)
from idm_backup_operator.kube import references
from idm_backup_operator.kube.access import may
from idm_backup_operator.kube.backups import NotFound
from idm_backup_operator.kube.errors import ApiError
from idm_backup_operator.storage import StorageError
from idm_backup_operator.storage.base import check_key

__all__ = ["Backups", "Findings", "ReferenceScope", "Requester", "restore_findings"]

EXPORT_HINT = "gpg --armor --export-secret-keys <fingerprint>"


class Backups(Protocol):
    """The IdmBackups (and schedules) a source names: kube.backups.IdmBackups."""

    def get(self, namespace: str, name: str) -> Mapping[str, Any]: ...

    def latest_succeeded(self, namespace: str, schedule_name: str) -> Mapping[str, Any] | None: ...


class _Source:
    """What the source adds: its problems, the Secrets the restore reads through it and their checks,
    and, once a backup is known, what its status says about the archive."""

    def __init__(self) -> None:
        self.findings = Findings()
        self.refs: list[tuple[str, str]] = []
        self.checks: list[Check] = []
        self.recipients: set[str] = set()
        self.backup: str | None = None  # the IdmBackup, for the messages about the key


def restore_findings(
    raw: Mapping[str, Any],
    where: ReferenceScope,
    *,
    requester: Requester | None,
    backups: Backups,
) -> Findings:
    """The problems of an IdmRestore spec. With a requester, every Secret the restore reads must be
    readable by them; without one (the operator's own requests), that is not asked."""
    try:
        spec = parse_restore_spec(raw)
    except (KeyError, ValueError) as err:
        return Findings(errors=[f"spec: {err}"])
    findings = Findings(errors=_spec_problems(spec))
    source = _source(spec, where, backups)
    findings.extend(source.findings)
    refs = [*_server_refs(spec), *_decryption_refs(spec), *source.refs]
    withheld: set[str] = set()
    if requester is not None:
        denied, withheld = access_problems(refs, where, requester, user="restore")
        findings.errors.extend(denied)
        findings.errors.extend(_drill_rights(spec, where, requester))
    checks = [
        *([] if spec.target is None else target_checks(spec.target, "spec.target", where)),
        *_drill_checks(spec, where),
        *_decryption_checks(spec, where, source),
        *source.checks,
    ]
    findings.errors.extend(check_problems(checks, withheld))
    return findings


# -- the spec alone ---------------------------------------------------------------------------------------


def _spec_problems(spec: RestoreSpec) -> list[str]:
    source = spec.source
    names: list[tuple[str, str | None]] = [
        ("spec.source.backupRef.name", source.backup),
        ("spec.source.scheduleRef.name", source.schedule),
        *([] if spec.target is None else target_names(spec.target, "spec.target")),
        (
            "spec.decryption.secretKeySecretRef.name",
            None if spec.secret_key is None else spec.secret_key.name,
        ),
        (
            "spec.decryption.passphraseSecretRef.name",
            None if spec.passphrase is None else spec.passphrase.name,
        ),
    ]
    if source.storage is not None:
        names.extend(storage_names(source.storage, "spec.source.location.storage"))
    problems = name_problems(names)
    if spec.target is not None:
        problems.extend(target_problems(spec.target, "spec.target"))
    if source.storage is not None:
        problems.extend(storage_problems(source.storage, "spec.source.location.storage"))
        try:
            check_key(source.directory or "", prefix=True)
        except StorageError as err:
            problems.append(f"spec.source.location.directory: {err}")
    return problems


# -- the server restored into: the target, or a drill's scratch pod --------------------------------------


def _server_refs(spec: RestoreSpec) -> list[tuple[str, str]]:
    """The target's LDAP Secrets; for a drill, its LDAP Secrets and every Secret its pod template names:
    the operator creates that pod, so a Secret it mounts is one the requester makes the operator hand
    out."""
    if spec.target is not None:
        return target_secret_refs(spec.target, "spec.target")
    if spec.drill is None:
        return []
    ldap = spec.drill.ldap
    refs = [("spec.drill.ldap.passwordSecretRef", ldap.password.name)]
    if ldap.ca is not None:
        refs.append(("spec.drill.ldap.caSecretRef", ldap.ca.name))
    refs.extend(
        ("spec.drill.podTemplate", name) for name in sorted(_pod_template_secrets(spec.drill.pod_template))
    )
    return refs


def _pod_template_secrets(template: Mapping[str, Any]) -> set[str]:
    pod = template.get("spec") or {}
    names = {str(ref.get("name")) for ref in pod.get("imagePullSecrets") or () if ref.get("name")}
    for volume in pod.get("volumes") or ():
        if name := (volume.get("secret") or {}).get("secretName"):
            names.add(str(name))
        for projected in (volume.get("projected") or {}).get("sources") or ():
            if name := (projected.get("secret") or {}).get("name"):
                names.add(str(name))
    containers = [*(pod.get("initContainers") or ()), *(pod.get("containers") or ())]
    for container in containers:
        for env in container.get("env") or ():
            if name := ((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"):
                names.add(str(name))
        for source in container.get("envFrom") or ():
            if name := (source.get("secretRef") or {}).get("name"):
                names.add(str(name))
    return names


def _drill_rights(spec: RestoreSpec, where: ReferenceScope, requester: Requester) -> list[str]:
    """A drill makes the operator create a pod (and a claim) from the requester's template: only for a
    requester who may create them in the namespace themselves, or an IdmRestore would lend them the
    operator's rights."""
    if spec.drill is None:
        return []
    wanted = [("pods", "spec.drill.podTemplate")]
    if spec.drill.volume_claim_template is not None:
        wanted.append(("persistentvolumeclaims", "spec.drill.volumeClaimTemplate"))
    problems = []
    for resource, field in wanted:
        try:
            allowed = may(where, requester, "create", resource)
        except ApiError as err:
            problems.append(
                f"{field}: cannot ask whether {requester.username} may create {resource}: {err.reason}"
            )
            continue
        if not allowed:
            problems.append(
                f"{field}: {requester.username} may not create {resource} in namespace {where.namespace}, so "
                f"no drill they create may have the operator create one for them (RBAC: create on {resource})"
            )
    return problems


def _drill_checks(spec: RestoreSpec, where: ReferenceScope) -> list[Check]:
    """A drill's LDAP Secrets exist and have their keys; its scratch pod does not exist yet."""
    if spec.drill is None:
        return []
    core, namespace, ldap = where.core, where.namespace, spec.drill.ldap
    checks: list[Check] = [
        (
            "spec.drill.ldap.passwordSecretRef",
            ldap.password.name,
            True,
            lambda: references.read_secret_key(core, namespace, ldap.password),
        )
    ]
    if (ca := ldap.ca) is not None:
        checks.append(
            (
                "spec.drill.ldap.caSecretRef",
                ca.name,
                True,
                lambda: references.read_secret_key(core, namespace, ca),
            )
        )
    return checks


# -- the source: a stored location, an IdmBackup, or a schedule's latest backup ----------------------------


def _source(spec: RestoreSpec, where: ReferenceScope, backups: Backups) -> _Source:
    found = _Source()
    source, namespace = spec.source, where.namespace
    if source.storage is not None:
        at = "spec.source.location.storage"
        found.refs = storage_secret_refs(source.storage, at)
        found.checks = storage_checks(source.storage, at, where)
    elif source.backup is not None:
        field = "spec.source.backupRef"
        if object_name_problem(source.backup) is not None:
            return found  # already a problem of the spec; the lookup would read something else
        try:
            obj = backups.get(namespace, source.backup)
        except NotFound:
            found.findings.errors.append(f"{field}: IdmBackup {namespace}/{source.backup} not found")
        except ApiError as err:
            found.findings.errors.append(f"{field}: could not be checked ({err.status} {err.reason})")
        else:
            _backup(spec, obj, field, f"{field}: IdmBackup {source.backup}'s", where, found)
    elif source.schedule is not None:
        field = "spec.source.scheduleRef"
        if object_name_problem(source.schedule) is not None:
            return found
        try:
            latest = backups.latest_succeeded(namespace, source.schedule)
        except NotFound:
            found.findings.errors.append(
                f"{field}: IdmBackupSchedule {namespace}/{source.schedule} not found"
            )
        except ApiError as err:
            found.findings.errors.append(f"{field}: could not be checked ({err.status} {err.reason})")
        else:
            if latest is None:
                found.findings.warnings.append(
                    f"{field}: IdmBackupSchedule {namespace}/{source.schedule} has no Succeeded backup yet: "
                    "the restore fails (SourceNotFound) unless one has Succeeded when it starts"
                )
            else:
                name = latest["metadata"]["name"]
                at = f"{field}: its latest Succeeded IdmBackup {name}'s"
                _backup(spec, latest, field, at, where, found)
    return found


def _backup(
    spec: RestoreSpec, obj: Mapping[str, Any], field: str, at: str, where: ReferenceScope, found: _Source
) -> None:
    """A referenced IdmBackup: finished well, matching the restore; and the storage it is read from."""
    meta, status = obj["metadata"], obj.get("status") or {}
    name = f"{where.namespace}/{meta['name']}"
    found.backup = name
    errors, warnings = found.findings.errors, found.findings.warnings
    phase = status.get("phase")
    if meta.get("deletionTimestamp"):
        errors.append(f"{field}: IdmBackup {name} is being deleted")
    elif phase == Phase.FAILED:
        errors.append(f"{field}: IdmBackup {name} Failed: only a Succeeded backup can be restored")
    elif phase != Phase.SUCCEEDED:
        warnings.append(
            f"{field}: IdmBackup {name} is {phase or 'not started'}, not Succeeded: the restore fails "
            "(SourceNotSucceeded) unless the backup has Succeeded when the restore starts"
        )
    try:
        backup_spec: BackupSpec | None = parse_backup_spec(obj["spec"])
    except (KeyError, ValueError):
        backup_spec = None  # the backup itself failed on it; nothing of it is read
    if phase == Phase.SUCCEEDED and (backup_spec is None or not _located(obj)):
        errors.append(f"{field}: IdmBackup {name} has no stored archive in its status")
    header, archive = status.get("header") or {}, status.get("archive") or {}
    if spec.options.type is RestoreType.FULL and header.get("type") and header["type"].upper() != "FULL":
        errors.append(f"spec.type: a Full restore needs a FULL backup; IdmBackup {name} is {header['type']}")
    if header.get("host") and spec.confirm is not None and header["host"] != spec.confirm:
        errors.append(
            f"spec.confirm: IdmBackup {name} is a backup of {header['host']}, and ipa-restore restores only "
            f"a server's own backup: confirm (the target's FQDN) must be {header['host']!r}"
        )
    encrypted = archive.get("encrypted")
    if encrypted is None and backup_spec is not None:
        encrypted = backup_spec.encryption.enabled
    if encrypted and spec.secret_key is None:
        errors.append(
            f"spec.decryption: IdmBackup {name} is encrypted: set decryption.secretKeySecretRef to a Secret "
            "holding the private key of one of its recipients"
        )
    found.recipients = {str(r).upper() for r in archive.get("recipients") or ()}
    if backup_spec is not None:
        # The restore opens the backup's storage with the backup's Secrets, on the requester's behalf.
        found.refs = storage_secret_refs(backup_spec.storage, f"{at} spec.storage")
        found.checks = storage_checks(backup_spec.storage, f"{at} spec.storage", where)


def _located(obj: Mapping[str, Any]) -> bool:
    """Whether the restore will find where the backup stored its archive, as it looks for it."""
    try:
        return stored.locate(obj) is not None
    except (KeyError, ValueError):  # an unsafe directory name in its status, among others
        return False


# -- the decryption key --------------------------------------------------------------------------------------


def _decryption_refs(spec: RestoreSpec) -> list[tuple[str, str]]:
    refs = []
    if spec.secret_key is not None:
        refs.append(("spec.decryption.secretKeySecretRef", spec.secret_key.name))
    if spec.passphrase is not None:
        refs.append(("spec.decryption.passphraseSecretRef", spec.passphrase.name))
    return refs


def _decryption_checks(spec: RestoreSpec, where: ReferenceScope, source: _Source) -> list[Check]:
    checks: list[Check] = []
    if (key := spec.secret_key) is not None:
        checks.append(
            (
                "spec.decryption.secretKeySecretRef",
                key.name,
                True,
                lambda: _check_private_key(where, key, source.recipients, source.backup),
            )
        )
    if (phrase := spec.passphrase) is not None:
        checks.append(
            (
                "spec.decryption.passphraseSecretRef",
                phrase.name,
                True,
                lambda: _check_text(where, phrase),
            )
        )
    return checks


def _check_private_key(
    where: ReferenceScope, ref: SecretKeyRef, recipients: set[str], backup: str | None
) -> None:
    """Raises ResolveError unless the key holds an OpenPGP private key (of a recipient, if known)."""
    material = references.read_secret_key(where.core, where.namespace, ref)
    fingerprints, has_secret = key_fingerprints(material)
    what = f"Secret {where.namespace}/{ref.name} key {ref.key!r}"
    if not fingerprints:
        raise references.ResolveError(
            f"{what} holds no OpenPGP key: it must hold the ASCII-armored private key ({EXPORT_HINT})"
        )
    if not has_secret:
        raise references.ResolveError(
            f"{what} holds only a public key: decrypting the archive needs the private key ({EXPORT_HINT})"
        )
    if recipients and not ({f.upper() for f in fingerprints} & recipients):
        raise references.ResolveError(
            f"{what} holds none of the keys IdmBackup {backup} is encrypted to "
            f"(recipients: {', '.join(sorted(recipients))}): it cannot decrypt the archive"
        )


def _check_text(where: ReferenceScope, ref: SecretKeyRef) -> None:
    value = references.read_secret_key(where.core, where.namespace, ref)
    try:
        value.decode()
    except UnicodeDecodeError:
        # Python's own message would quote the offending byte: a piece of the passphrase.
        raise references.ResolveError(
            f"Secret {where.namespace}/{ref.name} key {ref.key!r} is not UTF-8 text"
        ) from None
