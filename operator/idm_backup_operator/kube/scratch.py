"""The throwaway FreeIPA server of a restore drill: made from the user's template, walled off, deleted.

A drill must prove that an archive restores without any chance of touching production, so the scratch
pod gets a NetworkPolicy that denies all its egress before it exists (ipa-restore contacts every other
master to disable replication; the restored data must never reach them), and owner references to its
IdmRestore, so that the garbage collector removes pod, claim and policy even if the operator never
comes back. Whoever creates the IdmRestore chooses the pod's spec: the webhook checks that they may
create pods in the namespace themselves, and the operator runs drills only where its administrator
enabled them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import (
    DRILL_LABEL,
    GROUP,
    IDMRESTORE,
    MANAGED_BY_LABELS,
    VERSION,
    bounded_name,
)
from idm_backup_operator.api.spec import Target
from idm_backup_operator.kube.errors import api_message
from idm_backup_operator.kube.podexec import PodRef
from idm_backup_operator.kube.references import HOSTNAME_ENV

CALL_TIMEOUT = 30
DATA_VOLUME = "data"


class ScratchError(Exception):
    """The scratch server cannot be made or did not come up; the message says why."""


def shared_claims(template: Mapping[str, Any], *, claim_replaces_data: bool) -> list[tuple[str, str]]:
    """(volume, claim) the pod template would mount read-write that outlive the drill: production's data
    volume, perhaps, which a restore into the scratch pod would then overwrite. The volume named data
    that a volumeClaimTemplate replaces is the drill's own. Tolerant of a template not yet validated
    (the CLI checks a file with it)."""
    spec = template.get("spec")
    volumes = spec.get("volumes") if isinstance(spec, Mapping) else None
    shared = []
    for volume in volumes if isinstance(volumes, list) else []:
        claim = volume.get("persistentVolumeClaim") if isinstance(volume, Mapping) else None
        if not isinstance(claim, Mapping) or claim.get("readOnly"):
            continue
        if not (claim_replaces_data and volume.get("name") == DATA_VOLUME):
            shared.append((str(volume.get("name")), str(claim.get("claimName"))))
    return shared


@dataclass(frozen=True)
class ScratchServer:
    core: client.CoreV1Api
    networking: client.NetworkingV1Api
    owner: ResourceIdentity
    template: Mapping[str, Any]
    claim_template: Mapping[str, Any] | None

    @property
    def name(self) -> str:
        return bounded_name(self.owner.name, "-drill")

    @property
    def labels(self) -> dict[str, str]:
        return {**MANAGED_BY_LABELS, DRILL_LABEL: self.owner.name}

    @property
    def host(self) -> str | None:
        """The FQDN the template gives the server (freeipa-container's IPA_SERVER_HOSTNAME or --hostname)."""
        for container in (self.template.get("spec") or {}).get("containers") or []:
            for env in container.get("env") or []:
                if env.get("name") == HOSTNAME_ENV and env.get("value"):
                    return str(env["value"])
            args = [*(container.get("command") or []), *(container.get("args") or [])]
            for i, arg in enumerate(args):
                if arg.startswith("--hostname="):
                    return str(arg.split("=", 1)[1])
                if arg == "--hostname" and i + 1 < len(args):
                    return str(args[i + 1])
        return None

    def would_be_targeted_by(self, targets: Sequence[tuple[str, Target]]) -> list[str]:
        """Which of the (what, target) pairs, production backups' targets, would pick the scratch pod."""
        labels = {**((self.template.get("metadata") or {}).get("labels") or {}), **self.labels}
        host = (self.host or "").lower()
        found = []
        for what, target in targets:
            if target.pod_name == self.name:
                found.append(f"{what} (podName {self.name})")
            elif target.host and host and target.host.lower() == host:
                found.append(f"{what} (host {target.host})")
            elif target.pod_selector is not None and _selects(target.pod_selector.match_labels, labels):
                found.append(f"{what} (podSelector)")
        return found

    def shared_claims(self) -> list[str]:
        return [
            claim
            for _, claim in shared_claims(self.template, claim_replaces_data=self.claim_template is not None)
        ]

    def _owned(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.owner.namespace,
            "labels": self.labels,
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": IDMRESTORE,
                    "name": self.owner.name,
                    "uid": self.owner.uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        }

    def create(self) -> None:
        """The policy first, so that the pod never runs without it; then the claim and the pod."""
        ns = self.owner.namespace
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self._owned(self.name),
            # No egress rule at all: nothing leaves the pod, DNS included.
            "spec": {"podSelector": {"matchLabels": self.labels}, "policyTypes": ["Egress"], "egress": []},
        }
        metadata = copy.deepcopy(dict(self.template.get("metadata") or {}))
        spec = copy.deepcopy(dict(self.template.get("spec") or {}))
        if self.claim_template is not None:
            claim = {"metadata": self._owned(self.name), "spec": copy.deepcopy(dict(self.claim_template))}
            volume = {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": self.name}}
            spec["volumes"] = [v for v in spec.get("volumes") or [] if v.get("name") != DATA_VOLUME] + [
                volume
            ]
        meta = self._owned(self.name)
        meta["labels"] = {**(metadata.get("labels") or {}), **self.labels}
        meta["annotations"] = metadata.get("annotations") or {}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
        try:
            self.networking.create_namespaced_network_policy(ns, policy, _request_timeout=CALL_TIMEOUT)
            if self.claim_template is not None:
                self.core.create_namespaced_persistent_volume_claim(ns, claim, _request_timeout=CALL_TIMEOUT)
            self.core.create_namespaced_pod(ns, pod, _request_timeout=CALL_TIMEOUT)
        except client.ApiException as err:
            raise ScratchError(f"cannot create the scratch server: {api_message(err)}") from None

    def wait_ready(self, timeout: float, should_stop: Callable[[], bool]) -> PodRef:
        deadline = time.monotonic() + timeout
        while True:
            try:
                pod = self.core.read_namespaced_pod(
                    self.name, self.owner.namespace, _request_timeout=CALL_TIMEOUT
                )
            except client.ApiException as err:
                raise ScratchError(f"scratch pod {self.name}: {api_message(err)}") from None
            phase = pod.status.phase if pod.status else None
            if phase in ("Failed", "Succeeded"):
                raise ScratchError(f"scratch pod {self.name} ended ({phase}) before it was ready")
            if phase == "Running" and any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ()
            ):
                return PodRef(self.owner.namespace, self.name, pod.spec.containers[0].name)
            if time.monotonic() > deadline:
                raise ScratchError(f"scratch pod {self.name} was not ready within {timeout:.0f} s")
            if should_stop():
                raise ScratchError(f"stopped waiting for scratch pod {self.name}")
            time.sleep(2)

    def delete(self) -> list[str]:
        """Delete pod, claim and policy; what could not be deleted (the owner references still will)."""
        ns, left = self.owner.namespace, []
        calls: list[tuple[str, Callable[..., Any]]] = [
            ("pod", self.core.delete_namespaced_pod),
            ("claim", self.core.delete_namespaced_persistent_volume_claim),
            ("NetworkPolicy", self.networking.delete_namespaced_network_policy),
        ]
        for what, delete in calls:
            try:
                delete(self.name, ns, grace_period_seconds=0, _request_timeout=CALL_TIMEOUT)
            except client.ApiException as err:
                if err.status != 404:
                    left.append(f"{what} {self.name}: {api_message(err)}")
        return left


def _selects(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())
