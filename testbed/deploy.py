"""Putting the operator onto the platform: its CRDs from crds/, and the operator as a local process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from kubernetes import client

from testbed import processes

REPO = Path(__file__).resolve().parent.parent


def install_crds(api: client.ApiClient) -> None:
    """Apply crds/ (the single source of truth for the API) and wait until the API server serves it."""
    ext = client.ApiextensionsV1Api(api)
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(crd)
        except client.ApiException as err:
            if err.status != 409:
                raise
            crd["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(
                name
            ).metadata.resource_version
            ext.replace_custom_resource_definition(name, crd)

        def established(name: str = name) -> bool:
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        processes.wait_until(f"CRD {name} established", established, timeout=30)
        time.sleep(0.5)  # discovery lags the Established condition a little


class OperatorProcess:
    """The real operator, as a separate process watching one namespace; it can be killed like a pod."""

    def __init__(
        self,
        namespace: str,
        kubeconfig: str,
        pvc_root: Path,
        log: Path,
        *,
        verbose: bool = True,
        args: Sequence[str] = (),
    ) -> None:
        self.namespace, self.kubeconfig, self.pvc_root, self.log = namespace, kubeconfig, pvc_root, log
        self.verbose = verbose
        self.args = tuple(args)  # more `run` options, e.g. the webhook's or peering's
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Metrics off unless a test asks for them: several operators run at once and share 127.0.0.1.
        env = {
            "IDM_BACKUP_METRICS_PORT": "0",
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "IDM_BACKUP_PVC_ROOT": str(self.pvc_root),
        }
        argv = [
            sys.executable,
            "-m",
            "idm_backup_operator",
            "run",
            "--namespace",
            self.namespace,
            *(["--verbose"] if self.verbose else []),
            *self.args,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def kill(self) -> None:
        """SIGKILL: no handler gets to clean up, as when a node dies or the OOM killer strikes."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def drop_finalizers(api: client.ApiClient, namespace: str) -> None:
    """Release the operator's objects in a namespace whose operator is gone, so the namespace can go.

    kopf puts finalizers on schedules (for their tasks) and on Delete-policy backups; with no operator
    left to remove them, deleting the namespace would hang in Terminating for ever.
    """
    custom = client.CustomObjectsApi(api)
    for plural in ("idmbackupschedules", "idmbackups"):
        try:
            items = custom.list_namespaced_custom_object("idm-backup.io", "v1alpha1", namespace, plural)[
                "items"
            ]
        except client.ApiException:
            continue  # the CRDs are not installed
        for item in items:
            if item["metadata"].get("finalizers"):
                custom.patch_namespaced_custom_object(
                    "idm-backup.io",
                    "v1alpha1",
                    namespace,
                    plural,
                    item["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )
