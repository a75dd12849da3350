"""Write docs/api-reference.md from the CustomResourceDefinitions in crds/, the single source of truth.

Each kind gets a section per object level (spec, spec.target, ..., status.conditions[]) with a table of its
fields: type and constraints, whether it is required, and the CRD's description. The CEL rules are listed
at the level they apply to, and the columns of `kubectl get` with the kind. A schema copied from IdmBackup
by scripts/sync_crds.py (IdmBackupSchedule's spec.template.spec, IdmRestore's spec.target, ...) links
there instead of being expanded twice, and says how the copy differs. The output depends on nothing but
crds/ (and sync_crds.py's list of what it copies). `--check` fails if docs/api-reference.md is not what
this script would write.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sync_crds import EMBEDDINGS, ORIGINAL_KIND

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"
REFERENCE = REPO / "docs" / "api-reference.md"
Schema = Mapping[str, Any]

# A field whose schema is a copy of another kind's level (scripts/sync_crds.py's embeddings): documented
# there, linked from here.
MIRRORS = {(e.kind, e.path): (ORIGINAL_KIND, e.original) for e in EMBEDDINGS}

# Schema keywords shown in the type column, as `keyword value` (flags: the keyword alone when true).
CONSTRAINTS = (
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-map-type",
)
RENDERED = {
    *CONSTRAINTS,
    "type",
    "format",
    "description",
    "enum",
    "pattern",
    "default",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
}
# Keywords of apiextensions.k8s.io/v1 JSONSchemaProps that this script does not render (yet).
NOT_RENDERED = {
    "id",
    "$schema",
    "$ref",
    "title",
    "allOf",
    "oneOf",
    "anyOf",
    "not",
    "patternProperties",
    "dependencies",
    "additionalItems",
    "definitions",
    "externalDocs",
    "example",
}


class Unsupported(Exception):
    """The CRDs use something this script cannot document faithfully."""


@dataclass(frozen=True)
class Kind:
    name: str
    crd: Mapping[str, Any]
    version: Mapping[str, Any]
    path: Path

    @property
    def schema(self) -> Schema:
        schema: Schema = self.version["schema"]["openAPIV3Schema"]
        return schema


def load_kinds() -> list[Kind]:
    kinds = []
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        versions = crd["spec"]["versions"]
        if len(versions) != 1:
            raise Unsupported(f"{path.name} has {len(versions)} versions: anchors would need the version")
        kinds.append(Kind(crd["spec"]["names"]["kind"], crd, versions[0], path))
    return kinds


# -- markdown --------------------------------------------------------------------------------------------


def prose(text: str) -> str:
    """A description as one line of markdown: folded whitespace collapsed, markup characters escaped."""
    text = " ".join(text.split())
    for char in "\\`<>[]":
        text = text.replace(char, "\\" + char)
    return text


def code(value: Any) -> str:
    """A code span that survives backticks in the value; non-strings as JSON (`true`, `{}`)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    ticks = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def cell(text: str) -> str:
    # GitHub's tables split on every unescaped pipe, in code spans too; there it drops the backslash.
    return text.replace("|", "\\|")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def anchor(kind: str, path: str) -> str:
    return "-".join([kind, *path.replace("[]", "").split(".")]).lower() if path else kind.lower()


def relative(path: Path) -> str:
    """A link from the reference to a file of the repository."""
    return Path(os.path.relpath(path, REFERENCE.parent)).as_posix()


# -- schemas ---------------------------------------------------------------------------------------------


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def is_level(schema: Schema) -> bool:
    return schema.get("type") == "object" and bool(schema.get("properties"))


def levels(kind: str, schema: Schema, path: str = "", about: str = "") -> Iterator[tuple[str, Schema, str]]:
    """Every object with fields, depth first in the CRD's order, as (path, schema, description).

    An array's items are the level `x[]`, described by the array when they have no description of their own.
    """
    if is_level(schema):
        yield path, schema, schema.get("description", about)
        for name, sub in schema["properties"].items():
            if (kind, join(path, name)) not in MIRRORS:
                yield from levels(kind, sub, join(path, name))
    elif schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        yield from levels(kind, schema["items"], path + "[]", schema.get("description", about))


