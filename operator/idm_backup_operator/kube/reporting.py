"""A resource's status and Events, written while a handler runs.

kopf applies a handler's status patch only when the handler returns; a backup runs for minutes to
hours, and its phase and current step must be visible meanwhile, so status is patched directly.

The resource may be deleted meanwhile. Its status is then no longer written (there is nothing to write
to), Events still are, and cancelled() tells the backup to stop, as deleting a Job stops its pods.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import urllib3
from kubernetes import client

from idm_backup_operator import logs
from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import GROUP, VERSION
from idm_backup_operator.api.phase import is_finished
from idm_backup_operator.api.times import format_time

log = logging.getLogger(__name__)
COMPONENT = "idm-backup-operator"
# How often a running backup asks whether its resource still exists: one GET per backup per interval.
CANCEL_CHECK_SECONDS = 10.0
# How long a status write keeps trying through errors that pass (an API server restart, overload).
WRITE_PATIENCE_SECONDS = 30.0
# One call's bound: a connection that hangs must not hold a backup (or its cancellation check) for ever.
CALL_TIMEOUT = 15
_TRANSIENT = {0, 429, 500, 502, 503, 504}


class StatusNotWritten(Exception):
    """The resource's final status could not be written; `status` is all of it, to write again later."""

    def __init__(self, status: dict[str, Any], cause: str) -> None:
        super().__init__(f"the final status could not be written: {cause}")
        self.status = status


def patiently(call: Callable[[], Any], patience: float = WRITE_PATIENCE_SECONDS) -> Any:
    """Call, and call again through transient API errors for up to `patience` seconds; an error that
    outlasts it, or one that is not transient (404, 403, 422), is raised as an ApiException."""
    deadline = time.monotonic() + patience
    delay = 0.25
    while True:
        try:
            return call()
        except client.ApiException as err:
            if err.status not in _TRANSIENT or time.monotonic() + delay > deadline:
                raise
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if time.monotonic() + delay > deadline:
                raise client.ApiException(status=0, reason=f"{type(err).__name__}: {err}") from None
        time.sleep(delay)
        delay = min(delay * 2, 4.0)


class StatusReporter:
    def __init__(
        self,
        api: client.ApiClient,
        resource: ResourceIdentity,
        *,
        kind: str,
        plural: str,
        generation: int,
        status: dict[str, Any] | None,
    ) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._core = client.CoreV1Api(api)
        self.resource, self.kind, self.plural, self.generation = resource, kind, plural, generation
        self._conditions: dict[str, dict[str, Any]] = {
            c["type"]: c for c in (status or {}).get("conditions") or [] if "type" in c
        }
        self._deleted = False
        self._next_check = 0.0

    def update(self, **status: Any) -> None:
        """Patch the status. Progress is best effort: a write that fails even after WRITE_PATIENCE_SECONDS
        is logged and the work goes on, since a status hiccup must not change a backup's outcome. A final
        write (phase Succeeded or Failed, sent with every condition) raises StatusNotWritten instead."""
        if self._deleted:
            return
        final = is_finished(status.get("phase"))
        if final:
            status = {"conditions": list(self._conditions.values()), **status}
        body = {"status": {**status, "observedGeneration": self.generation}}
        try:
            obj = patiently(
                lambda: self._custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.resource.namespace,
                    self.plural,
                    self.resource.name,
                    body,
                    _request_timeout=CALL_TIMEOUT,
                )
            )
        except client.ApiException as err:
            if err.status == 404:
                self._gone()
                return
            cause = f"{err.status} {err.reason}"
            if final:
                raise StatusNotWritten(status, cause) from None
            log.warning("status of %s %s not updated: %s", self.kind, self.resource.name, cause)
            return
        self._note(obj)

    def cancelled(self, *, fresh: bool = False) -> bool:
        """Whether the resource was deleted (or is being deleted); asks the API server now and then, or now
        when `fresh` (before a step that cannot be taken back)."""
        if not self._deleted and (fresh or time.monotonic() >= self._next_check):
            self._next_check = time.monotonic() + CANCEL_CHECK_SECONDS
            try:
                self._note(
                    self._custom.get_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        self.resource.namespace,
                        self.plural,
                        self.resource.name,
                        _request_timeout=CALL_TIMEOUT,
                    )
                )
            except client.ApiException as err:
                if err.status == 404:
                    self._gone()
                # Anything else is the API server's hiccup, not a decision to stop: ask again later.
            except (urllib3.exceptions.HTTPError, OSError) as err:
                log.warning("could not check whether %s still exists: %s", self.resource.name, err)
        return self._deleted

    def _note(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        # Another uid: deleted, and a new resource created under the same name, which is not ours.
        if meta.get("deletionTimestamp") or meta.get("uid") not in (None, self.resource.uid):
            self._gone()

    def _gone(self) -> None:
        if not self._deleted:
            log.info("%s %s/%s was deleted", self.kind, self.resource.namespace, self.resource.name)
        self._deleted = True

    def condition(
        self, type_: str, status: bool, reason: str, message: str, *, also: Mapping[str, Any] | None = None
    ) -> None:
        """Set one condition; `also`, other status fields, go in the same patch, so that no reader sees a
        step without the condition that explains it."""
        value = "True" if status else "False"
        previous = self._conditions.get(type_)
        if previous is not None and previous.get("status") == value:
            since = previous["lastTransitionTime"]
        else:
            since = format_time(datetime.datetime.now(datetime.UTC))
        self._conditions[type_] = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": self.generation,
        }
        self.update(**(also or {}), conditions=list(self._conditions.values()))

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{self.resource.name}.", namespace=self.resource.namespace
            ),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=self.kind,
                name=self.resource.name,
                namespace=self.resource.namespace,
                uid=self.resource.uid,
            ),
            reason=reason,
            message=logs.redact(message)[:1024],
            type="Warning" if warning else "Normal",
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
        )
        try:
            self._core.create_namespaced_event(self.resource.namespace, event, _request_timeout=CALL_TIMEOUT)
        except (client.ApiException, urllib3.exceptions.HTTPError, OSError) as err:
            # An Event is a courtesy; the status carries the same facts.
            log.warning("could not post event %s for %s: %s", reason, self.resource.name, err)
