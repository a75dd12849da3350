"""What a job is given to work with: the API clients and settings (Services), and where it reports (Reporter).

Every kind's work takes these two, so they live below all of them; handlers/startup.py builds the Services
once, and kube/reporting.py's StatusReporter is the Reporter that writes status and Events.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client

from idm_backup_operator.api.spec import PvcStorage, S3Storage
from idm_backup_operator.kube import references
from idm_backup_operator.kube.podexec import PodExec
from idm_backup_operator.storage import Store


class Reporter(Protocol):
    """Where a job tells what it does: the resource's status and Events."""

    def update(self, **status: Any) -> None: ...

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None: ...

    def event(self, reason: str, message: str, *, warning: bool = False) -> None: ...

    def cancelled(self, *, fresh: bool = False) -> bool: ...


@dataclass(frozen=True)
class Services:
    """The connections a job uses."""

    core: client.CoreV1Api
    coordination: client.CoordinationV1Api
    execs: PodExec
    pvc_root: Path
    # Whether an S3 spec without credentialsSecretRef may use the operator's own AWS identity.
    ambient_s3_credentials: bool = False
    # Whether IdmRestores may run drills: a drill creates a pod from its template.
    drills_enabled: bool = False
    # Set when the operator shuts down (SIGTERM): running backups wind down, services started again.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Called from a job's thread with a served namespace when a restore takes or gives back a server's
    # lock there, so that the schedules it pauses say so at once.
    locks_changed: Callable[[str], None] = lambda namespace: None

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.core.api_client)

    @property
    def networking(self) -> client.NetworkingV1Api:
        return client.NetworkingV1Api(self.core.api_client)

    def open_store(self, namespace: str, storage: S3Storage | PvcStorage, scratch: Path) -> Store:
        """The store a spec names, with its namespace's credentials; files it needs (a CA) go in scratch.
        Raises references.ResolveError."""
        return references.open_store(
            self.core,
            namespace,
            storage,
            self.pvc_root,
            scratch,
            ambient_credentials=self.ambient_s3_credentials,
        )

    @contextlib.contextmanager
    def opened_store(self, namespace: str, storage: S3Storage | PvcStorage) -> Iterator[Store]:
        """open_store for a short use, with a scratch directory of its own that goes with it."""
        with tempfile.TemporaryDirectory(prefix="idm-backup-") as scratch:
            yield self.open_store(namespace, storage, Path(scratch))
