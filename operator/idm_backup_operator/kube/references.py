"""What the operator reads from Kubernetes for a backup: Secrets and the FreeIPA server's pod.

Every failure is a ResolveError whose message tells the user which object to fix.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client

from idm_backup_operator import logs
from idm_backup_operator.api.spec import (
    Encryption,
    LabelSelector,
    LdapTarget,
    PvcStorage,
    S3Storage,
    SecretKeyRef,
    Target,
)
from idm_backup_operator.archive.encryption import Recipients, load_recipients
from idm_backup_operator.freeipa.topology import LdapConnectionSettings, foreign_ldap_host
from idm_backup_operator.kube.podexec import PodRef
from idm_backup_operator.storage import PVCStore, S3Config, S3Store, StorageError, Store, claim_mount

# freeipa-container takes the server's host name from this variable.
HOSTNAME_ENV = "IPA_SERVER_HOSTNAME"
# One call's bound: a connection that hangs must not hold a backup or an admission review for ever.
CALL_TIMEOUT = 15


class ResolveError(Exception):
    """A referenced object is missing or unusable; the message names it."""


class PodNotReady(ResolveError):
    """The target pod exists but is not ready: often for seconds only, after its services restarted."""


def _api_reason(err: client.ApiException) -> str:
    return "not found" if err.status == 404 else f"cannot be read ({err.status} {err.reason})"


def read_secret(core: client.CoreV1Api, namespace: str, name: str) -> Mapping[str, bytes]:
    if not name:
        # The client would GET .../secrets/, the list of them, and read it as a Secret without keys.
        raise ResolveError(f"the Secret name is empty: name a Secret in namespace {namespace}")
    try:
        secret = core.read_namespaced_secret(name, namespace, _request_timeout=CALL_TIMEOUT)
    except client.ApiException as err:
        raise ResolveError(f"Secret {namespace}/{name} {_api_reason(err)}") from None
    return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}


def read_secret_key(core: client.CoreV1Api, namespace: str, ref: SecretKeyRef) -> bytes:
    data = read_secret(core, namespace, ref.name)
    if ref.key not in data:
        # The keys it has are not listed: whoever reads the status may not be allowed to read the Secret.
        raise ResolveError(f"Secret {namespace}/{ref.name} has no key {ref.key!r}")
    return data[ref.key]


def read_secret_text(core: client.CoreV1Api, namespace: str, ref: SecretKeyRef) -> str:
    """A Secret's value as text, redacted from the logs from now on."""
    raw = read_secret_key(core, namespace, ref)
    logs.register_secret(raw)
    return _text(raw, namespace, ref.name, ref.key).strip()


def _text(value: bytes, namespace: str, secret: str, key: str) -> str:
    """A Secret's value as text. Python's own error would quote the offending byte and its position: a
    piece of the secret, in a status message that people who may not read the Secret can read."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ResolveError(f"Secret {namespace}/{secret} key {key!r} is not UTF-8 text") from None


def _selector_string(selector: LabelSelector) -> str:
    parts = [f"{k}={v}" for k, v in sorted(selector.match_labels.items())]
    for expr in selector.match_expressions:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or ())
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[op]
        )
    return ",".join(parts)


def _host_of(pod: Any) -> str | None:
    """The FQDN a FreeIPA pod serves: its IPA_SERVER_HOSTNAME, or freeipa-container's --hostname."""
    for container in pod.spec.containers:
        for env in container.env or ():
            if env.name == HOSTNAME_ENV and env.value:
                return str(env.value)
        args = [*(container.command or ()), *(container.args or ())]
        for arg, following in itertools.pairwise([*args, ""]):
            if arg.startswith("--hostname="):
                return str(arg.split("=", 1)[1])
            if arg == "--hostname" and following:
                return str(following)
    return None


def _serves_host(pod: Any, host: str) -> bool:
    return (_host_of(pod) or "").lower() == host.lower()


