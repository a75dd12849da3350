"""The API in crds/: every field documented, and the schedule's template identical to IdmBackup's spec."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
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


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_status_has_phase_or_schedule_times_conditions_and_observed_generation(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"conditions", "observedGeneration"} <= set(status)
    assert "phase" in status or "lastScheduleTime" in status


def test_schedule_template_is_the_idmbackup_spec() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sync_crds.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
