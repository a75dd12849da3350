"""Helpers for tests on the platform: waiting, applying objects, IdmBackups and what they stored."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils
from kubernetes.stream import stream

from idm_backup_operator.archive.encryption import decrypt
from testbed import freeipa_pod, stack
from testbed.deploy import REPO, OperatorProcess
from testbed.gpgkeys import ExportedKey

GROUP, VERSION, PLURAL = "idm-backup.io", "v1alpha1", "idmbackups"
CHART = REPO / "charts" / "idm-backup-operator"
# helm's built-in default for `template` is Kubernetes v1.20 (helm built from source carries no version
# ldflags); the chart requires >=1.30, so rendering names the platform's version.
KUBE_VERSION = stack.versions()["K8S_VERSION"]
S3_SECRET, KEY_SECRET = "s3-credentials", "backup-public-key"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll until check() returns something truthy; fail the test with `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def apply(api: client.ApiClient, namespace: str, *objects: dict[str, Any]) -> None:
    for obj in objects:
        utils.create_from_dict(api, obj, namespace=namespace)


def s3_storage(platform: stack.Platform, prefix: str) -> dict[str, Any]:
    return {
        "s3": {
            "bucket": platform.s3_bucket,
            "prefix": prefix,
            "endpoint": platform.s3_endpoint,
            "forcePathStyle": True,
            "credentialsSecretRef": {"name": S3_SECRET},
            "partSizeMiB": 5,
        }
    }


def backup_spec(platform: stack.Platform, storage: dict[str, Any], **spec: Any) -> dict[str, Any]:
    target = {
        "podName": "ipa-hidden",
        "ldap": {"url": platform.ldap_uri, "passwordSecretRef": {"name": freeipa_pod.DM_PASSWORD_SECRET}},
        **spec.pop("target", {}),
    }
    return {
        "target": target,
        "encryption": {"publicKeysSecretRef": {"name": KEY_SECRET}},
        "storage": storage,
        **spec,
    }


SCHEDULES = "idmbackupschedules"


def create_schedule(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IdmBackupSchedule",
        "metadata": {"name": name},
        "spec": spec,
    }
    created: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, body
    )
    return created


def get_schedule(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, name
    )
    return obj


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The object's condition of that type; {} when it has none."""
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def create_backup(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IdmBackup", "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get_backup(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return obj


def wait_deleted(api: client.ApiClient, namespace: str, *names: str, timeout: float = 60) -> None:
    """Until the IdmBackups are gone, finalizers and all."""

    def gone(name: str) -> bool:
        try:
            get_backup(api, namespace, name)
        except client.ApiException as err:
            return bool(err.status == 404)
        return False

    wait_for(f"{', '.join(names)} to be deleted", lambda: all(gone(n) for n in names), timeout=timeout)


Backup = Callable[..., dict[str, Any]]  # run_backup(name, spec, timeout=180) -> the finished IdmBackup


def wait_finished(
    api: client.ApiClient, namespace: str, name: str, operator: OperatorProcess, timeout: float = 180
) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        obj = get_backup(api, namespace, name)
        return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (obj := finished()) is not None:
            return obj
        time.sleep(0.5)
    status = get_backup(api, namespace, name).get("status")
    pytest.fail(f"{name} did not finish: {status}\n{operator.output()[-3000:]}")


def pod_exec(api: client.ApiClient, namespace: str, pod: str, argv: list[str]) -> tuple[int, str]:
    ws = stream(
        client.CoreV1Api(api).connect_get_namespaced_pod_exec,
        pod,
        namespace,
        command=argv,
        stdout=True,
        stderr=True,
        stdin=False,
        tty=False,
        _preload_content=False,
    )
    ws.run_forever(timeout=120)
    return ws.returncode, ws.read_stdout() + ws.read_stderr()


def backup_dirs(api: client.ApiClient, namespace: str, pod: str) -> list[str]:
    """What is in the pod's /var/lib/ipa/backup, hidden names too."""
    code, out = pod_exec(api, namespace, pod, ["ls", "-A", "/var/lib/ipa/backup"])
    assert code == 0, out
    return out.split()


def set_fault(api: client.ApiClient, namespace: str, pod: str, fault: str) -> None:
    """The stand-in's fault file wins over IPA_STANDIN_FAULT; empty means no fault."""
    code, out = pod_exec(api, namespace, pod, ["sh", "-c", f"printf %s '{fault}' > /data/ipa-standin-fault"])
    assert code == 0, out


def leases(api: client.ApiClient, namespace: str) -> list[Any]:
    """The locks of this namespace's servers, wherever the operator keeps them (its own namespace)."""
    selector = f"idm-backup.io/target-namespace={namespace}"
    return list(client.CoordinationV1Api(api).list_lease_for_all_namespaces(label_selector=selector).items)


def pod_ready(api: client.ApiClient, namespace: str, pod: str) -> bool:
    status = client.CoreV1Api(api).read_namespaced_pod(pod, namespace).status
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def services_running(api: client.ApiClient, namespace: str, pod: str) -> bool:
    code, _ = pod_exec(api, namespace, pod, ["ipactl", "status"])
    return code == 0


def decrypted_sha256(chunks: Iterator[bytes], key: ExportedKey) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with decrypt(chunks, key.secret) as plaintext:
        for chunk in plaintext:
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def s3_chunks(s3: Any, bucket: str, key: str) -> Iterator[bytes]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    yield from body.iter_chunks(1 << 20)


def s3_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def events(api: client.ApiClient, namespace: str, name: str) -> list[str]:
    items = (
        client.CoreV1Api(api)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    # Timestamps have one-second resolution; the resourceVersion orders events as they were created.
    return [e.reason for e in sorted(items, key=lambda e: int(e.metadata.resource_version))]


def event_messages(api: client.ApiClient, namespace: str, name: str, reason: str) -> list[str]:
    """The messages of `name`'s Events with this reason, in the order they were created."""
    items = (
        client.CoreV1Api(api)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name},reason={reason}")
        .items
    )
    return [e.message for e in sorted(items, key=lambda e: int(e.metadata.resource_version))]


# -- the Helm chart (helm itself is the `helm` fixture) ---------------------------------------------------


def _docs(rendered: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered) if d]


def render(helm: Callable[..., str], *args: str, namespace: str = "ops") -> list[dict[str, Any]]:
    out = helm("template", "rel", str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION, *args)
    # helm reports the crds/ symlink on stderr (merged here): keep only the YAML documents.
    return _docs("\n".join(line for line in out.splitlines() if not line.startswith("walk.go:")))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def token_client(platform: stack.Platform, token: str) -> client.ApiClient:
    """An API client that authenticates with a bearer token (a ServiceAccount's), not as the admin."""
    cfg = client.Configuration()
    cfg.host = platform.api_server
    cfg.ssl_ca_cert = str(Path(platform.state_dir) / "pki" / "ca.crt")
    cfg.verify_ssl = True
    # kubernetes 36 looks the prefix up under "BearerToken" only: with the pre-36 "authorization" key the
    # header goes out without "Bearer " and the API server treats the request as system:anonymous.
    cfg.api_key = {"BearerToken": token}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(cfg)


def token_kubeconfig(
    platform: stack.Platform, user: str, token: str, path: Path, namespace: str | None = None
) -> Path:
    """A kubeconfig at `path` that authenticates as `user` with `token`, for an operator process."""
    context: dict[str, str] = {"cluster": "testbed", "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "operator",
                "clusters": [
                    {
                        "name": "testbed",
                        "cluster": {
                            "server": platform.api_server,
                            "certificate-authority": str(Path(platform.state_dir) / "pki" / "ca.crt"),
                        },
                    }
                ],
                # kubernetes 36 sends a kubeconfig token correctly only from users[].user.token.
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [{"name": "operator", "context": context}],
            }
        )
    )
    path.chmod(0o600)
    return path


def mount_tmpfs(path: Path, size: str) -> None:
    """A real, small file system at `path` (root only): a volume or a disk that really fills up."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], check=False).returncode != 0:
        # Busy (a file still open, an operator that has not let go yet): detached anyway, so that nothing
        # outlives the test in the machine's mount table.
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def create_test_namespace(api: client.ApiClient, name: str) -> None:
    """A namespace labelled as the tests', once pods may be created in it."""
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": {"idm-backup.io/test": "true"}}})
    # The controller-manager creates the namespace's default ServiceAccount asynchronously; pods are
    # refused until it exists.
    wait_for(
        f"namespace {name}'s default ServiceAccount",
        lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items),
        timeout=30,
    )