def unknown_keywords(kind: str, schema: Schema, path: str = "") -> Iterator[str]:
    for key in schema:
        if key in NOT_RENDERED:
            raise Unsupported(f"{kind} {path or '(root)'}: {key} is not rendered; extend this script")
        if key not in RENDERED:
            yield (
                f"{kind} {path or '(root)'}: {key!r} is not a schema keyword (not rendered); the API "
                "server's strict field validation refuses it"
            )
    for name, sub in (schema.get("properties") or {}).items():
        yield from unknown_keywords(kind, sub, join(path, name))
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), dict):
            yield from unknown_keywords(kind, schema[key], path + suffix)


def type_of(kind: str, schema: Schema, path: str) -> str:
    if (kind, path) in MIRRORS:
        other, other_path = MIRRORS[kind, path]
        return f"{schema.get('type', 'object')}: [{other} {other_path}](#{anchor(other, other_path)})"
    kind_of = schema.get("type")
    if kind_of == "array" and isinstance(schema.get("items"), dict):
        return "array of " + type_of(kind, schema["items"], path + "[]")
    if kind_of == "object" and isinstance(schema.get("additionalProperties"), dict):
        values = schema["additionalProperties"]
        if is_level(values):
            raise Unsupported(f"{kind} {path}: maps of objects are not rendered")
        return "map of " + type_of(kind, values, path + "{}")
    if is_level(schema):
        return f"[object](#{anchor(kind, path)})"
    if kind_of is None:
        return "any" if schema.get("x-kubernetes-int-or-string") is None else "integer or string"
    return f"{kind_of} ({schema['format']})" if "format" in schema else str(kind_of)


def constraints(schema: Schema) -> list[str]:
    found = []
    if "enum" in schema:
        found.append("one of " + ", ".join(code(v) for v in schema["enum"]))
    if "pattern" in schema:
        found.append("pattern " + code(schema["pattern"]))
    for key in CONSTRAINTS:
        value = schema.get(key)
        if value is True:
            found.append(key)
        elif value is not None and value is not False:
            found.append(f"{key} {code(value)}")
    if "x-kubernetes-list-type" in schema:
        keys = schema.get("x-kubernetes-list-map-keys")
        by = f", keyed by {', '.join(code(k) for k in keys)}" if keys else ""
        found.append(f"list type {code(schema['x-kubernetes-list-type'])}{by}")
    if "default" in schema:
        found.append("default " + code(schema["default"]))
    return found


def field_row(kind: str, level: Schema, name: str, path: str) -> tuple[str, ...]:
    schema: Schema = level["properties"][name]
    types = "; ".join([type_of(kind, schema, path), *constraints(schema)])
    required = "yes" if name in level.get("required", ()) else "no"
    description = prose(schema.get("description", ""))
    if not description and path == "metadata":
        description = "Standard Kubernetes object metadata (name, namespace, labels, ...)."
    return (code(name), types, required, description)


def rule_line(rule: Mapping[str, Any], field: str = "") -> str:
    if "message" in rule:
        message = prose(rule["message"])
    else:
        message = "messageExpression " + code(rule["messageExpression"])
    where = f"{code(field)}: " if field else ""
    return f"- {where}{message} (rule: {code(rule['rule'])})"


def rules(kind: str, level: Schema, path: str) -> list[str]:
    """The level's own rules, then its fields' that have no section of their own."""
    lines = [rule_line(r) for r in level.get("x-kubernetes-validations", ())]
    for name, sub in level["properties"].items():
        if (kind, join(path, name)) in MIRRORS:
            continue
        on_field = [] if is_level(sub) else list(sub.get("x-kubernetes-validations", ()))
        if sub.get("type") == "array" and isinstance(sub.get("items"), dict) and not is_level(sub["items"]):
            on_field += sub["items"].get("x-kubernetes-validations", ())
        lines += [rule_line(r, name) for r in on_field]
    return lines


