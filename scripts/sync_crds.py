"""Keep the schemas other kinds share with IdmBackup (or IdmRestore) identical to the original's.

- IdmBackupSchedule's spec.template.spec is an IdmBackup spec: the API server should refuse a bad
  template when the schedule is applied, not at 02:00 when its first backup is created.
- IdmRestore's spec.source.location.storage and spec.target are IdmBackup's spec.storage and spec.target:
  a restore reads from where a backup wrote, and reaches its server the same way.
- IdmRestore's status.conditions are IdmBackup's status.conditions: the same condition shape.
- IdmBackupSchedule's spec.drill.restore, .decryption and .activeDeadlineSeconds are IdmRestore's
  spec.drill, spec.decryption and spec.activeDeadlineSeconds: a scheduled drill creates an IdmRestore of
  mode Drill from them, which the API server must not refuse at the drill's tick.

So each of those schemas is embedded (IdmRestore's after its own embeddings are applied), and this script
is the only thing that writes those parts (an embedding may change the root's description, and the
schedule's template drops the immutability rule).
`--check` fails if any of them has drifted apart. scripts/gen_api_reference.py links each field embedded
from IdmBackup (EMBEDDINGS) to its original instead of documenting it twice; the fields copied from
IdmRestore (RESTORE_EMBEDDINGS) are documented where they are.
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
RESTORE_KIND = "IdmRestore"
IMMUTABLE_RULE = "self == oldSelf"
Schema = dict[str, Any]


@dataclass(frozen=True)
class Embedding:
    """`source`'s schema at `original`, adapted by `adapt`, is the schema of `kind`'s field at `path`."""

    kind: str
    file: Path
    path: str  # dotted, through properties, from the openAPIV3Schema root
    original: str  # the same, in the source's schema
    adapt: Callable[[Schema], None]
    source: Path = BACKUP


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


def drill_restore(drill: Schema) -> None:
    drill["description"] = (
        "The throwaway server each drill restores into, with the same fields as IdmRestore's spec.drill: "
        "its pod template (same realm and host name as the server backed up, in a namespace where no backup "
        "targets that host), the scratch volume, how to reach its LDAP directory, how long it may take to "
        "become Ready."
    )


def drill_decryption(decryption: Schema) -> None:
    decryption["description"] = (
        "How each drill decrypts the archive, with the same fields as IdmRestore's spec.decryption: the "
        "private key's Secret in this namespace (needed when the backups are encrypted). The key never "
        "enters the scratch pod."
    )


def drill_deadline(deadline: Schema) -> None:
    deadline["description"] = (
        "Longest time each drill may take, as IdmRestore's spec.activeDeadlineSeconds (default 7200, at "
        "most 86400); the scratch server's start counts towards it."
    )


EMBEDDINGS = (
    Embedding("IdmBackupSchedule", SCHEDULE, "spec.template.spec", "spec", template_spec),
    Embedding("IdmRestore", RESTORE, "spec.source.location.storage", "spec.storage", restore_storage),
    Embedding("IdmRestore", RESTORE, "spec.target", "spec.target", restore_target),
    Embedding("IdmRestore", RESTORE, "spec.drill.ldap", "spec.target.ldap", drill_ldap),
    Embedding("IdmRestore", RESTORE, "status.conditions", "status.conditions", restore_conditions),
)
# Copies of IdmRestore's fields: made from IdmRestore's CRD as EMBEDDINGS make it, so after them.
RESTORE_EMBEDDINGS = (
    Embedding("IdmBackupSchedule", SCHEDULE, "spec.drill.restore", "spec.drill", drill_restore, RESTORE),
    Embedding(
        "IdmBackupSchedule", SCHEDULE, "spec.drill.decryption", "spec.decryption", drill_decryption, RESTORE
    ),
    Embedding(
        "IdmBackupSchedule",
        SCHEDULE,
        "spec.drill.activeDeadlineSeconds",
        "spec.activeDeadlineSeconds",
        drill_deadline,
        RESTORE,
    ),
)
ALL_EMBEDDINGS = EMBEDDINGS + RESTORE_EMBEDDINGS


def embedded(embedding: Embedding, source: Schema) -> Schema:
    schema = copy.deepcopy(field(source, embedding.original))
    embedding.adapt(schema)
    return schema


def synced(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CRD in `path` as it is, and as it should be (its sources as they should be, too)."""
    crd = yaml.safe_load(path.read_text())
    current = copy.deepcopy(crd)
    sources: dict[Path, Schema] = {}
    for embedding in ALL_EMBEDDINGS:
        if embedding.file == path:
            assert crd["spec"]["names"]["kind"] == embedding.kind, (path, embedding.kind)
            if embedding.source not in sources:
                # A source that is itself synced is read as it should be: one pass makes everything agree.
                source_crd = (
                    synced(embedding.source)[1]
                    if any(e.file == embedding.source for e in ALL_EMBEDDINGS)
                    else yaml.safe_load(embedding.source.read_text())
                )
                sources[embedding.source] = root_schema(source_crd)
            parent, _, name = embedding.path.rpartition(".")
            holder = field(root_schema(crd), parent) if parent else root_schema(crd)
            holder["properties"][name] = embedded(embedding, sources[embedding.source])
    return current, crd


def main() -> int:
    check = "--check" in sys.argv[1:]
    failed = False
    for path in dict.fromkeys(e.file for e in ALL_EMBEDDINGS):
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
