"""Keep IdmBackupSchedule's template.spec schema identical to IdmBackup's spec schema.

The schedule's template is an IdmBackup spec, and the API server should refuse a bad template when the
schedule is applied, not at 02:00 when its first backup is created. So the schema is embedded, and this
script is the only thing that writes that part. `--check` fails if the two have drifted apart.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).resolve().parent.parent / "crds"
BACKUP = CRDS / "idm-backup.io_idmbackups.yaml"
SCHEDULE = CRDS / "idm-backup.io_idmbackupschedules.yaml"
IMMUTABLE_RULE = "self == oldSelf"


def template_spec_schema() -> dict[str, Any]:
    backup = yaml.safe_load(BACKUP.read_text())
    spec = copy.deepcopy(backup["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])
    # A created IdmBackup is immutable; the schedule's template is meant to be edited.
    rules = spec["x-kubernetes-validations"]
    spec["x-kubernetes-validations"] = [r for r in rules if r["rule"] != IMMUTABLE_RULE]
    spec["description"] = "The spec of each IdmBackup created; the same fields as IdmBackup's spec."
    return spec


def synced_schedule() -> tuple[dict[str, Any], dict[str, Any]]:
    schedule = yaml.safe_load(SCHEDULE.read_text())
    schedule_spec = schedule["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    template = schedule_spec["properties"]["template"]
    current = copy.deepcopy(schedule)
    template["properties"]["spec"] = template_spec_schema()
    return current, schedule


def main() -> int:
    current, wanted = synced_schedule()
    if "--check" in sys.argv[1:]:
        if current != wanted:
            print(f"{SCHEDULE.name} is out of date: run python scripts/sync_crds.py", file=sys.stderr)
            return 1
        return 0
    SCHEDULE.write_text(yaml.safe_dump(wanted, sort_keys=False, width=110, allow_unicode=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
