"""The API in crds/: every field documented, and the schemas copied from IdmBackup (the schedule's
template, IdmRestore's storage, target and conditions) identical to IdmBackup's."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from idm_backup_operator.idmbackup import validation
from testbed.deploy import REPO

CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))


def fields(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{name}", sub
        yield from fields(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from fields(schema["items"], f"{path}[]")


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_field_has_a_description(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert schema.get("description")
        undocumented = [
            p
            for p, sub in fields(schema, crd["spec"]["names"]["kind"])
            if not sub.get("description") and not p.endswith(".metadata")
        ]
        assert undocumented == []


# The structural-schema keywords the API server accepts; anything else in a schema node is a typo or a
# wrapped description that YAML read as a key, and makes `kubectl apply` of the CRD fail strict decoding.
SCHEMA_KEYWORDS = {
    "type", "format", "description", "properties", "items", "required", "enum", "default", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
    "maxItems", "uniqueItems", "minProperties", "maxProperties", "additionalProperties", "nullable",
    "anyOf", "allOf", "oneOf", "not", "example", "title", "multipleOf", "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-embedded-resource",
}  # fmt: skip


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_schema_node_uses_only_schema_keywords(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        nodes = [("", schema), *fields(schema, crd["spec"]["names"]["kind"])]
        unknown = {
            p or "<root>": sorted(set(node) - SCHEMA_KEYWORDS)
            for p, node in nodes
            if set(node) - SCHEMA_KEYWORDS
        }
        assert unknown == {}


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_status_has_phase_or_schedule_times_conditions_and_observed_generation(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"conditions", "observedGeneration"} <= set(status)
    assert "phase" in status or "lastScheduleTime" in status


def test_schedule_template_and_restore_copies_are_the_idmbackup_schemas() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sync_crds.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def schema_of(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / name).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_a_restore_reads_storage_and_reaches_its_server_as_an_idmbackup_does() -> None:
    """Whatever sync_crds.py does: the copies differ from IdmBackup's only in their own description."""
    backup = schema_of("idm-backup.io_idmbackups.yaml")["properties"]
    restore = schema_of("idm-backup.io_idmrestores.yaml")["properties"]

    def undescribed(schema: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in schema.items() if k != "description"}

    location = restore["spec"]["properties"]["source"]["properties"]["location"]["properties"]
    copies = {
        "storage": (location["storage"], backup["spec"]["properties"]["storage"]),
        "target": (restore["spec"]["properties"]["target"], backup["spec"]["properties"]["target"]),
        "conditions": (
            restore["status"]["properties"]["conditions"],
            backup["status"]["properties"]["conditions"],
        ),
        "drill.ldap": (
            restore["spec"]["properties"]["drill"]["properties"]["ldap"],
            backup["spec"]["properties"]["target"]["properties"]["ldap"],
        ),
    }
    for name, (copy, original) in copies.items():
        assert undescribed(copy) == undescribed(original), name
    # Every object it names follows the rule the operator checks, and the CEL rules use no backslashes.
    nodes = dict(fields(restore["spec"], "spec"))
    names = {p: n for p, n in nodes.items() if p.endswith((".podName", ".claimName", "Ref.name"))}
    # the pod, the PVC, the IdmBackup, the schedule and eight Secrets (two in the drill's LDAP settings)
    assert len(names) == 12
    for node in names.values():
        assert (node["minLength"], node["maxLength"]) == (1, 253)
        assert node["pattern"] == f"^{validation.OBJECT_NAME.pattern}$"
    own = [restore["spec"], restore["spec"]["properties"]["source"]]
    own += [location["directory"]]
    assert all("\\" not in r["rule"] for node in own for r in node["x-kubernetes-validations"])


def test_every_object_name_and_the_deadline_follow_the_rules_the_operator_checks() -> None:
    """The webhook and the start of a backup repeat these rules for CRDs older than them: the same rules."""
    crd = yaml.safe_load((REPO / "crds" / "idm-backup.io_idmbackups.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    nodes = dict(fields(spec, "spec"))
    names = {p: n for p, n in nodes.items() if p.endswith((".podName", ".claimName", "SecretRef.name"))}
    assert len(names) == 7  # the pod, the PVC and five Secrets
    for node in names.values():
        assert (node["minLength"], node["maxLength"]) == (1, 253)
        assert node["pattern"] == f"^{validation.OBJECT_NAME.pattern}$"
    assert nodes["spec.activeDeadlineSeconds"]["maximum"] == validation.MAX_DEADLINE_SECONDS


def test_selector_labels_and_the_region_follow_the_rules_the_operator_checks() -> None:
    crd = yaml.safe_load((REPO / "crds" / "idm-backup.io_idmbackups.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    selector = spec["properties"]["target"]["properties"]["podSelector"]["properties"]
    labels = selector["matchLabels"]
    assert labels["additionalProperties"]["pattern"] == f"^{validation.LABEL_VALUE.pattern}$"
    (rule,) = labels["x-kubernetes-validations"]
    assert f"k.matches('^{validation.LABEL_KEY.pattern}$')" in rule["rule"]
    expression = selector["matchExpressions"]["items"]["properties"]
    assert expression["key"]["pattern"] == f"^{validation.LABEL_KEY.pattern}$"
    assert expression["values"]["items"]["pattern"] == f"^{validation.LABEL_VALUE.pattern}$"
    region = spec["properties"]["storage"]["properties"]["s3"]["properties"]["region"]
    assert (region["pattern"], region["maxLength"]) == (f"^{validation.REGION.pattern}$", 63)