def differences(original: Schema, copy: Schema, where: str) -> Iterator[str]:
    """How `copy` differs from `original`, as markdown list items; top-level descriptions are not compared."""
    old_rules = {r["rule"]: r for r in original.get("x-kubernetes-validations", ())}
    new_rules = {r["rule"]: r for r in copy.get("x-kubernetes-validations", ())}
    for rule, entry in old_rules.items():
        if rule not in new_rules:
            yield f"- Not checked here: {rule_line(entry)[2:]}"
        elif new_rules[rule] != entry:
            yield f"- Another message here for the rule {code(rule)}: {rule_line(new_rules[rule])[2:]}"
    for rule, entry in new_rules.items():
        if rule not in old_rules:
            yield f"- Checked only here: {rule_line(entry)[2:]}"
    yield from _schema_differences(original, copy, where, top=True)


def _schema_differences(original: Schema, copy: Schema, where: str, *, top: bool = False) -> Iterator[str]:
    skip = {"description", "x-kubernetes-validations"} if top else set()
    for key in [*original, *(k for k in copy if k not in original)]:
        if key in skip:
            continue
        old, new = original.get(key), copy.get(key)
        if key == "properties" and isinstance(old, dict) and isinstance(new, dict):
            for name in [*old, *(n for n in new if n not in old)]:
                if name not in new:
                    yield f"- {code(join(where, name))} is missing here"
                elif name not in old:
                    yield f"- {code(join(where, name))} exists only here"
                else:
                    yield from _schema_differences(old[name], new[name], join(where, name))
        elif key == "items" and isinstance(old, dict) and isinstance(new, dict):
            yield from _schema_differences(old, new, where + "[]")
        elif old != new:
            yield f"- {code(where)}: {key} is {code(new)} here, {code(old)} there"


# -- the document ----------------------------------------------------------------------------------------


def level_section(
    kinds: Mapping[str, Kind], kind: Kind, path: str, level: Schema, description: str
) -> list[str]:
    lines = []
    if path:
        lines += [f'### <a id="{anchor(kind.name, path)}"></a>{kind.name} {code(path)}', ""]
        if description:
            lines += [prose(description), ""]
    else:
        lines += ["Top-level fields:", ""]
    rows = [field_row(kind.name, level, name, join(path, name)) for name in level["properties"]]
    lines += [*table(("Field", "Type", "Required", "Description"), rows), ""]
    checks = rules(kind.name, level, path)
    if checks:
        lines += ["Validation rules (CEL), checked by the API server when the object is applied:", ""]
        lines += [*checks, ""]
    for name in level["properties"]:
        if (kind.name, join(path, name)) in MIRRORS:
            lines += mirror_note(kinds, kind, join(path, name), level["properties"][name])
    return lines


def field_at(kinds: Mapping[str, Kind], kind: str, path: str) -> Schema:
    schema: Schema = kinds[kind].schema if kind in kinds else {}
    for name in path.split("."):
        schema = (schema.get("properties") or {}).get(name) or {}
    if not schema:
        raise Unsupported(f"MIRRORS names {kind} {path}, which the CRDs do not have")
    return schema


def mirror_note(kinds: Mapping[str, Kind], kind: Kind, path: str, copy: Schema) -> list[str]:
    other, other_path = MIRRORS[kind.name, path]
    original = field_at(kinds, other, other_path)
    found = list(differences(original, copy, other_path))
    link = f"[{other} {code(other_path)}](#{anchor(other, other_path)})"
    lines = [
        f"{code(path.rsplit('.', 1)[-1])} has the schema of {link}, copied from there by "
        f"[scripts/sync_crds.py]({relative(REPO / 'scripts' / 'sync_crds.py')}), and is not repeated here.",
    ]
    if found:
        lines[0] += " Compared with that section:"
        lines += ["", *found]
    else:
        lines[0] += " The two are identical."
    return [*lines, ""]


