"""One backup at a time per FreeIPA server, across schedules and operator replicas: a Lease per pod.

Two backups of one server would run ipa-backup twice at once, which stops services under each other.
The Lease's holder renews it while the backup runs, and a holder that died (operator killed) stops
renewing, so after the lease duration the next backup may take it over.

Every server's Lease lives in one namespace, the operator's own (`configure`), not next to the pod: the
operator then needs Lease rights in that namespace only, never in the namespaces it serves (where
kube-system and kube-node-lease hold the control plane's and the nodes' Leases), and the people who
create IdmBackups in a namespace cannot touch the locks, whatever rights they have there.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import urllib3
from kubernetes import client

from idm_backup_operator.api.names import MANAGED_BY_LABELS
from idm_backup_operator.kube.podexec import PodRef

log = logging.getLogger(__name__)

LEASE_SECONDS = 60
RENEW_SECONDS = 15
# Past this without a successful renewal the Lease may have expired and been taken: the holder must stop.
# One renewal period short of the lease, so it stops before anyone else may start.
LOST_AFTER_SECONDS = LEASE_SECONDS - RENEW_SECONDS
# Every call on the Lease is bounded: a hung connection must not hold the lock's holder past its lease.
CALL_TIMEOUT = 10

# Where the locks go. The option (--lock-namespace, or this variable) is for an operator run outside a
# cluster; in a pod the chart sets POD_NAMESPACE from the downward API.
LOCK_NAMESPACE_ENV = "IDM_BACKUP_LOCK_NAMESPACE"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Which server a lock is for, besides its name (which a hash shortens when it is too long): the
# namespace as a label, to select by (`kubectl get lease -l idm-backup.io/target-namespace=identity`),
# and `<namespace>/<pod>` as an annotation, since a pod's name may be too long for a label value.
TARGET_NAMESPACE_LABEL = "idm-backup.io/target-namespace"
TARGET_POD_ANNOTATION = "idm-backup.io/target-pod"
MANAGED_BY = MANAGED_BY_LABELS

LEASE_PREFIX = "idm-backup-lock-"
NAME_LIMIT = 253  # an object name: a DNS subdomain
# 64 bits of sha256: two long pod names of one namespace that differ only after the cut still get
# different locks.
DIGEST_CHARS = 16
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def lease_name(pod: PodRef) -> str:
    """`idm-backup-lock-<namespace>.<pod>`: one name per server in the whole cluster, the same each time.

    The separator is a dot because a namespace never has one (it is a DNS label): the namespace is
    everything up to the first dot, so ("a-b", "c") and ("a", "b-c") never meet, as they would at
    `idm-backup-lock-a-b-c`. The namespace is never shortened, so servers of two namespaces never share
    a lock. A name longer than an object name may be (a long namespace and a long pod name) keeps its
    start, cut where the pod's name is, and ends in a hash of `<namespace>/<pod>`.
    """
    full = f"{LEASE_PREFIX}{pod.namespace}.{pod.name}"
    if len(full) <= NAME_LIMIT:
        return full
    digest = hashlib.sha256(f"{pod.namespace}/{pod.name}".encode()).hexdigest()[:DIGEST_CHARS]
    # Each dot-separated part of a DNS subdomain starts and ends with a letter or digit: a cut that ends
    # on a dot or a dash drops it. The prefix, a 63-character namespace and the dot take 80 characters,
    # so the cut always falls well inside the pod's name.
    head = full[: NAME_LIMIT - DIGEST_CHARS - 1].rstrip("-.")
    return f"{head}-{digest}"


class LockNamespaceUnknown(ValueError):
    """No namespace for the locks: the operator does not start (handlers/startup.py makes it a permanent
    error, which stops kopf's start-up instead of retrying it every minute)."""


def namespace_name(value: str) -> str:
    """The value if it is a namespace name, else ValueError (which argparse reports as an invalid value)."""
    if not _DNS_LABEL.fullmatch(value):
        raise ValueError(f"{value!r} is not a namespace name (a DNS label)")
    return value


def resolve_namespace(option: str | None, watched: Sequence[str]) -> tuple[str, str]:
    """The locks' namespace and where it came from, in this order:

    1. --lock-namespace (IDM_BACKUP_LOCK_NAMESPACE): an operator run outside a cluster;
    2. POD_NAMESPACE: the chart's pod, its own namespace from the downward API;
    3. the service account's namespace file, in a pod the chart did not make (only when the operator
       talks to the cluster it runs in: KUBERNETES_SERVICE_HOST is what makes it use the in-cluster
       configuration; with a kubeconfig, the file names a namespace of another cluster);
    4. the first watched namespace (--namespace): a local process, as the tests and the demo run it,
       has no namespace of its own, and the first one it serves is where its user expects its objects.
    Cluster-wide, outside a pod and without the option there is no good guess, and the operator says so.
    """
    candidates = [
        (option or os.environ.get(LOCK_NAMESPACE_ENV), f"--lock-namespace or {LOCK_NAMESPACE_ENV}"),
        (os.environ.get(POD_NAMESPACE_ENV), POD_NAMESPACE_ENV),
    ]
    if os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_NAMESPACE.is_file():
        candidates.append((SERVICE_ACCOUNT_NAMESPACE.read_text().strip(), str(SERVICE_ACCOUNT_NAMESPACE)))
    candidates.append((watched[0] if watched else None, "the first --namespace"))
    for value, source in candidates:
        if value:
            try:
                return namespace_name(value), source
            except ValueError as err:
                raise LockNamespaceUnknown(f"{source}: {err}") from None
    raise LockNamespaceUnknown(
        "no namespace for the servers' locks (Leases): outside a pod and watching all namespaces, "
        f"give --lock-namespace (or {LOCK_NAMESPACE_ENV}), a namespace where the operator may get, "
        "create, update and delete Leases"
    )


_configured: str | None = None


def configure(option: str | None, watched: Sequence[str]) -> str:
    """Fix the locks' namespace for this process, at start-up, before any backup runs."""
    global _configured
    _configured, source = resolve_namespace(option, watched)
    log.info("servers' locks (Leases) go to namespace %s (from %s)", _configured, source)
    return _configured


def lock_namespace() -> str:
    """The configured namespace; without `configure` (an operator started other than by the command
    line), what the environment says."""
    return _configured if _configured is not None else resolve_namespace(None, ())[0]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _expired(spec: client.V1LeaseSpec) -> bool:
    renewed = spec.renew_time or spec.acquire_time
    return renewed is None or (_now() - renewed).total_seconds() > (
        spec.lease_duration_seconds or LEASE_SECONDS
    )


def holders(
    coordination: client.CoordinationV1Api, namespace: str, *, locks: str | None = None
) -> dict[str, str]:
    """Who holds the lock of each server of `namespace` now, by pod name; expired Leases are nobody's.
    The locks are in `locks`, by default the configured namespace."""
    leases = coordination.list_namespaced_lease(
        locks or lock_namespace(),
        label_selector=f"{TARGET_NAMESPACE_LABEL}={namespace}",
        _request_timeout=CALL_TIMEOUT,
    ).items
    held = {}
    for lease in leases:
        target = (lease.metadata.annotations or {}).get(TARGET_POD_ANNOTATION, "")
        lease_namespace, _, pod = target.partition("/")
        if lease_namespace == namespace and lease.spec.holder_identity and not _expired(lease.spec):
            held[pod] = lease.spec.holder_identity
    return held


class _Lost(Exception):
    """Another holder, or no Lease at all: this holder no longer has the lock, for certain."""


@dataclass(frozen=True)
class Busy:
    """Who holds the server's lock instead of us."""

    holder: str


class TargetLock:
    def __init__(
        self,
        coordination: client.CoordinationV1Api,
        pod: PodRef,
        holder: str,
        *,
        namespace: str | None = None,
    ) -> None:
        self._api = coordination
        self._pod = pod
        self.name = lease_name(pod)
        # backup.py leaves it to the start-up's configuration; tests name one.
        self.namespace = namespace or lock_namespace()
        self._holder = holder
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        # Set when this holder can no longer be sure it holds the lock; whoever acts on the server stops.
        self.lost = threading.Event()

    def _body(self, resource_version: str | None = None) -> client.V1Lease:
        now = _now()
        return client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                resource_version=resource_version,
                labels={**MANAGED_BY, TARGET_NAMESPACE_LABEL: self._pod.namespace},
                annotations={TARGET_POD_ANNOTATION: f"{self._pod.namespace}/{self._pod.name}"},
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
        name, ns = self.name, self.namespace
        try:
            self._api.create_namespaced_lease(ns, self._body(), _request_timeout=CALL_TIMEOUT)
            return None
        except client.ApiException as err:
            if err.status != 409:
                raise
        current = self._api.read_namespaced_lease(name, ns, _request_timeout=CALL_TIMEOUT)
        spec = current.spec
        if spec.holder_identity not in (None, "", self._holder) and not _expired(spec):
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
        name, ns = self.name, self.namespace
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
        name, ns = self.name, self.namespace
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
