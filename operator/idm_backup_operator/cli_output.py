"""What the command line prints, kept apart from what it does (cli.py): tables and `describe` text, the
JSON/YAML documents of `-o json|yaml`, progress, and the shell completion scripts generated from the parser.

Nothing here talks to Kubernetes or to a store. Every value that comes from a resource, a manifest or an
Event passes through `clean` before it reaches a terminal (tables, describe, progress lines, errors):
control characters are shown escaped, never sent. JSON and YAML escape them themselves. Documents have
the same keys whatever the object holds (null when unknown), and sizes in bytes; text has human units.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import rich.console
import rich.markup
import rich.progress
import yaml

from idm_backup_operator.api.names import (
    IDMBACKUP,
    IDMBACKUPSCHEDULE,
    IDMRESTORE,
    MANUAL_ANNOTATION,
    SCHEDULE_LABEL,
)
from idm_backup_operator.api.phase import Phase
from idm_backup_operator.archive import verify
from idm_backup_operator.streams import human_size

PROGRESS_INTERVAL = 30.0  # seconds between plain progress lines while nothing changes


# -- text for a terminal --------------------------------------------------------------------------------

# C0 and C1 controls (ESC starts terminal sequences, CSI is one byte in C1), DEL, and the bidirectional
# overrides that make text read differently than it is stored.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(value: Any, *, newlines: bool = False) -> str:
    """Text fit for a terminal: every control character shown escaped (\\x1b), never sent as is."""
    text = "" if value is None else str(value)

    def escape(match: re.Match[str]) -> str:
        char = match[0]
        if newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _UNSAFE.sub(escape, text)


def render_table(rows: Sequence[Sequence[Any]]) -> str:
    cells = [[clean(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def render_fields(pairs: Sequence[tuple[str, Any]], indent: str = "") -> list[str]:
    """`Label:  value` lines, aligned as kubectl describe aligns them; a multi-line value is indented."""
    width = max(len(label) for label, _ in pairs) + 2
    lines = []
    for label, value in pairs:
        text = clean(value if value not in (None, "") else "<none>", newlines=True)
        first, *rest = text.split("\n")
        lines.append(f"{indent}{label + ':':<{width}}{first}".rstrip())
        lines += [f"{indent}{'':<{width}}{line}".rstrip() for line in rest]
    return lines


def human_or_blank(size: Any) -> str:
    return human_size(size) if isinstance(size, int) and not isinstance(size, bool) else ""


def emit_document(document: Any, fmt: str) -> None:
    """One JSON or YAML document on stdout; JSON and YAML escape control characters themselves."""
    if fmt == "json":
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=False))


def parse_time(value: Any) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def short_duration(seconds: float) -> str:
    """3s, 5m12s, 2h05m, 3d4h: as kubectl shows ages."""
    total = max(0, int(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600}h"


def age_of(value: Any, now: datetime.datetime | None = None) -> str:
    moment = parse_time(value)
    if moment is None:
        return ""
    return short_duration(((now or datetime.datetime.now(datetime.UTC)) - moment).total_seconds())


def transfer_detail(done: int, total: int | None, seconds: float) -> str:
    """`1.0 GiB of 4.0 GiB (25%), 100.0 MiB/s, about 31s left`: what is known of it."""
    text = human_size(done)
    if total:
        text += f" of {human_size(total)} ({min(100, done * 100 // total)}%)"
    if seconds >= 0.5 and done:
        rate = done / seconds
        text += f", {human_size(int(rate))}/s"
        if total and done < total:
            text += f", about {short_duration((total - done) / rate)} left"
    return text


class Progress:
    """What a long command is doing: live on a terminal (a rich progress bar), plain lines otherwise.

    A plain line is printed, and flushed, when the step changes, when a transfer ends, and every
    `interval` seconds in between. Safe to call from several threads (gpg's feeder reads in its own).
    """

    def __init__(
        self, stream: TextIO | None, *, live: bool | None = None, interval: float = PROGRESS_INTERVAL
    ):
        self.stream = stream
        self.live = bool(stream is not None and (stream.isatty() if live is None else live))
        self.interval = interval
        self._lock = threading.Lock()
        self._start = self._step_start = self._printed = time.monotonic()
        self._step = ""
        self._bytes: tuple[int, int | None] | None = None
        self._bar: rich.progress.Progress | None = None
        if self.live:
            self._bar = rich.progress.Progress(
                rich.progress.SpinnerColumn(),
                rich.progress.TextColumn("{task.description}"),
                rich.progress.BarColumn(bar_width=20),
                rich.progress.TextColumn("{task.fields[detail]}"),
                rich.progress.TimeElapsedColumn(),
                console=rich.console.Console(file=stream, force_terminal=True),
                transient=True,
            )
            self._task = self._bar.add_task("", total=None, detail="")
            self._bar.start()

    def step(self, text: str) -> None:
        with self._lock:
            if text == self._step:
                return
            self._step, self._bytes = text, None
            self._step_start = time.monotonic()
            if self._bar is not None:
                self._bar.update(
                    self._task,
                    description=rich.markup.escape(clean(text)),
                    total=None,
                    completed=0,
                    detail="",
                )
            else:
                self._line()

    def transferred(self, done: int, total: int | None) -> None:
        with self._lock:
            if self._bytes is not None and self._bytes[0] == done:
                return  # nothing new: a read at the end of the file
            self._bytes = (done, total)
            detail = transfer_detail(done, total, time.monotonic() - self._step_start)
            if self._bar is not None:
                self._bar.update(self._task, total=total, completed=done, detail=detail)
            elif done == total or time.monotonic() - self._printed >= self.interval:
                self._line()

    def tick(self) -> None:
        """While nothing changes: a plain line every `interval` seconds, so a log shows it is alive."""
        with self._lock:
            if self._bar is None and self._step and time.monotonic() - self._printed >= self.interval:
                self._line()

    def _line(self) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        text = f"[{short_duration(now - self._start):>6}] {clean(self._step)}"
        if self._bytes is not None:
            text += ": " + transfer_detail(*self._bytes, now - self._step_start)
        print(text, file=self.stream, flush=True)
        self._printed = now

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_stream(fmt: str) -> TextIO | None:
    """Progress goes with the human output on stdout; with -o json|yaml stdout holds only the document,
    and progress goes to stderr if that is a terminal."""
    if fmt not in ("json", "yaml"):
        return sys.stdout
    return sys.stderr if sys.stderr.isatty() else None


def one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


def event_lines(events: Sequence[Mapping[str, Any]]) -> list[str]:
    if not events:
        return ["Events:  <none>"]
    rows = [["TYPE", "REASON", "AGE", "FROM", "MESSAGE"]]
    for e in events:
        age = age_of(e["lastTimestamp"]) + (f" (x{e['count']})" if e["count"] > 1 else "")
        rows.append([e["type"], e["reason"], age, e["source"], e["message"]])
    return ["Events:", *("  " + line for line in render_table(rows).splitlines())]


def condition_list(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
        for c in status.get("conditions") or []
    ]


def condition_lines(conditions: Sequence[Mapping[str, Any]]) -> list[str]:
    if not conditions:
        return ["Conditions:  <none>"]
    rows = [["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]]
    rows += [
        [c["type"], c["status"], c["reason"], age_of(c["lastTransitionTime"]), c["message"]]
        for c in conditions
    ]
    return ["Conditions:", *("  " + line for line in render_table(rows).splitlines())]


# -- documents: what -o json|yaml prints, and the same as text ------------------------------------------


def backup_summary(item: Mapping[str, Any]) -> dict[str, Any]:
    """An IdmBackup as `list -o json` prints it: the same keys for every backup, sizes in bytes."""
    meta, spec, status = item["metadata"], item.get("spec") or {}, item.get("status") or {}
    archive = status.get("archive") or {}
    return {
        "namespace": meta["namespace"],
        "name": meta["name"],
        "schedule": (meta.get("labels") or {}).get(SCHEDULE_LABEL),
        "type": spec.get("type") or "Full",
        "phase": status.get("phase") or Phase.PENDING.value,
        "step": status.get("step"),
        "reason": status.get("reason"),
        "message": status.get("message"),
        "host": (status.get("target") or {}).get("host"),
        "createdAt": meta.get("creationTimestamp"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "durationSeconds": status.get("durationSeconds"),
        "sizeBytes": archive.get("sizeBytes"),
        "archiveURI": archive.get("uri"),
        "encrypted": archive.get("encrypted"),
        "recipients": list(archive.get("recipients") or []),
    }


def backups_table(backups: Sequence[Mapping[str, Any]], *, wide: bool, namespaces: bool) -> str:
    header = ["NAME", "PHASE", "TYPE", "SIZE", "COMPLETED", "ARCHIVE"]
    header += ["HOST", "STEP", "REASON", "RECIPIENTS", "MESSAGE"] if wide else []
    rows = [["NAMESPACE", *header] if namespaces else header]
    for b in backups:
        row = [b["name"], b["phase"], b["type"], human_or_blank(b["sizeBytes"]), b["completionTime"] or ""]
        row.append(b["archiveURI"] or b["reason"] or "")
        if wide:
            row += [b["host"], b["step"], b["reason"], ",".join(b["recipients"]), b["message"]]
        rows.append([b["namespace"], *row] if namespaces else row)
    return render_table(rows)


def stored_summary(backup: verify.StoredBackup) -> dict[str, Any]:
    """A stored backup as `list --storage -o json` prints it, from its manifest."""
    manifest = backup.manifest or {}
    resource = manifest.get("resource") or {}
    archive = (manifest.get("files") or {}).get("archive") or {}
    encryption = archive.get("encryption") or {}
    return {
        "directory": backup.directory,
        "type": (manifest.get("header") or {}).get("type"),
        "host": (manifest.get("server") or {}).get("host"),
        "createdAt": manifest.get("createdAt"),
        "sizeBytes": archive.get("size"),
        "plaintextSizeBytes": (archive.get("plaintext") or {}).get("size"),
        "encrypted": bool(encryption) if backup.manifest is not None else None,
        "recipients": list(encryption.get("recipients") or []),
        "resource": {k: resource.get(k) for k in ("namespace", "name", "uid")},
        "operatorVersion": manifest.get("operatorVersion"),
        "problem": backup.problem,
    }


def stored_table(found: Sequence[Mapping[str, Any]], *, wide: bool) -> str:
    rows = [["DIRECTORY", "TYPE", "HOST", "CREATED", "SIZE", "IDMBACKUP"] + (["RECIPIENTS"] if wide else [])]
    for b in found:
        if b["problem"]:
            rows.append([b["directory"], "", "", "", "", b["problem"]] + ([""] if wide else []))
            continue
        resource = f"{b['resource']['namespace']}/{b['resource']['name']}"
        row = [b["directory"], b["type"], b["host"], b["createdAt"], human_or_blank(b["sizeBytes"]), resource]
        rows.append(row + ([",".join(b["recipients"])] if wide else []))
    return render_table(rows)


def describe_backup(
    obj: Mapping[str, Any], events: list[dict[str, Any]], files: dict[str, Any]
) -> dict[str, Any]:
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    target, archive = status.get("target") or {}, status.get("archive") or {}
    return {
        "kind": IDMBACKUP,
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta["uid"],
        "createdAt": meta.get("creationTimestamp"),
        "schedule": (meta.get("labels") or {}).get(SCHEDULE_LABEL),
        "manual": (meta.get("annotations") or {}).get(MANUAL_ANNOTATION) == "true",
        "type": spec.get("type") or "Full",
        "online": bool(spec.get("online")),
        "phase": status.get("phase") or Phase.PENDING.value,
        "step": status.get("step"),
        "reason": status.get("reason"),
        "message": status.get("message"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "durationSeconds": status.get("durationSeconds"),
        "target": {k: target.get(k) for k in ("pod", "container", "host", "realm")},
        "archive": {
            "uri": archive.get("uri"),
            "headerURI": archive.get("headerURI"),
            "manifestURI": archive.get("manifestURI"),
            "sizeBytes": archive.get("sizeBytes"),
            "sha256": archive.get("sha256"),
            "plaintextSizeBytes": archive.get("plaintextSizeBytes"),
            "plaintextSHA256": archive.get("plaintextSHA256"),
            "encrypted": archive.get("encrypted"),
            "recipients": list(archive.get("recipients") or []),
        },
        "conditions": condition_list(status),
        "storedFiles": files,
        "events": events,
    }


def with_age(value: Any) -> str | None:
    return f"{value} ({age_of(value)} ago)" if parse_time(value) else value


def backup_text(d: Mapping[str, Any]) -> list[str]:
    target, archive, files = d["target"], d["archive"], d["storedFiles"]
    took = f", took {short_duration(d['durationSeconds'])}" if d["durationSeconds"] is not None else ""
    lines = render_fields(
        [
            ("Name", d["name"]),
            ("Namespace", d["namespace"]),
            ("UID", d["uid"]),
            ("Created", with_age(d["createdAt"])),
            ("Schedule", (d["schedule"] or "") + (" (backup-now)" if d["manual"] else "")),
            ("Type", d["type"] + (", online" if d["online"] else "")),
            ("Phase", d["phase"]),
            ("Step", d["step"]),
            ("Reason", d["reason"]),
            ("Message", d["message"]),
            ("Started", with_age(d["startTime"])),
            ("Completed", (with_age(d["completionTime"]) or "") + took if d["completionTime"] else None),
            ("Target", ", ".join(f"{k} {v}" for k, v in target.items() if v)),
        ]
    )
    if archive["uri"]:
        plain = human_or_blank(archive["plaintextSizeBytes"])
        lines += [
            "Archive:",
            *render_fields(
                [
                    ("URI", archive["uri"]),
                    (
                        "Size",
                        f"{human_or_blank(archive['sizeBytes'])} stored"
                        + (f", {plain} before encryption" if plain else ""),
                    ),
                    ("SHA-256", archive["sha256"]),
                    (
                        "Encrypted to",
                        "\n".join(archive["recipients"]) if archive["encrypted"] else "not encrypted",
                    ),
                ],
                "  ",
            ),
        ]
    lines.append(f"Stored files:  {clean(files['location'] or '<unknown>')}")
    if files["files"]:
        rows = [["NAME", "STORED", "SIZE", "MANIFEST SAYS", "SHA-256 (MANIFEST)"]]
        for f in files["files"]:
            rows.append(
                [
                    f["name"],
                    "yes" if f["stored"] else "MISSING",
                    human_or_blank(f["sizeBytes"]),
                    human_or_blank(f["manifestSizeBytes"]),
                    f["manifestSHA256"] or "",
                ]
            )
        lines += ["  " + line for line in render_table(rows).splitlines()]
    manifest = files["manifest"]
    if manifest:
        owner = (
            "this IdmBackup"
            if manifest["ownedByThisBackup"]
            else f"ANOTHER resource (uid {manifest['resourceUID']})"
        )
        written = f"written {manifest['createdAt']} by operator {manifest['operatorVersion']}"
        lines.append(clean(f"  manifest: {written}, for {owner}"))
    if files["problem"]:
        lines.append(f"  {clean(files['problem'])}")
    return lines + condition_lines(d["conditions"]) + event_lines(d["events"])


def describe_schedule(
    obj: Mapping[str, Any], events: list[dict[str, Any]], backups: list[dict[str, Any]]
) -> dict[str, Any]:
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    return {
        "kind": IDMBACKUPSCHEDULE,
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta["uid"],
        "createdAt": meta.get("creationTimestamp"),
        "schedule": spec.get("schedule"),
        "timeZone": spec.get("timeZone"),
        "suspend": bool(spec.get("suspend")),
        "concurrencyPolicy": spec.get("concurrencyPolicy"),
        "startingDeadlineSeconds": spec.get("startingDeadlineSeconds"),
        "retention": dict(spec.get("retention") or {}),
        **{
            key: status.get(key)
            for key in (
                "lastScheduleTime",
                "nextScheduleTime",
                "lastSuccessfulTime",
                "lastSuccessfulBackup",
                "lastFailedTime",
                "lastFailedBackup",
                "consecutiveFailures",
                "missedTicks",
                "lastSkipTime",
            )
        },
        "active": list(status.get("active") or []),
        "lastRetention": status.get("retention"),
        "conditions": condition_list(status),
        "backups": backups,
        "events": events,
    }


def schedule_text(d: Mapping[str, Any]) -> list[str]:
    retention = ", ".join(f"{k}={v}" for k, v in d["retention"].items())
    last = d["lastRetention"] or {}
    lines = render_fields(
        [
            ("Name", d["name"]),
            ("Namespace", d["namespace"]),
            ("UID", d["uid"]),
            ("Created", with_age(d["createdAt"])),
            ("Schedule", f"{d['schedule']} ({d['timeZone'] or 'UTC'})"),
            ("Suspended", "yes" if d["suspend"] else "no"),
            ("Concurrency", d["concurrencyPolicy"] or "Forbid"),
            ("Retention", retention),
            ("Last tick", with_age(d["lastScheduleTime"])),
            ("Next run", d["nextScheduleTime"]),
            (
                "Last success",
                f"{d['lastSuccessfulBackup']} at {d['lastSuccessfulTime']}"
                if d["lastSuccessfulBackup"]
                else None,
            ),
            (
                "Last failure",
                f"{d['lastFailedBackup']} at {d['lastFailedTime']}" if d["lastFailedBackup"] else None,
            ),
            ("Failures in a row", d["consecutiveFailures"] or 0),
            ("Missed ticks", d["missedTicks"] or 0),
            ("Active", ", ".join(str(a) for a in d["active"])),
            ("Last retention", f"{last.get('time')}: {last.get('message')}" if last else None),
        ]
    )
    lines += condition_lines(d["conditions"])
    if d["backups"]:
        table = backups_table(d["backups"], wide=False, namespaces=False)
        lines += ["Backups:", *("  " + line for line in table.splitlines())]
    else:
        lines.append("Backups:  <none>")
    return lines + event_lines(d["events"])


_BYTES = re.compile(r"\b(\d+) bytes\b")


def with_human_sizes(fact: str) -> str:
    """verify's facts count bytes; people read "1.2 GiB (1288490189 bytes)"."""
    return _BYTES.sub(
        lambda m: f"{human_size(int(m[1]))} ({m[1]} bytes)" if int(m[1]) >= 1024 else m[0], fact
    )


def verdict_document(verdict: verify.Verdict) -> dict[str, Any]:
    manifest = verdict.manifest or {}
    archive = (manifest.get("files") or {}).get("archive") or {}
    return {
        "location": verdict.location,
        "restorable": verdict.restorable,
        "reasons": list(verdict.reasons),
        "facts": list(verdict.facts),
        "type": (manifest.get("header") or {}).get("type"),
        "host": (manifest.get("header") or {}).get("host"),
        "createdAt": manifest.get("createdAt"),
        "resource": {k: (manifest.get("resource") or {}).get(k) for k in ("namespace", "name", "uid")},
        "sizeBytes": archive.get("size"),
        "plaintextSizeBytes": (archive.get("plaintext") or {}).get("size"),
        "recipients": list((archive.get("encryption") or {}).get("recipients") or []),
    }


def restore_document(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An IdmRestore as `restore -o json` (and `drill`) prints it: the same keys whatever its status holds;
    `drill` is null for an in-place restore. Its `remaining` is for the command to fill in: what is left of
    the scratch server once the drill ended (an empty list: nothing), null when not known."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    source, target = status.get("source") or {}, status.get("target") or {}
    ran, check = status.get("ipaRestore") or {}, status.get("check") or {}
    drill = status.get("drill") or {}
    return {
        "kind": IDMRESTORE,
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta.get("uid"),
        "createdAt": meta.get("creationTimestamp"),
        "mode": spec.get("mode") or "InPlace",
        "type": spec.get("type") or "Data",
        "online": bool(spec.get("online")),
        "confirm": spec.get("confirm"),
        "phase": status.get("phase") or Phase.PENDING.value,
        "step": status.get("step"),
        "reason": status.get("reason"),
        "message": status.get("message"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "durationSeconds": status.get("durationSeconds"),
        "source": {
            "requested": _requested(spec.get("source") or {}),
            "uri": source.get("uri"),
            "backup": source.get("backup"),
            "sha256": source.get("sha256"),
            "header": dict(source.get("header") or {}),
        },
        "target": {k: target.get(k) for k in ("pod", "container", "host")},
        "ipaRestore": {
            "command": list(ran.get("command") or []),
            "exitCode": ran.get("exitCode"),
            "warnings": list(ran.get("warnings") or []),
            "critical": list(ran.get("critical") or []),
        },
        "check": {
            "entries": [
                {k: e.get(k) for k in ("backend", "expected", "found")} for e in check.get("entries") or []
            ],
            "wellKnown": list(check.get("wellKnown") or []),
        },
        "replication": [
            {
                "host": m.get("host"),
                "ca": bool(m.get("ca")),
                "agreementsDisabled": m.get("agreementsDisabled"),
                "commands": list(m.get("commands") or []),
            }
            for m in status.get("replication") or []
        ],
        "drill": None
        if spec.get("mode") != "Drill"
        else {
            "pod": drill.get("pod"),
            "restoreSeconds": drill.get("restoreSeconds"),
            "entries": drill.get("entries"),
            "remaining": None,
        },
        "conditions": condition_list(status),
    }


def _requested(source: Mapping[str, Any]) -> str | None:
    """spec.source in words: what was asked for, before the operator found it."""
    if source.get("backupRef"):
        return f"IdmBackup {source['backupRef'].get('name')}"
    if source.get("scheduleRef"):
        return f"the latest Succeeded backup of IdmBackupSchedule {source['scheduleRef'].get('name')}"
    location = source.get("location") or {}
    storage = location.get("storage") or {}
    if "s3" in storage:
        s3 = storage["s3"]
        prefix = f"{s3['prefix'].strip('/')}/" if s3.get("prefix") else ""
        return f"s3://{s3.get('bucket')}/{prefix}{location.get('directory') or ''}"
    if "pvc" in storage:
        pvc = storage["pvc"]
        sub = f"{pvc['subPath'].strip('/')}/" if pvc.get("subPath") else ""
        return f"pvc://{pvc.get('claimName')}/{sub}{location.get('directory') or ''}"
    return None


def restore_text(d: Mapping[str, Any]) -> list[str]:
    """How a restore ended, for people: what was restored into which server, what ipa-restore said, what
    the check over LDAP found, and what the other masters need now; for a drill, instead of the last, the
    scratch server's fate, how long the restore took and the entries it found."""
    source, target, ran = d["source"], d["target"], d["ipaRestore"]
    header = source["header"]
    if source["uri"]:
        restored_from = source["uri"] + (f" (IdmBackup {source['backup']})" if source["backup"] else "")
    else:  # the restore failed before it found the archive: what was asked for
        restored_from = f"{source['requested']} (not read)" if source["requested"] else ""
    if header.get("host"):
        restored_from += (
            f"\n{header.get('type') or '?'} backup of {header['host']}, taken {header.get('time')}"
        )
        restored_from += f", FreeIPA {header['ipaVersion']}" if header.get("ipaVersion") else ""
    server = target["host"] or ""
    if target["pod"]:
        server += f" (pod {target['pod']})" if server else f"pod {target['pod']}"
    command = " ".join(ran["command"])
    if ran["exitCode"] is not None:
        ipa_restore = f"exit code {ran['exitCode']}: {command}"
    else:
        ipa_restore = f"{command}: no exit code recorded" if command else "not run"
    ipa_restore += "".join(f"\ncritical: {line}" for line in ran["critical"])
    ipa_restore += "".join(f"\nwarning: {line}" for line in ran["warnings"])
    entries = "\n".join(
        f"{e['backend']}: {e['expected']} in the archive, {e['found']} found"
        + ("" if e["expected"] == e["found"] else "  MISMATCH")
        for e in d["check"]["entries"]
    )
    plan = []
    for master in d["replication"]:
        what = ["CA master"] if master["ca"] else []
        what += ["its agreements are not disabled"] if master["agreementsDisabled"] is False else []
        plan.append(f"{master['host']}" + (f" ({', '.join(what)})" if what else "") + ":")
        plan += [f"  {command}" for command in master["commands"]]
    if plan:
        plan.insert(0, f"re-initialize every other master from {target['host'] or 'it'}, in this order:")
    elif d["phase"] == Phase.SUCCEEDED:
        plan = ["no other master to re-initialize"]
    took = [("Took", short_duration(d["durationSeconds"]))] if d["durationSeconds"] is not None else []
    if d["drill"] is None:
        into = [("Target", server)]
        results = [("Replication", "\n".join(plan))]
    else:
        into = [("Scratch server", _scratch_text(d["drill"], server))]
        results = _drill_results(d["drill"])
    return render_fields(
        [
            ("Phase", d["phase"]),
            ("Reason", d["reason"]),
            ("Message", d["message"]),
            ("Source", restored_from),
            *into,
            ("ipa-restore", ipa_restore),
            ("Entries checked", entries),
            *results,
            *took,
        ]
    )


def _scratch_text(drill: Mapping[str, Any], server: str) -> str:
    if not drill["pod"]:
        return "not created"
    text = server or f"pod {drill['pod']}"
    if drill["remaining"] is None:
        return f"{text}; whether it is deleted was not checked"
    if not drill["remaining"]:
        return f"{text}: deleted, nothing of it is left (pod, claim, NetworkPolicy)"
    return (
        f"{text}: still there: {', '.join(drill['remaining'])}\n"
        "(owned by the IdmRestore: deleting it deletes them)"
    )


def _drill_results(drill: Mapping[str, Any]) -> list[tuple[str, Any]]:
    seconds, entries = drill["restoreSeconds"], drill["entries"]
    if seconds is None:
        took = "not measured: the restore did not get through its data check"
    else:
        longer = f" ({short_duration(seconds)})" if seconds >= 60 else ""
        took = f"the restore took {seconds:g} s{longer}: your recovery time"
    found = None if entries is None else f"{entries} in the restored directory, every backend together"
    return [("Restore time", took), ("Entries", found)]


# -- completion -----------------------------------------------------------------------------------------

_FILE_OPTIONS = {
    "kubeconfig",
    "key",
    "passphrase_file",
    "s3_ca",
    "webhook_cert_dir",
    "pvc_root",
    "pod_template",
    "volume_claim_template",
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _word_list(words: Sequence[str]) -> str:
    return " ".join(words)


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script: subcommands, each one's options, and the values of options with choices."""
    commands = _subcommands(parser)
    out = [
        f"# bash completion for {parser.prog}; generated by `{parser.prog} completion bash`",
        "_idm_backup_operator() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" command="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        "            -*) ;;",
        '            *) command="${COMP_WORDS[i]}"; break ;;',
        "        esac",
        "    done",
        "    COMPREPLY=()",
        '    case "$command" in',
        f'        "") COMPREPLY=($(compgen -W "{_word_list(list(commands))} --help --version" -- "$cur")) ;;',
    ]
    for name, sub in commands.items():
        options = [s for a in sub._actions for s in a.option_strings]
        positional = [a for a in sub._actions if not a.option_strings]
        out += [f"        {name})", '            case "$prev" in']
        for action in sub._actions:
            if not action.option_strings or not _takes_value(action):
                continue
            if action.choices:
                reply = f'compgen -W "{_word_list([str(c) for c in action.choices])}" -- "$cur"'
            elif action.dest in _FILE_OPTIONS:
                reply = 'compgen -f -- "$cur"'
            else:
                reply = ""  # a value to type: nothing to offer
            fill = f"COMPREPLY=($({reply})); " if reply else ""
            out.append(f"                {'|'.join(action.option_strings)}) {fill}return ;;")
        out.append("            esac")
        first = positional[0] if positional else None
        if first is not None and first.choices:
            words = f'compgen -W "{_word_list([str(c) for c in first.choices])}" -- "$cur"'
        elif first is not None and first.dest == "target":
            words = 'compgen -f -- "$cur"'
        else:
            words = ""
        offer = f'compgen -W "{_word_list(options)}" -- "$cur"'
        out.append(f'            if [[ "$cur" == -* ]]; then COMPREPLY=($({offer}))')
        if words:
            out.append(f'            elif [[ "$prev" == "{name}" ]]; then COMPREPLY=($({words}))')
        out += ["            fi", "            ;;"]
    out += ["    esac", "}", f"complete -F _idm_backup_operator {parser.prog}", ""]
    return "\n".join(out)


def _zsh_text(text: str | None) -> str:
    """A help text as a zsh description in single quotes: its first part, brackets and colons escaped for
    _arguments and _describe, quotes for the shell."""
    first = re.split(r" \(|; |, e\.g\.", text or "", maxsplit=1)[0][:70]
    first = re.sub(r"([\[\]:\\])", r"\\\1", first)
    return first.replace("'", "'\\''")


def zsh_completion(parser: argparse.ArgumentParser) -> str:
    """A zsh completion script (_arguments): subcommands with their help, options with theirs."""
    commands = _subcommands(parser)
    described = [
        f"        '{name}:{_zsh_text(choice.help)}'"
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
        for name in [choice.dest]
    ]
    out = [
        f"#compdef {parser.prog}",
        f"# zsh completion for {parser.prog}; generated by `{parser.prog} completion zsh`",
        "_idm_backup_operator() {",
        "    local -a commands",
        "    commands=(",
        *described,
        "    )",
        "    if (( CURRENT == 2 )); then",
        f"        _describe -t commands '{parser.prog} command' commands",
        "        return",
        "    fi",
        "    local command=$words[2]",
        "    shift words",
        "    (( CURRENT-- ))",
        "    case $command in",
    ]
    for name, sub in commands.items():
        specs = []
        position = 0
        for action in sub._actions:
            if not action.option_strings:
                position += 1
                if action.choices:
                    values = " ".join(str(c) for c in action.choices)
                    specs.append(f"'{position}:{action.dest}:({values})'")
                elif action.dest == "target":
                    specs.append(f"'{position}:{action.dest}:_files'")
                else:
                    specs.append(f"'{position}:{action.dest}: '")
                continue
            names = action.option_strings
            head = f"'({' '.join(names)})'{{{','.join(names)}}}'" if len(names) > 1 else f"'{names[0]}"
            if isinstance(action, argparse._AppendAction):
                head = f"'*{names[0]}" if len(names) == 1 else head
            spec = f"{head}[{_zsh_text(action.help)}]"
            if _takes_value(action):
                if action.choices:
                    spec += f":{action.dest}:({' '.join(str(c) for c in action.choices)})"
                elif action.dest in _FILE_OPTIONS:
                    spec += f":{action.dest}:_files"
                else:
                    spec += f":{action.dest}: "
            specs.append(spec + "'")
        out += [f"        ({name})", "            _arguments -s \\"]
        out += [f"                {spec} \\" for spec in specs[:-1]] + [
            f"                {specs[-1]}",
            "            ;;",
        ]
    out += [
        "    esac",
        "}",
        "if [[ $zsh_eval_context[-1] == loadautofunc ]]; then",
        '    _idm_backup_operator "$@"',
        "else",
        f"    compdef _idm_backup_operator {parser.prog}",
        "fi",
        "",
    ]
    return "\n".join(out)