def columns_section(kind: Kind) -> list[str]:
    printed = kind.version.get("additionalPrinterColumns") or []
    if not printed:
        return []
    described = any("description" in c for c in printed)
    header = ("Column", "Type", "JSONPath", "Shown") + (("Description",) if described else ())
    rows = []
    for column in printed:
        shown = "always" if not column.get("priority") else "with `-o wide`"
        row = (column["name"], column["type"], code(column["jsonPath"]), shown)
        rows.append(row + ((prose(column.get("description", "")),) if described else ()))
    return [f"Columns of `kubectl get {kind.crd['spec']['names']['plural']}`:", "", *table(header, rows), ""]


def kind_section(kinds: Mapping[str, Kind], kind: Kind) -> list[str]:
    spec, names = kind.crd["spec"], kind.crd["spec"]["names"]
    facts = [
        f"- API version: {code(spec['group'] + '/' + kind.version['name'])}, {spec['scope'].lower()}",
        f"- Names: {code(names['plural'])}, {code(names['singular'])}"
        + "".join(f", {code(n)}" for n in names.get("shortNames", ())),
    ]
    if names.get("categories"):
        facts.append(f"- Categories: {', '.join(code(c) for c in names['categories'])}")
    if kind.version.get("subresources"):
        facts.append(f"- Subresources: {', '.join(code(s) for s in kind.version['subresources'])}")
    facts.append(f"- Defined in [{kind.path.relative_to(REPO).as_posix()}]({relative(kind.path)})")
    lines = [f'## <a id="{anchor(kind.name, "")}"></a>{kind.name}', ""]
    lines += [prose(kind.schema.get("description", "")), "", *facts, ""]
    sections = list(levels(kind.name, kind.schema))
    links = [f"[{code(path)}](#{anchor(kind.name, path)})" for path, _, _ in sections if path]
    lines += ["Sections: " + ", ".join(links), ""]
    root, *below = sections
    lines += level_section(kinds, kind, *root)
    lines += columns_section(kind)
    for section in below:
        lines += level_section(kinds, kind, *section)
    return lines


def render(kinds: list[Kind]) -> str:
    by_name = {k.name: k for k in kinds}
    for mirror, original in MIRRORS.items():
        field_at(by_name, *mirror), field_at(by_name, *original)
    anchors = [anchor(k.name, p) for k in kinds for p, _, _ in levels(k.name, k.schema)]
    if len(set(anchors)) != len(anchors):
        shared = sorted({a for a in anchors if anchors.count(a) > 1})
        raise Unsupported(f"sections would share the anchors {shared}")
    lines = [
        "<!-- Generated from crds/ by scripts/gen_api_reference.py. Do not edit: run "
        "`python scripts/gen_api_reference.py`. -->",
        "",
        "# API reference",
        "",
        f"Generated from the CustomResourceDefinitions in [crds/]({relative(CRDS)}/), the single source of "
        "truth for the API; `kubectl explain` shows the same descriptions. Each object level has a section. "
        "Required fields must be set; the API server fills in defaults when the object is created.",
        "",
        *(f"- [{k.name}](#{anchor(k.name, '')})" for k in kinds),
        "",
    ]
    for kind in kinds:
        lines += kind_section(by_name, kind)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    try:
        kinds = load_kinds()
        warnings = [w for k in kinds for w in unknown_keywords(k.name, k.schema)]
        wanted = render(kinds)
    except Unsupported as err:
        print(f"{Path(__file__).name}: {err}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    name = REFERENCE.relative_to(REPO)
    if "--check" in sys.argv[1:]:
        if not REFERENCE.exists() or REFERENCE.read_text() != wanted:
            print(f"{name} is out of date: run python scripts/gen_api_reference.py", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
