"""Stand-in FreeIPA pods shaped like freeipa/freeipa-container's on Kubernetes.

The pod runs the TEST STAND-IN image (testbed/images/freeipa-standin), not FreeIPA: its `ipa-backup` and
`ipactl` reproduce the real tools' behaviour against the platform's 389 Directory Server.
"""

from __future__ import annotations

from typing import Any

IMAGE = "localhost/freeipa-standin:test"
REALM = "EXAMPLE.TEST"
DM_PASSWORD_SECRET = "freeipa-dm-password"


def dm_password_secret(password: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": DM_PASSWORD_SECRET},
        "stringData": {"password": password},
    }


def data_claim(name: str, size: str = "10Gi") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


def freeipa_pod(
    name: str,
    host: str,
    ldap_uri: str,
    *,
    claim: str | None = None,
    fault: str | None = None,
    payload_bytes: int | None = None,
    labels: dict[str, str] | None = None,
    data_host_path: str | None = None,
) -> dict[str, Any]:
    """A pod for FreeIPA server `host` with its state on the claim at /data, as in freeipa-container.

    `fault` and `payload_bytes` are the stand-in's failure injection and archive padding (see its README).
    `data_host_path`: /data is that host directory (hostPath, which must exist) instead of the claim, and
    the stand-in learns it from IPA_STANDIN_DS_DATA_DIR: its ipa-restore has the platform's 389-ds, which
    runs on the host, import LDIF files from the pod's /data by their host path.
    """
    short = host.split(".", 1)[0]
    env: list[dict[str, Any]] = [
        {"name": "IPA_SERVER_HOSTNAME", "value": host},
        {"name": "IPA_REALM", "value": REALM},
        {"name": "IPA_STANDIN_LDAP_URI", "value": ldap_uri},
        {
            "name": "IPA_STANDIN_DM_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": DM_PASSWORD_SECRET, "key": "password"}},
        },
    ]
    if fault:
        env.append({"name": "IPA_STANDIN_FAULT", "value": fault})
    if payload_bytes:
        env.append({"name": "IPA_STANDIN_PAYLOAD_BYTES", "value": str(payload_bytes)})
    volume: dict[str, Any] = {"name": "data"}
    if data_host_path:
        env.append({"name": "IPA_STANDIN_DS_DATA_DIR", "value": data_host_path})
        volume["hostPath"] = {"path": data_host_path, "type": "Directory"}
    else:
        volume["persistentVolumeClaim"] = {"claimName": claim or f"{name}-data"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "freeipa", "freeipa/host": short, **(labels or {})},
        },
        "spec": {
            "hostname": short,
            "subdomain": "freeipa",
            "setHostnameAsFQDN": True,
            "containers": [
                {
                    "name": "freeipa-server",
                    "image": IMAGE,
                    "command": ["/usr/sbin/ipa-standin-init"],
                    "env": env,
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    "readinessProbe": {
                        "exec": {"command": ["/usr/sbin/ipactl", "status"]},
                        "periodSeconds": 2,
                        "timeoutSeconds": 5,
                    },
                    "securityContext": {"readOnlyRootFilesystem": True},
                }
            ],
            "volumes": [volume],
        },
    }
