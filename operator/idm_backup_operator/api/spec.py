"""Typed views of IdmBackup and IdmRestore resources, parsed from the bodies kopf hands over.

The CRD schema (crds/) is the contract and has already applied its defaults and rules; these classes
only give the handlers names and types instead of nested dictionaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idm_backup_operator.freeipa import BackupOptions, BackupType
from idm_backup_operator.freeipa.ipa_restore import RestoreOptions, RestoreType


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class LdapTarget:
    url: str
    bind_dn: str
    password: SecretKeyRef
    ca: SecretKeyRef | None
    start_tls: bool
    base_dn: str | None


@dataclass(frozen=True)
class LabelSelector:
    match_labels: Mapping[str, str]
    match_expressions: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Target:
    pod_name: str | None
    pod_selector: LabelSelector | None
    host: str | None
    container: str | None
    require_hidden_replica: bool
    ldap: LdapTarget

    def describe(self) -> str:
        if self.pod_name:
            return f"pod {self.pod_name}"
        if self.host:
            return f"host {self.host}"
        return "the pod selected by podSelector"


@dataclass(frozen=True)
class Encryption:
    enabled: bool
    public_keys_secret: str | None
    secret_keys: tuple[str, ...]  # keys of the Secret to read; empty: all
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class S3Storage:
    bucket: str
    prefix: str
    endpoint: str | None
    region: str
    force_path_style: bool
    credentials_secret: str | None  # None: the operator's own AWS identity, if its administrator allows it
    access_key_id_key: str
    secret_access_key_key: str
    ca: SecretKeyRef | None
    server_side_encryption: str | None
    kms_key_id: str | None
    part_size_mib: int


@dataclass(frozen=True)
class PvcStorage:
    claim_name: str
    sub_path: str


@dataclass(frozen=True)
class BackupSpec:
    target: Target
    options: BackupOptions
    deadline_seconds: int
    encryption: Encryption
    storage: S3Storage | PvcStorage
    keep_in_pod: bool
    delete_stored_on_deletion: bool
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)


def _ref(data: Mapping[str, Any] | None, default_key: str) -> SecretKeyRef | None:
    if not data:
        return None
    return SecretKeyRef(name=data["name"], key=data.get("key") or default_key)


def parse_ldap(ldap: Mapping[str, Any]) -> LdapTarget:
    return LdapTarget(
        url=ldap["url"],
        bind_dn=ldap.get("bindDN") or "cn=Directory Manager",
        password=SecretKeyRef(
            ldap["passwordSecretRef"]["name"], ldap["passwordSecretRef"].get("key") or "password"
        ),
        ca=_ref(ldap.get("caSecretRef"), "ca.crt"),
        start_tls=ldap.get("startTLS", False),
        base_dn=ldap.get("baseDN"),
    )


def _selector(selector: Mapping[str, Any] | None) -> LabelSelector | None:
    if selector is None:
        return None
    return LabelSelector(
        match_labels=dict(selector.get("matchLabels") or {}),
        match_expressions=tuple(selector.get("matchExpressions") or ()),
    )


def parse_target(data: Mapping[str, Any]) -> Target:
    return Target(
        pod_name=data.get("podName"),
        pod_selector=_selector(data.get("podSelector")),
        host=data.get("host"),
        container=data.get("container"),
        require_hidden_replica=data.get("requireHiddenReplica", True),
        ldap=parse_ldap(data["ldap"]),
    )


def parse_storage(data: Mapping[str, Any]) -> S3Storage | PvcStorage:
    if pvc := data.get("pvc"):
        return PvcStorage(claim_name=pvc["claimName"], sub_path=pvc.get("subPath") or "")
    s3 = data["s3"]
    creds = s3.get("credentialsSecretRef") or {}
    return S3Storage(
        bucket=s3["bucket"],
        prefix=s3.get("prefix") or "",
        endpoint=s3.get("endpoint"),
        region=s3.get("region") or "us-east-1",
        force_path_style=s3.get("forcePathStyle", False),
        credentials_secret=creds.get("name"),
        access_key_id_key=creds.get("accessKeyIDKey") or "AWS_ACCESS_KEY_ID",
        secret_access_key_key=creds.get("secretAccessKeyKey") or "AWS_SECRET_ACCESS_KEY",
        ca=_ref(s3.get("caSecretRef"), "ca.crt"),
        server_side_encryption=s3.get("serverSideEncryption"),
        kms_key_id=s3.get("kmsKeyID"),
        part_size_mib=s3.get("partSizeMiB", 16),
    )


def parse_backup_spec(spec: Mapping[str, Any]) -> BackupSpec:
    """Raises InvalidBackupOptions (a ValueError) for combinations ipa-backup itself refuses."""
    encryption = spec.get("encryption") or {}
    keys_ref = encryption.get("publicKeysSecretRef") or {}
    options = BackupOptions(
        type=BackupType.DATA if spec.get("type") == "Data" else BackupType.FULL,
        online=spec.get("online", False),
        logs=spec.get("logs", False),
        disable_role_check=spec.get("disableRoleCheck", False),
        tmpdir=spec.get("tmpDir"),
    )
    return BackupSpec(
        target=parse_target(spec["target"]),
        options=options,
        deadline_seconds=spec.get("activeDeadlineSeconds", 7200),
        encryption=Encryption(
            enabled=encryption.get("mode", "GPG") != "None",
            public_keys_secret=keys_ref.get("name"),
            secret_keys=tuple(keys_ref.get("keys") or ()),
            recipients=tuple(encryption.get("recipients") or ()),
        ),
        storage=parse_storage(spec["storage"]),
        keep_in_pod=spec.get("podCleanup") == "Keep",
        delete_stored_on_deletion=spec.get("deletionPolicy") == "Delete",
        raw=spec,
    )


@dataclass(frozen=True)
class RestoreSource:
    """Exactly one of: an IdmBackup, the latest Succeeded backup of a schedule, or a stored directory."""

    backup: str | None = None
    schedule: str | None = None
    storage: S3Storage | PvcStorage | None = None
    directory: str | None = None  # key prefix of the backup directory in `storage`, ending in "/"

    def describe(self) -> str:
        if self.backup:
            return f"IdmBackup {self.backup}"
        if self.schedule:
            return f"the latest backup of IdmBackupSchedule {self.schedule}"
        return f"the stored backup directory {self.directory}"


@dataclass(frozen=True)
class DrillSpec:
    """The scratch server a drill restores into instead of production."""

    pod_template: Mapping[str, Any]
    volume_claim_template: Mapping[str, Any] | None
    ldap: LdapTarget
    ready_timeout_seconds: int


@dataclass(frozen=True)
class RestoreSpec:
    source: RestoreSource
    secret_key: SecretKeyRef | None
    passphrase: SecretKeyRef | None
    options: RestoreOptions
    allow_symlinked_config: bool
    allow_version_mismatch: bool
    target: Target | None  # None for a drill
    confirm: str | None  # None for a drill
    deadline_seconds: int
    drill: DrillSpec | None = None
    # replication Reinitialize: the other masters' pods, where the operator re-initializes them itself.
    reinitialize_pods: LabelSelector | None = None


def parse_restore_spec(spec: Mapping[str, Any]) -> RestoreSpec:
    source = spec["source"]
    location = source.get("location") or {}
    decryption = spec.get("decryption") or {}
    replication = spec.get("replication") or {}
    return RestoreSpec(
        source=RestoreSource(
            backup=(source.get("backupRef") or {}).get("name"),
            schedule=(source.get("scheduleRef") or {}).get("name"),
            storage=parse_storage(location["storage"]) if location else None,
            directory=location.get("directory"),
        ),
        secret_key=_ref(decryption.get("secretKeySecretRef"), "private.asc"),
        passphrase=_ref(decryption.get("passphraseSecretRef"), "passphrase"),
        options=RestoreOptions(
            type=RestoreType.FULL if spec.get("type") == "Full" else RestoreType.DATA,
            online=spec.get("online", False),
            backends=tuple(spec.get("backends") or ()),
            tmpdir=spec.get("tmpDir"),
        ),
        allow_symlinked_config=spec.get("allowSymlinkedConfig", False),
        allow_version_mismatch=spec.get("allowVersionMismatch", False),
        target=parse_target(spec["target"]) if spec.get("mode") != "Drill" else None,
        confirm=spec.get("confirm") if spec.get("mode") != "Drill" else None,
        deadline_seconds=spec.get("activeDeadlineSeconds", 7200),
        drill=_drill(spec["drill"]) if spec.get("mode") == "Drill" else None,
        reinitialize_pods=_selector(replication.get("podSelector"))
        if replication.get("mode") == "Reinitialize"
        else None,
    )


def _drill(data: Mapping[str, Any]) -> DrillSpec:
    return DrillSpec(
        pod_template=data["podTemplate"],
        volume_claim_template=data.get("volumeClaimTemplate"),
        ldap=parse_ldap(data["ldap"]),
        ready_timeout_seconds=data.get("readyTimeoutSeconds", 1800),
    )
