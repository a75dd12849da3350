"""IdmBackup objects as a schedule handles them: the ones it owns, a new one for a tick, one to delete.

A schedule's children carry its name in a label, but only the owner reference (its uid) proves they are
its own and not a namesake's, so both are checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubernetes import client

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import GROUP, IDMBACKUPS, SCHEDULE_LABEL, VERSION


class Refused(Exception):
    """The API server (its schema or the admission webhook) refused the object; the message says why."""


def _api_message(err: client.ApiException) -> str:
    try:
        message = json.loads(err.body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return f"{err.status} {err.reason}"
    return str(message)


class IdmBackups:
    def __init__(self, custom: client.CustomObjectsApi) -> None:
        self._custom = custom

    def owned_by(self, schedule: ResourceIdentity) -> list[Mapping[str, Any]]:
        items = self._custom.list_namespaced_custom_object(
            GROUP, VERSION, schedule.namespace, IDMBACKUPS, label_selector=f"{SCHEDULE_LABEL}={schedule.name}"
        )["items"]
        return [
            item
            for item in items
            if any(ref.get("uid") == schedule.uid for ref in item["metadata"].get("ownerReferences") or [])
        ]

    def create(self, body: Mapping[str, Any]) -> bool:
        """False if it exists already (a retry after a crash): never a second one. Raises Refused."""
        try:
            self._custom.create_namespaced_custom_object(
                GROUP, VERSION, body["metadata"]["namespace"], IDMBACKUPS, body
            )
        except client.ApiException as err:
            if err.status == 409:
                return False
            if err.status == 422:
                raise Refused(_api_message(err)) from None
            raise
        return True

    def delete(self, namespace: str, name: str) -> None:
        self._custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, IDMBACKUPS, name)
