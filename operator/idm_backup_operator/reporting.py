"""A resource's status and Events, written while a handler runs.

kopf applies a handler's status patch only when the handler returns; a backup runs for minutes to
hours, and its phase and current step must be visible meanwhile, so status is patched directly.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from kubernetes import client

from idm_backup_operator import logs
from idm_backup_operator.layout import ResourceIdentity
from idm_backup_operator.model import GROUP, VERSION, format_time

log = logging.getLogger(__name__)
COMPONENT = "idm-backup-operator"


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

    def update(self, **status: Any) -> None:
        body = {"status": {**status, "observedGeneration": self.generation}}
        self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.resource.namespace, self.plural, self.resource.name, body
        )

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
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
        self.update(conditions=list(self._conditions.values()))

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
            self._core.create_namespaced_event(self.resource.namespace, event)
        except client.ApiException as err:
            # An Event is a courtesy; the status carries the same facts.
            log.warning("could not post event %s for %s: %s", reason, self.resource.name, err.reason)
