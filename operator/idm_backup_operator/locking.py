"""One backup at a time per FreeIPA server, across schedules and operator replicas: a Lease per pod.

Two backups of one server would run ipa-backup twice at once, which stops services under each other.
The Lease lives next to the pod; its holder renews it while the backup runs, and a holder that died
(operator killed) stops renewing, so after the lease duration the next backup may take it over.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

from kubernetes import client

from idm_backup_operator.podexec import PodRef

LEASE_SECONDS = 60
RENEW_SECONDS = 15


def lease_name(pod: PodRef) -> str:
    return f"idm-backup-lock-{pod.name}"[:253]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Busy:
    """Who holds the server's lock instead of us."""

    holder: str


class TargetLock:
    def __init__(self, coordination: client.CoordinationV1Api, pod: PodRef, holder: str) -> None:
        self._api = coordination
        self._pod = pod
        self._holder = holder
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self, resource_version: str | None = None) -> client.V1Lease:
        now = _now()
        return client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=lease_name(self._pod),
                namespace=self._pod.namespace,
                resource_version=resource_version,
                labels={"app.kubernetes.io/managed-by": "idm-backup-operator"},
            ),
            spec=client.V1LeaseSpec(
                holder_identity=self._holder,
                lease_duration_seconds=LEASE_SECONDS,
                acquire_time=now,
                renew_time=now,
            ),
        )

    def try_acquire(self) -> Busy | None:
        """Take the lock, or say who has it. Optimistic concurrency makes two takers never both win."""
        name, ns = lease_name(self._pod), self._pod.namespace
        try:
            self._api.create_namespaced_lease(ns, self._body())
            return None
        except client.ApiException as err:
            if err.status != 409:
                raise
        current = self._api.read_namespaced_lease(name, ns)
        spec = current.spec
        renewed = spec.renew_time or spec.acquire_time
        expired = renewed is None or (_now() - renewed).total_seconds() > (
            spec.lease_duration_seconds or LEASE_SECONDS
        )
        if spec.holder_identity not in (None, "", self._holder) and not expired:
            return Busy(holder=spec.holder_identity)
        try:
            self._api.replace_namespaced_lease(name, ns, self._body(current.metadata.resource_version))
        except client.ApiException as err:
            if err.status == 409:
                return Busy(holder="another backup taking the lock at the same moment")
            raise
        return None

    def keep_renewed(self) -> None:
        def renew() -> None:
            while not self._stop.wait(RENEW_SECONDS):
                try:
                    current = self._api.read_namespaced_lease(lease_name(self._pod), self._pod.namespace)
                    current.spec.renew_time = _now()
                    self._api.replace_namespaced_lease(lease_name(self._pod), self._pod.namespace, current)
                except client.ApiException:
                    pass  # retried at the next tick; the lease outlives a few missed renewals

        self._renewer = threading.Thread(target=renew, name=f"lease-{self._pod.name}", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            current = self._api.read_namespaced_lease(lease_name(self._pod), self._pod.namespace)
            if current.spec.holder_identity == self._holder:
                self._api.delete_namespaced_lease(
                    lease_name(self._pod),
                    self._pod.namespace,
                    body=client.V1DeleteOptions(
                        preconditions=client.V1Preconditions(
                            resource_version=current.metadata.resource_version
                        )
                    ),
                )
        except client.ApiException as err:
            if err.status not in (404, 409):
                raise
