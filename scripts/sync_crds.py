"""Keep the schemas other kinds share with IdmBackup identical to IdmBackup's.

- IdmBackupSchedule's spec.template.spec is an IdmBackup spec: the API server should refuse a bad
  template when the schedule is applied, not at 02:00 when its first backup is created.
- IdmRestore's spec.source.location.storage and spec.target are IdmBackup's spec.storage and spec.target:
  a restore reads from where a backup wrote, and reaches its server the same way.
- IdmRestore's status.conditions are IdmBackup's status.conditions: the same condition shape.

So each of those schemas is embedded, and this script is the only thing that writes those parts (an
embedding may change the root's description, and the schedule's template drops the immutability rule).
`--check` fails if any of them has drifted apart. scripts/gen_api_reference.py links each embedded field
to its original instead of documenting it twice.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).resolve().parent.parent / "crds"
BACKUP = CRDS / "idm-backup.io_idmbackups.yaml"
SCHEDULE = CRDS / "idm-backup.io_idmbackupschedules.yaml"
RESTORE = CRDS / "idm-backup.io_idmrestores.yaml"
ORIGINAL_KIND = "IdmBackup"
IMMUTABLE_RULE = "self == oldSelf"
Schema = dict[str, Any]


@dataclass(frozen=True)
class Embedding:
    """IdmBackup's schema at `original`, adapted by `adapt`, is the schema of `kind`'s field at `path`."""

    kind: str
    file: Path
    path: str  # dotted, through properties, from the openAPIV3Schema root
    original: str  # the same, in IdmBackup's schema
    adapt: Callable[[Schema], None]


def root_schema(crd: dict[str, Any]) -> Schema:
    schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def field(schema: Schema, path: str) -> Schema:
    for name in path.split("."):
        schema = schema["properties"][name]
    return schema


# -- one function per embedding: how the copy differs from IdmBackup's -----------------------------------


def template_spec(spec: Schema) -> None:
    # A created IdmBackup is immutable; the schedule's template is meant to be edited.
    spec["x-kubernetes-validations"] = [
        r for r in spec["x-kubernetes-validations"] if r["rule"] != IMMUTABLE_RULE
    ]
    spec["description"] = "The spec of each IdmBackup created; the same fields as IdmBackup's spec."


def restore_storage(storage: Schema) -> None:
    storage["description"] = (
        "The storage the backup was written to, with the same fields as IdmBackup's spec.storage: exactly "
        "one of s3 or pvc. The restore only reads from it."
    )


def restore_target(target: Schema) -> None:
    target["description"] = (
        "The FreeIPA server to restore into and how to reach its LDAP directory, with the same fields as "
        "IdmBackup's spec.target. Choose the pod with exactly one of podName, podSelector or host."
    )


def drill_ldap(ldap: Schema) -> None:
    ldap["description"] = (
        "How the operator reaches the scratch server's LDAP directory, with the same fields as IdmBackup's "
        "spec.target.ldap: to read its topology and count the restored entries."
    )


def restore_conditions(conditions: Schema) -> None:
    conditions["description"] = (
        "Latest observations: Completed (the restore finished, True or False with the reason), "
        "ServicesRunning (whether IPA's services were running after the restore), ReplicaHidden (the "
        "target was a hidden replica before the restore: whether it is hidden again), Waiting (a backup or "
        "another restore of the same server runs first)."
    )


EMBEDDINGS = (
    Embedding("IdmBackupSchedule", SCHEDULE, "spec.template.spec", "spec", template_spec),
    Embedding("IdmRestore", RESTORE, "spec.source.location.storage", "spec.storage", restore_storage),
    Embedding("IdmRestore", RESTORE, "spec.target", "spec.target", restore_target),
    Embedding("IdmRestore", RESTORE, "spec.drill.ldap", "spec.target.ldap", drill_ldap),
    Embedding("IdmRestore", RESTORE, "status.conditions", "status.conditions", restore_conditions),
)


def embedded(embedding: Embedding, backup: Schema) -> Schema:
    schema = copy.deepcopy(field(backup, embedding.original))
    embedding.adapt(schema)
    return schema


def synced(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CRD in `path` as it is, and as it should be."""
    backup = root_schema(yaml.safe_load(BACKUP.read_text()))
    crd = yaml.safe_load(path.read_text())
    current = copy.deepcopy(crd)
    for embedding in EMBEDDINGS:
        if embedding.file == path:
            assert crd["spec"]["names"]["kind"] == embedding.kind, (path, embedding.kind)
            parent, _, name = embedding.path.rpartition(".")
            holder = field(root_schema(crd), parent) if parent else root_schema(crd)
            holder["properties"][name] = embedded(embedding, backup)
    return current, crd


def main() -> int:
    check = "--check" in sys.argv[1:]
    failed = False
    for path in dict.fromkeys(e.file for e in EMBEDDINGS):
        current, wanted = synced(path)
        if check:
            if current != wanted:
                print(f"{path.name} is out of date: run python scripts/sync_crds.py", file=sys.stderr)
                failed = True
        elif current != wanted:
            path.write_text(yaml.safe_dump(wanted, sort_keys=False, width=110, allow_unicode=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
