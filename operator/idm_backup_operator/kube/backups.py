"""IdmBackup objects as a schedule handles them: the ones it owns, a new one for a tick, one to delete.

A schedule's children carry its name in a label, but only the owner reference (its uid) proves they are
its own and not a namesake's, so both are checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client

from idm_backup_operator.api.identity import ResourceIdentity
from idm_backup_operator.api.names import (
    GROUP,
    IDMBACKUP,
    IDMBACKUPS,
    IDMBACKUPSCHEDULES,
    IDMRESTORE,
    IDMRESTORES,
    SCHEDULE_LABEL,
    VERSION,
)
from idm_backup_operator.api.phase import Phase
from idm_backup_operator.api.spec import PvcStorage, S3Storage, Target, parse_storage, parse_target
from idm_backup_operator.kube.errors import api_message

# One call's bound: a connection that hangs must not hold a schedule's pass for ever.
CALL_TIMEOUT = 30


class Refused(Exception):
    """The API server (its schema or the admission webhook) refused the object; the message says why."""


class NameTaken(Exception):
    """An IdmBackup of that name exists and is not the schedule's: someone else made it first."""


class NotFound(Exception):
    """The object named does not exist (or the operator may not read it)."""


class ScheduleChildren:
    """Objects of one kind that schedules make (`plural`): listed by owner, created once, deleted."""

    def __init__(self, custom: client.CustomObjectsApi, plural: str, kind: str) -> None:
        self._custom, self._plural, self._kind = custom, plural, kind

    def owned_by(self, schedule: ResourceIdentity) -> list[Mapping[str, Any]]:
        items = self._custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            schedule.namespace,
            self._plural,
            label_selector=f"{SCHEDULE_LABEL}={schedule.name}",
            _request_timeout=CALL_TIMEOUT,
        )["items"]
        return [
            item
            for item in items
            if any(ref.get("uid") == schedule.uid for ref in item["metadata"].get("ownerReferences") or [])
        ]

    def create(self, body: Mapping[str, Any]) -> bool:
        """False if the schedule made it already (a retry after a crash): never a second one. Raises
        Refused, and NameTaken when the name is another's: an object made by hand under a tick's name must
        not pass for the tick's own, which would then never run."""
        try:
            self._custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                body["metadata"]["namespace"],
                self._plural,
                body,
                _request_timeout=CALL_TIMEOUT,
            )
        except client.ApiException as err:
            if err.status == 409:
                return self._ours_already(body)
            if err.status == 422:
                raise Refused(api_message(err)) from None
            raise
        return True

    def _ours_already(self, body: Mapping[str, Any]) -> bool:
        meta = body["metadata"]
        owners = {ref["uid"] for ref in meta.get("ownerReferences") or []}
        existing = self._custom.get_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], self._plural, meta["name"], _request_timeout=CALL_TIMEOUT
        )
        if owners & {ref.get("uid") for ref in existing["metadata"].get("ownerReferences") or []}:
            return False
        raise NameTaken(f"{self._kind} {meta['namespace']}/{meta['name']} exists and is not this schedule's")

    def delete(self, namespace: str, name: str) -> None:
        """Gone already is as good as deleted."""
        try:
            self._custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, self._plural, name, _request_timeout=CALL_TIMEOUT
            )
        except client.ApiException as err:
            if err.status != 404:
                raise


class DrillRestores(ScheduleChildren):
    """The IdmRestores a schedule's drills are."""

    def __init__(self, custom: client.CustomObjectsApi) -> None:
        super().__init__(custom, IDMRESTORES, IDMRESTORE)


class IdmBackups(ScheduleChildren):
    """A schedule's IdmBackups, and what restores and the start-up sweep ask about backups."""

    def __init__(self, custom: client.CustomObjectsApi) -> None:
        super().__init__(custom, IDMBACKUPS, IDMBACKUP)

    def _get(self, namespace: str, plural: str, name: str) -> Mapping[str, Any]:
        try:
            obj: Mapping[str, Any] = self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=CALL_TIMEOUT
            )
        except client.ApiException as err:
            if err.status == 404:
                raise NotFound(f"{plural} {namespace}/{name} does not exist") from None
            raise
        return obj

    def get(self, namespace: str, name: str) -> Mapping[str, Any]:
        """Raises NotFound."""
        return self._get(namespace, IDMBACKUPS, name)

    def targets_in(self, namespace: str) -> list[tuple[str, Target]]:
        """The targets of every IdmBackup and schedule template in the namespace, named for a message."""
        found: list[tuple[str, Target]] = []
        for plural, kind, path in (
            (IDMBACKUPS, "IdmBackup", ("spec",)),
            (IDMBACKUPSCHEDULES, "IdmBackupSchedule", ("spec", "template", "spec")),
        ):
            items = self._custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, _request_timeout=CALL_TIMEOUT
            )["items"]
            for item in items:
                spec = item
                for key in path:
                    spec = spec.get(key) or {}
                with contextlib.suppress(KeyError, TypeError):
                    found.append((f"{kind} {item['metadata']['name']}", parse_target(spec["target"])))
        return found

    def storages(self, namespaces: Sequence[str]) -> list[tuple[str, S3Storage | PvcStorage]]:
        """Each storage an IdmBackup or a schedule's template names, with its namespace, once; all
        namespaces when `namespaces` is empty (the operator watches the whole cluster)."""
        found: dict[tuple[str, S3Storage | PvcStorage], None] = {}
        for plural, path in ((IDMBACKUPS, ("spec",)), (IDMBACKUPSCHEDULES, ("spec", "template", "spec"))):
            if namespaces:
                items = [
                    item
                    for ns in namespaces
                    for item in self._custom.list_namespaced_custom_object(
                        GROUP, VERSION, ns, plural, _request_timeout=CALL_TIMEOUT
                    )["items"]
                ]
            else:
                items = self._custom.list_cluster_custom_object(
                    GROUP, VERSION, plural, _request_timeout=CALL_TIMEOUT
                )["items"]
            for item in items:
                spec = item
                for key in path:
                    spec = spec.get(key) or {}
                with contextlib.suppress(KeyError, TypeError):
                    found[(item["metadata"]["namespace"], parse_storage(spec["storage"]))] = None
        return list(found)

    def latest_succeeded(self, namespace: str, schedule_name: str) -> Mapping[str, Any] | None:
        """The schedule's own Succeeded IdmBackup that completed last; raises NotFound for no schedule."""
        meta = self._get(namespace, IDMBACKUPSCHEDULES, schedule_name)["metadata"]
        owned = self.owned_by(ResourceIdentity(namespace, schedule_name, meta["uid"]))
        done = [b for b in owned if (b.get("status") or {}).get("phase") == Phase.SUCCEEDED]
        return max(done, key=lambda b: b["status"].get("completionTime") or "", default=None)
