"""The documentation: the API reference generated from crds/ and complete, links that lead somewhere, and a
troubleshooting table that names only reasons the operator reports, and every reason a backup fails with.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.deploy import REPO

REFERENCE = REPO / "docs" / "api-reference.md"
CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OPERATOR_SOURCES = sorted((REPO / "operator").rglob("*.py"))

LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.*?) *#* *$")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
# The reference's field tables, {"Kind path": {field: row}}, and its anchors, {anchor: "Kind path"}.
Reference = tuple[dict[str, dict[str, str]], dict[str, str]]


def without_fences(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


def without_code(markdown: str) -> str:
    """The text outside fenced code blocks and code spans, where links live."""
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", without_fences(markdown))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    found = set(EXPLICIT_ANCHOR.findall(text))
    seen: Counter[str] = Counter()
    for line in without_fences(text).splitlines():
        if match := HEADING.match(line):
            slug = github_slug(match[2])
            found.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return found


# -- the API reference -----------------------------------------------------------------------------------


def test_api_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_api_reference.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def reference_sections() -> Reference:
    sections: dict[str, dict[str, str]] = {}
    by_anchor: dict[str, str] = {}
    current = ""
    for line in REFERENCE.read_text().splitlines():
        if match := HEADING.match(line):
            current = re.sub(r"<[^>]+>", "", match[2]).replace("`", "")
            sections[current] = {}
            by_anchor.update((a, current) for a in EXPLICIT_ANCHOR.findall(match[2]))
        elif field := re.match(r"\| `([^`]+)` \|", line):
            sections[current][field[1]] = line
    return sections, by_anchor


def missing_fields(schema: dict[str, Any], section: str, reference: Reference, path: str) -> Iterator[str]:
    """The fields under `schema` without a row in `section`, following each object field's link to its own
    section (for a copied schema, such as the schedule's template, the section of the original)."""
    sections, by_anchor = reference
    for name, sub in (schema.get("properties") or {}).items():
        row = sections.get(section, {}).get(name)
        if row is None:
            yield f"{path}.{name} (no row in the section {section!r})"
            continue
        items = sub.get("items") if sub.get("type") == "array" else None
        level = items if isinstance(items, dict) and items.get("properties") else sub
        if not level.get("properties"):
            continue
        link = re.search(r"\]\(#([^)]+)\)", row)
        if link is None or link[1] not in by_anchor:
            yield f"{path}.{name} (its row does not link to a section)"
            continue
        yield from missing_fields(level, by_anchor[link[1]], reference, f"{path}.{name}")


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_crd_field_is_in_the_api_reference(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    kind = crd["spec"]["names"]["kind"]
    reference = reference_sections()
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert list(missing_fields(schema, kind, reference, kind)) == []


def test_the_reference_links_the_schedule_template_to_the_idmbackup_spec() -> None:
    sections, by_anchor = reference_sections()
    link = re.search(r"\]\(#([^)]+)\)", sections["IdmBackupSchedule spec.template"]["spec"])
    assert link is not None and by_anchor[link[1]] == "IdmBackup spec"
    # The one difference scripts/sync_crds.py makes: a template is edited, a created IdmBackup is not.
    assert "Not checked here: spec is immutable" in REFERENCE.read_text()


# -- links -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_lead_to_files_and_anchors_that_exist(doc: Path) -> None:
    broken = []
    for target in LINK.findall(without_code(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:: not checked here (no network)
        file_part, _, fragment = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
            broken.append(f"{target}: no such anchor")
    assert broken == []


def test_github_slugs_are_computed_as_github_does() -> None:
    assert github_slug("GitOps (Argo CD)") == "gitops-argo-cd"
    assert github_slug("S3-compatible storage (Ceph RGW, versitygw, Garage, ...)") == (
        "s3-compatible-storage-ceph-rgw-versitygw-garage-"
    )
    assert github_slug("The local platform (`testbed/`)") == "the-local-platform-testbed"
    assert github_slug('<a id="x"></a>IdmBackup `spec`') == "idmbackup-spec"


# -- troubleshooting -------------------------------------------------------------------------------------


def troubleshooting_names() -> list[str]:
    """The reasons, conditions and events named in the first column of the README's troubleshooting table."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])]


def operator_source() -> str:
    return "\n".join(path.read_text() for path in OPERATOR_SOURCES)


def test_every_reason_in_the_troubleshooting_table_exists_in_the_operator() -> None:
    names = troubleshooting_names()
    assert len(names) > 20
    source = operator_source()
    invented = [name for name in names if not re.search(rf"[\"']{re.escape(name)}[\"']", source)]
    assert invented == []


def test_every_failure_reason_of_a_backup_is_in_the_troubleshooting_table() -> None:
    source = operator_source()
    reasons = set(re.findall(r"BackupFailed\(\s*\"(\w+)\"", source))
    reasons |= set(re.findall(r"_fail\(\s*report,\s*status,\s*\"(\w+)\"", source))
    assert {"TargetUnavailable", "IpaBackupFailed", "InvalidSpec", "InternalError"} <= reasons
    assert sorted(reasons - set(troubleshooting_names())) == []


def test_every_failure_reason_of_a_restore_is_in_the_troubleshooting_section() -> None:
    source = (REPO / "operator" / "idm_backup_operator" / "idmrestore" / "pipeline.py").read_text()
    reasons = set(re.findall(r"RestoreFailed\(\s*\"(\w+)\"", source))
    for chosen in re.findall(r"reason = \"(\w+)\" if .* else \"(\w+)\"", source):
        reasons |= set(chosen)
    assert {"ConfirmationMismatch", "ArchiveInvalid", "RestoreIncomplete", "StagingFailed"} <= reasons
    assert sorted(reasons - set(troubleshooting_names())) == []


def _architecture_rows() -> list[tuple[str, list[str]]]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("layer", "---"):
            rows.append((cells[0].strip("`"), re.findall(r"`([\w/.]+\.py)`", cells[1])))
    return rows


def test_the_architecture_section_names_every_module_once_in_its_layer() -> None:
    package = REPO / "operator" / "idm_backup_operator"
    on_disk = {
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "__init__.py" or p.parent == package
    } - {"__init__.py"}
    named: list[str] = []
    for layer, modules in _architecture_rows():
        folder = layer if layer.endswith("/") else ""
        named += [folder + m for m in modules]
    assert sorted(named) == sorted(on_disk), "README's Architecture table and the package's modules differ"


def test_the_architecture_layers_are_the_import_contracts_layers() -> None:
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    expected = []
    for layer in layers:
        names = [n.strip().removeprefix("idm_backup_operator.") for n in layer.split("|")]
        packages = [(REPO / "operator" / "idm_backup_operator" / name).is_dir() for name in names]
        if len(names) > 1 and not any(packages):
            expected.append("utilities")
        else:
            # Independent packages of one layer get a row each, in the contract's order.
            expected += [
                name + ("/" if package else ".py") for name, package in zip(names, packages, strict=True)
            ]
    documented = [layer for layer, _ in _architecture_rows()]
    assert documented == expected
    # The utilities row holds exactly the modules of the contract's bottom layer.
    utilities = dict(_architecture_rows())["utilities"]
    assert sorted(utilities) == sorted(n.strip().split(".")[-1] + ".py" for n in layers[-1].split("|"))