def pods_by_host(core: client.CoreV1Api, namespace: str, selector: LabelSelector) -> dict[str, PodRef]:
    """The ready pods the selector matches, by the FQDN (lower case) each serves."""
    pods = core.list_namespaced_pod(
        namespace, label_selector=_selector_string(selector), _request_timeout=CALL_TIMEOUT
    ).items
    return {
        host.lower(): PodRef(namespace, pod.metadata.name, pod.spec.containers[0].name)
        for pod in pods
        if (host := _host_of(pod)) and _is_ready(pod) and pod.metadata.deletion_timestamp is None
    }


def _is_ready(pod: Any) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ()
    )


def _candidates(core: client.CoreV1Api, namespace: str, target: Target) -> list[Any]:
    """The pods the target matches, ready or not: by name, by its selector, or by the host they serve."""
    if target.pod_name:
        return [core.read_namespaced_pod(target.pod_name, namespace, _request_timeout=CALL_TIMEOUT)]
    if target.pod_selector is not None:
        selector = _selector_string(target.pod_selector)
        return list(
            core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=CALL_TIMEOUT).items
        )
    assert target.host is not None
    listed = core.list_namespaced_pod(namespace, _request_timeout=CALL_TIMEOUT).items
    return [p for p in listed if _serves_host(p, target.host)]


def matching_pod_names(core: client.CoreV1Api, namespace: str, target: Target) -> set[str]:
    """Names of the pods the target could designate now; none when its pod does not exist."""
    try:
        return {pod.metadata.name for pod in _candidates(core, namespace, target)}
    except client.ApiException as err:
        if err.status == 404:
            return set()
        raise


def find_target_pod(core: client.CoreV1Api, namespace: str, target: Target) -> PodRef:
    """The one pod the target designates; it must exist, run and be ready."""
    try:
        pods = _candidates(core, namespace, target)
    except client.ApiException as err:
        if not target.pod_name:
            raise
        raise ResolveError(f"target pod {namespace}/{target.pod_name} {_api_reason(err)}") from None
    if len(pods) != 1:
        # Only a selector or a host can match other than one pod: a pod read by name is there.
        matched = ", ".join(p.metadata.name for p in pods) or "none"
        if target.pod_selector is not None:
            selector = _selector_string(target.pod_selector)
            raise ResolveError(
                f"podSelector {selector!r} must match exactly one pod in {namespace}, matched: {matched}"
            )
        raise ResolveError(
            f"host {target.host} must be served by exactly one pod in {namespace} "
            f"(container env {HOSTNAME_ENV}), found: {matched}"
        )
    pod = pods[0]
    if pod.metadata.deletion_timestamp is not None:
        raise ResolveError(f"target pod {namespace}/{pod.metadata.name} is being deleted")
    if not _is_ready(pod):
        raise PodNotReady(
            f"target pod {namespace}/{pod.metadata.name} is not ready (phase {pod.status.phase})"
        )
    names = [c.name for c in pod.spec.containers]
    container = target.container or names[0]
    if container not in names:
        raise ResolveError(
            f"pod {namespace}/{pod.metadata.name} has no container {container!r} (it has: {', '.join(names)})"
        )
    return PodRef(namespace=namespace, name=pod.metadata.name, container=container)


def pod_exists(core: client.CoreV1Api, pod: PodRef) -> bool:
    """Whether the pod can still be read; any API error counts as gone, as a recovery must not wait on it."""
    try:
        core.read_namespaced_pod(pod.name, pod.namespace, _request_timeout=CALL_TIMEOUT)
    except client.ApiException:
        return False
    return True


def _write_ca(core: client.CoreV1Api, namespace: str, ref: SecretKeyRef, scratch: Path, name: str) -> str:
    path = scratch / name
    path.write_bytes(read_secret_key(core, namespace, ref))
    return str(path)


