"""The README's first command: a backup of a (stand-in) FreeIPA server, encrypted, in S3, in a minute.

With --restore, the backup is then proven restorable: a restore drill (IdmRestore mode Drill) decrypts it,
restores it into a throwaway stand-in server with a directory of its own, counts the entries over LDAP,
and deletes the throwaway server; its status is printed too. The demo server is never touched.

Brings up the platform, installs the CRDs, starts a stand-in FreeIPA hidden replica and the operator,
applies an IdmBackup, waits for it and prints its status and where the archive is. The restore key is
left in .testbed/demo/gnupg, so the archive can be decrypted by hand afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, utils

from testbed import freeipa_pod, processes, stack
from testbed.deploy import OperatorProcess, install_crds
from testbed.gpgkeys import Keyring
from testbed.ldap_server import DirectoryServer

NAMESPACE = "idm-demo"
DRILLS_ENV = "IDM_BACKUP_ENABLE_DRILLS"
GROUP, VERSION, PLURAL = "idm-backup.io", "v1alpha1", "idmbackups"


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def _apply(api: client.ApiClient, *objects: dict[str, Any]) -> None:
    for obj in objects:
        try:
            utils.create_from_dict(api, obj, namespace=NAMESPACE)
        except utils.FailToCreateError as err:
            if any(e.status != 409 for e in err.api_exceptions):
                raise


def main(argv: list[str] | None = None) -> int:
    restore = "--restore" in (sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    say("starting the platform (first run builds Kubernetes from source: ~10 minutes)")
    plat = stack.up()
    api = config.new_client_from_config(config_file=plat.kubeconfig)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    install_crds(api)
    demo_dir = stack.state_dir() / "demo"
    gnupg = demo_dir / "gnupg"
    gnupg.mkdir(parents=True, exist_ok=True, mode=0o700)
    ring = Keyring(gnupg)
    listing = ring.gpg("--with-colons", "--list-keys").decode()
    fingerprint = next((r.split(":")[9] for r in listing.splitlines() if r.startswith("fpr:")), None)
    key = ring.export(fingerprint or ring.make("IdM Restore (demo) <restore@example.test>"))

    try:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    except client.ApiException as err:
        if err.status != 409:
            raise
    processes.wait_until(
        "default service account", lambda: core.read_namespaced_service_account("default", NAMESPACE), 30
    )
    _apply(
        api,
        freeipa_pod.dm_password_secret(plat.ldap_password),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-credentials"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": plat.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": plat.s3_secret_key,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "backup-public-key"},
            "data": {"restore.asc": base64.b64encode(key.armored).decode()},
        },
        freeipa_pod.data_claim("ipa-hidden-data"),
        freeipa_pod.freeipa_pod("ipa-hidden", "ipa-hidden.example.test", plat.ldap_uri),
    )
    say("waiting for the stand-in FreeIPA hidden replica ipa-hidden.example.test")

    def pod_ready() -> bool:
        pod = core.read_namespaced_pod("ipa-hidden", NAMESPACE)
        return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

    processes.wait_until("pod ipa-hidden ready", pod_ready, 60)

    if restore:
        os.environ[DRILLS_ENV] = "true"  # the operator below inherits it: drills are off by default
    operator = OperatorProcess(NAMESPACE, plat.kubeconfig, demo_dir / "pvc", demo_dir / "operator.log")
    (demo_dir / "pvc").mkdir(exist_ok=True)
    operator.start()
    say(f"operator running (log: {operator.log})")
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    backup = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IdmBackup",
        "metadata": {"name": name},
        "spec": {
            "type": "Full",
            "target": {
                "podName": "ipa-hidden",
                "ldap": {"url": plat.ldap_uri, "passwordSecretRef": {"name": freeipa_pod.DM_PASSWORD_SECRET}},
            },
            "encryption": {"publicKeysSecretRef": {"name": "backup-public-key"}},
            "storage": {
                "s3": {
                    "bucket": plat.s3_bucket,
                    "prefix": "demo",
                    "endpoint": plat.s3_endpoint,
                    "forcePathStyle": True,
                    "credentialsSecretRef": {"name": "s3-credentials"},
                }
            },
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, backup)
    say(f"applied IdmBackup {NAMESPACE}/{name}; waiting for it")
    try:

        def finished() -> dict[str, Any] | None:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
            return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

        processes.wait_until(f"IdmBackup {name}", lambda: finished() is not None, 300, operator.log)
        obj = finished()
        assert obj is not None
        drill = _drill(api, demo_dir, name, key.secret, operator.log) if restore else None
    finally:
        operator.stop()
    status = obj["status"]
    print(json.dumps(status, indent=2))
    kubectl = stack.binaries()["kubectl"]
    print(
        subprocess.run(
            [str(kubectl), f"--kubeconfig={plat.kubeconfig}", "-n", NAMESPACE, "get", "idmbackups"],
            capture_output=True,
            text=True,
        ).stdout
    )
    if status["phase"] != "Succeeded":
        say(f"backup FAILED: {status.get('message')}")
        return 1
    archive = status["archive"]
    say(f"archive: {archive['uri']} ({archive['size']}, encrypted to {', '.join(archive['recipients'])})")
    say(f"decrypt with: gpg --homedir {gnupg} --decrypt <file>  (the private key never left this directory)")
    if drill is not None:
        print(json.dumps(drill, indent=2))
        if drill.get("phase") != "Succeeded":
            say(f"restore drill FAILED: {drill.get('message')}")
            return 1
        say(
            f"the backup restores: {drill['drill']['entries']} entries back in "
            f"{drill['drill']['restoreSeconds']} s, in a throwaway server that is gone again"
        )
    say(f"done in {time.monotonic() - started:.0f}s; the platform keeps running (python -m testbed down)")
    say(f"look around: export KUBECONFIG={plat.kubeconfig}; kubectl is {kubectl}")
    return 0


def _drill(
    api: client.ApiClient, demo_dir: Path, backup: str, secret_key: bytes, log: Path
) -> dict[str, Any]:
    """Restore the backup into a throwaway stand-in with a 389-ds of its own; the drill's status."""
    custom = client.CustomObjectsApi(api)
    data = demo_dir / "drill-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    directory = DirectoryServer(demo_dir / "drill-ds", port=processes.free_port())
    directory.start()
    directory.load_topology()
    try:
        _apply(
            api,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "drill-dm-password"},
                "stringData": {"password": directory.password},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "restore-private-key"},
                "data": {"private.asc": base64.b64encode(secret_key).decode()},
            },
        )
        core = client.CoreV1Api(api)
        core.patch_namespaced_secret(
            "drill-dm-password", NAMESPACE, {"stringData": {"password": directory.password}}
        )
        pod = freeipa_pod.freeipa_pod(
            "scratch", "ipa-hidden.example.test", directory.uri, data_host_path=str(data)
        )
        for env in pod["spec"]["containers"][0]["env"]:
            if "valueFrom" in env:
                env["valueFrom"]["secretKeyRef"]["name"] = "drill-dm-password"
        name = f"{backup}-drill"
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            "idmrestores",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "IdmRestore",
                "metadata": {"name": name},
                "spec": {
                    "mode": "Drill",
                    "source": {"backupRef": {"name": backup}},
                    "decryption": {"secretKeySecretRef": {"name": "restore-private-key"}},
                    "drill": {
                        "podTemplate": {"spec": pod["spec"]},
                        "ldap": {"url": directory.uri, "passwordSecretRef": {"name": "drill-dm-password"}},
                    },
                },
            },
        )
        say(f"applied IdmRestore {NAMESPACE}/{name} (a drill of {backup}); waiting for it")

        def finished() -> dict[str, Any] | None:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "idmrestores", name)
            return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

        processes.wait_until(f"IdmRestore {name}", lambda: finished() is not None, 300, log)
        obj = finished()
        assert obj is not None
        status: dict[str, Any] = obj["status"]
        return status
    finally:
        directory.stop()


if __name__ == "__main__":
    sys.exit(main())
