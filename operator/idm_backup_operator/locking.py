"""One backup at a time per FreeIPA server, across schedules and operator replicas: a Lease per pod.

Two backups of one server would run ipa-backup twice at once, which stops services under each other.
The Lease lives next to the pod; its holder renews it while the backup runs, and a holder that died
(operator killed) stops renewing, so after the lease duration the next backup may take it over.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass

import urllib3
from kubernetes import client

from idm_backup_operator.podexec import PodRef

log = logging.getLogger(__name__)

LEASE_SECONDS = 60
RENEW_SECONDS = 15
# Past this without a successful renewal the Lease may have expired and been taken: the holder must stop.
# One renewal period short of the lease, so it stops before anyone else may start.
LOST_AFTER_SECONDS = LEASE_SECONDS - RENEW_SECONDS
# Every call on the Lease is bounded: a hung connection must not hold the lock's holder past its lease.
CALL_TIMEOUT = 10


def lease_name(pod: PodRef) -> str:
    return f"idm-backup-lock-{pod.name}"[:253]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class _Lost(Exception):
    """Another holder, or no Lease at all: this holder no longer has the lock, for certain."""


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
        # Set when this holder can no longer be sure it holds the lock; whoever acts on the server stops.
        self.lost = threading.Event()

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
            self._api.create_namespaced_lease(ns, self._body(), _request_timeout=CALL_TIMEOUT)
            return None
        except client.ApiException as err:
            if err.status != 409:
                raise
        current = self._api.read_namespaced_lease(name, ns, _request_timeout=CALL_TIMEOUT)
        spec = current.spec
        renewed = spec.renew_time or spec.acquire_time
        expired = renewed is None or (_now() - renewed).total_seconds() > (
            spec.lease_duration_seconds or LEASE_SECONDS
        )
        if spec.holder_identity not in (None, "", self._holder) and not expired:
            return Busy(holder=spec.holder_identity)
        try:
            self._api.replace_namespaced_lease(
                name, ns, self._body(current.metadata.resource_version), _request_timeout=CALL_TIMEOUT
            )
        except client.ApiException as err:
            if err.status == 409:
                return Busy(holder="another backup taking the lock at the same moment")
            raise
        self.lost.clear()
        return None

    def keep_renewed(self) -> None:
        def renew() -> None:
            renewed = time.monotonic()
            while not self._stop.wait(RENEW_SECONDS):
                try:
                    problem = self._renew_once()
                except _Lost as lost:
                    problem, renewed = str(lost), float("-inf")
                if problem is None:
                    renewed = time.monotonic()
                elif time.monotonic() - renewed > LOST_AFTER_SECONDS:
                    log.warning("lost the lock of pod %s: %s", self._pod, problem)
                    self.lost.set()
                    return
                else:
                    # The lease outlives a few missed renewals; tried again at the next tick.
                    log.warning("could not renew the lock of pod %s: %s", self._pod, problem)

        self._renewer = threading.Thread(target=renew, name=f"lease-{self._pod.name}", daemon=True)
        self._renewer.start()

    def _renew_once(self) -> str | None:
        """None when renewed, what went wrong when that may pass; raises _Lost when it was taken."""
        name, ns = lease_name(self._pod), self._pod.namespace
        try:
            current = self._api.read_namespaced_lease(name, ns, _request_timeout=CALL_TIMEOUT)
            if current.spec.holder_identity != self._holder:
                raise _Lost(f"{current.spec.holder_identity or 'nobody'} holds it now")
            current.spec.renew_time = _now()
            self._api.replace_namespaced_lease(name, ns, current, _request_timeout=CALL_TIMEOUT)
        except client.ApiException as err:
            if err.status == 404:
                raise _Lost("it was deleted") from None
            return f"{err.status} {err.reason}"
        except (urllib3.exceptions.HTTPError, OSError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    def release(self) -> None:
        """Give the lock up if this holder still has it. Never raises: it is called while a backup ends,
        whatever ended it, and a Lease left behind expires after LEASE_SECONDS anyway."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        name, ns = lease_name(self._pod), self._pod.namespace
        try:
            current = self._api.read_namespaced_lease(name, ns, _request_timeout=CALL_TIMEOUT)
            if current.spec.holder_identity == self._holder:
                self._api.delete_namespaced_lease(
                    name,
                    ns,
                    body=client.V1DeleteOptions(
                        preconditions=client.V1Preconditions(
                            resource_version=current.metadata.resource_version
                        )
                    ),
                    _request_timeout=CALL_TIMEOUT,
                )
        except client.ApiException as err:
            if err.status not in (404, 409):
                log.warning("could not release the lock of pod %s (%s %s)", self._pod, err.status, err.reason)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            log.warning("could not release the lock of pod %s: %s", self._pod, err)