# Which namespaces may use which mounted claim: a JSON object of claim name to a list of namespace names,
# rendered by the chart from storage.pvcMounts. A claim it does not name may be used from any namespace;
# unset, every claim may. Every claim is mounted into the one operator, so without it any namespace's
# backups could write to, and read and delete in, a volume that belongs to another team.
PVC_NAMESPACES_ENV = "IDM_BACKUP_PVC_NAMESPACES"


def claim_namespaces() -> dict[str, tuple[str, ...]]:
    """The claims restricted to some namespaces (PVC_NAMESPACES_ENV). Raises ResolveError when the
    variable is not what the chart renders: a restriction that cannot be read must not fall open."""
    raw = os.environ.get(PVC_NAMESPACES_ENV, "").strip()
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError as err:
        raise ResolveError(f"{PVC_NAMESPACES_ENV} is not JSON ({err}): no PVC may be used") from None
    if not isinstance(parsed, dict) or not all(
        isinstance(namespaces, list) and all(isinstance(n, str) for n in namespaces)
        for namespaces in parsed.values()
    ):
        raise ResolveError(
            f"{PVC_NAMESPACES_ENV} is not an object of claim names to lists of namespaces: no PVC may be used"
        )
    return {str(claim): tuple(namespaces) for claim, namespaces in parsed.items()}


def check_claim_namespace(claim_name: str, namespace: str) -> None:
    """Raises ResolveError if the operator's administrator did not let `namespace` use the claim.

    The one place this is decided: the webhook (through pvc_mount) refuses such an object, and a backup
    or restore whose object was admitted without the webhook fails on it before it touches the server or
    the volume.
    """
    allowed = claim_namespaces().get(claim_name)
    if allowed is not None and namespace not in allowed:
        raise ResolveError(
            f"PVC {claim_name} may be used only from namespace{'s' if len(allowed) != 1 else ''} "
            f"{', '.join(allowed) or '(none)'}, not from {namespace} (the Helm chart's storage.pvcMounts)"
        )


def pvc_mount(storage: PvcStorage, pvc_root: Path, namespace: str) -> Path:
    """Where the operator sees the claim, for an object in `namespace`: PVCs reach it as volumes of its
    own pod, never by themselves, and only namespaces the chart's mapping allows may use one."""
    check_claim_namespace(storage.claim_name, namespace)
    try:
        mount = claim_mount(pvc_root, storage.claim_name)
    except StorageError as err:
        raise ResolveError(str(err)) from None
    if not mount.is_dir():
        raise ResolveError(
            f"PVC {storage.claim_name} is not mounted in the operator at {mount}: "
            "add it to the Helm chart's storage.pvcMounts"
        )
    return mount


AMBIENT_REFUSED = (
    "credentialsSecretRef is required: this operator does not lend its own AWS identity (IRSA, EKS Pod "
    "Identity, environment) to backups; its administrator can allow that with the Helm value "
    "s3.ambientCredentials (operator flag --s3-ambient-credentials)"
)


def s3_credentials(
    core: client.CoreV1Api, namespace: str, storage: S3Storage, *, ambient: bool
) -> tuple[str, str] | None:
    """The access key id and secret access key from the spec's Secret; None for the operator's own.

    Lending the operator's identity is opt-in: in a shared cluster it would let anyone who may create an
    IdmBackup write to, and with deletionPolicy Delete remove from, whatever buckets the operator's role
    reaches.
    """
    if storage.credentials_secret is None:
        if not ambient:
            raise ResolveError(AMBIENT_REFUSED)
        return None
    creds = read_secret(core, namespace, storage.credentials_secret)
    missing = [k for k in (storage.access_key_id_key, storage.secret_access_key_key) if k not in creds]
    if missing:
        raise ResolveError(f"Secret {namespace}/{storage.credentials_secret} has no key {', '.join(missing)}")
    logs.register_secret(creds[storage.secret_access_key_key])
    return (
        _text(
            creds[storage.access_key_id_key], namespace, storage.credentials_secret, storage.access_key_id_key
        ),
        _text(
            creds[storage.secret_access_key_key],
            namespace,
            storage.credentials_secret,
            storage.secret_access_key_key,
        ),
    )


def open_store(
    core: client.CoreV1Api,
    namespace: str,
    storage: S3Storage | PvcStorage,
    pvc_root: Path,
    scratch: Path,
    *,
    ambient_credentials: bool,
) -> Store:
    """The store a spec names, with its credentials; PVCs must be mounted in the operator's pod."""
    if isinstance(storage, PvcStorage):
        return PVCStore(pvc_mount(storage, pvc_root, namespace), storage.sub_path)
    access_key_id, secret_access_key = s3_credentials(
        core, namespace, storage, ambient=ambient_credentials
    ) or (None, None)
    verify: bool | str = True
    if storage.ca is not None:
        verify = _write_ca(core, namespace, storage.ca, scratch, "s3-ca.pem")
    try:
        return S3Store(
            S3Config(
                bucket=storage.bucket,
                prefix=storage.prefix,
                endpoint_url=storage.endpoint,
                region=storage.region,
                access_key_id=access_key_id,
                secret_access_key=secret_access_key,
                verify=verify,
                force_path_style=storage.force_path_style,
                server_side_encryption=storage.server_side_encryption,  # type: ignore[arg-type]
                kms_key_id=storage.kms_key_id,
                part_size=storage.part_size_mib * 1024 * 1024,
            )
        )
    except StorageError as err:
        raise ResolveError(str(err)) from None


def load_public_keys(core: client.CoreV1Api, namespace: str, encryption: Encryption) -> Recipients:
    """Raises ResolveError for a missing Secret, KeyMaterialError for unusable keys."""
    assert encryption.public_keys_secret is not None
    data = read_secret(core, namespace, encryption.public_keys_secret)
    wanted = encryption.secret_keys or tuple(sorted(data))
    missing = [k for k in wanted if k not in data]
    if missing or not wanted:
        what = f"no key {', '.join(missing)}" if missing else "no keys at all"
        raise ResolveError(f"Secret {namespace}/{encryption.public_keys_secret} has {what}")
    return load_recipients(*(data[k] for k in wanted), wanted=encryption.recipients)


def ldap_settings(
    core: client.CoreV1Api,
    pod: PodRef,
    server_host: str,
    ldap: LdapTarget,
    scratch: Path,
    *,
    scratch_server: bool = False,
) -> LdapConnectionSettings:
    """How to bind to the directory of the server `pod` runs (`server_host`, from its default.conf).
    A URL that leads elsewhere is refused before the password Secret is even read; for a drill's
    `scratch_server`, which shares production's FQDN, only the pod's own addresses count."""
    namespace = pod.namespace
    try:
        status = core.read_namespaced_pod(pod.name, namespace, _request_timeout=CALL_TIMEOUT).status
    except client.ApiException as err:
        raise ResolveError(f"pod {namespace}/{pod.name} {_api_reason(err)}") from None
    addresses = {ip.ip for ip in status.pod_ips or ()} | ({status.pod_ip} if status.pod_ip else set())
    if (
        foreign := foreign_ldap_host(ldap.url, server_host, addresses, by_name=not scratch_server)
    ) is not None:
        raise ResolveError(
            f"ldap.url {ldap.url!r} is not the directory of the server backed up or restored: {foreign}. "
            "The operator binds only to the target's own directory"
        )
    raw = read_secret_key(core, namespace, ldap.password)
    logs.register_secret(raw)
    password = _text(raw, namespace, ldap.password.name, ldap.password.key)
    ca_file = None if ldap.ca is None else _write_ca(core, namespace, ldap.ca, scratch, "ldap-ca.pem")
    return LdapConnectionSettings(
        uri=ldap.url, bind_dn=ldap.bind_dn, password=password, ca_file=ca_file, starttls=ldap.start_tls
    )
