"""Command line: `idm-backup-operator run` starts the operator; the other commands serve its users.

* ``run``: the operator itself (in a pod, or locally with a kubeconfig);
* ``backup-now SCHEDULE``: a backup from a schedule's template, now, owned by the schedule;
* ``list``: the IdmBackups of a namespace, or (``--storage``) the backups stored in a bucket or directory;
* ``describe backup|schedule NAME``: status, conditions, recent Events and, for a backup, its stored files;
* ``verify``: whether a stored backup can be restored, checked end to end with the private key;
* ``restore``: an IdmRestore of a backup (by IdmBackup, schedule or stored location), followed to its end;
* ``drill``: the same IdmRestore in mode Drill: into a throwaway server, timed, and that server deleted;
* ``completion bash|zsh``: a shell completion script, generated from this parser.

Everything but ``run`` works from a laptop: Kubernetes through the kubeconfig (``--kubeconfig``,
``--context``, ``-n`` as kubectl spells them), S3 through the IdmBackup's own credentials Secret or, for a
URI, the usual ``AWS_*`` environment variables. For scripts: ``-o json|yaml`` prints one document on stdout
and nothing else, sizes in bytes; errors are one line on stderr, and the exit status says what happened
(`EXIT_STATUS`). For people: tables, sizes in human units, and progress, live on a terminal (rich) and
plain lines otherwise. What is printed, and how, is cli_output.py's; this module does the work.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import io
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import kopf
import urllib3
import yaml
from kubernetes import client, config, watch

from idm_backup_operator import __version__, logs, metrics
from idm_backup_operator.api.names import (
    DRILL_LABEL,
    GROUP,
    IDMBACKUP,
    IDMBACKUPS,
    IDMBACKUPSCHEDULE,
    IDMBACKUPSCHEDULES,
    IDMRESTORE,
    IDMRESTORES,
    MANUAL_ANNOTATION,
    SCHEDULE_LABEL,
    VERSION,
    bounded_name,
)
from idm_backup_operator.api.phase import Phase, is_finished
from idm_backup_operator.api.spec import BackupSpec, parse_backup_spec
from idm_backup_operator.archive import layout, stored, verify
from idm_backup_operator.cli_output import (
    Progress,
    backup_summary,
    backup_text,
    backups_table,
    bash_completion,
    clean,
    describe_backup,
    describe_schedule,
    emit_document,
    human_or_blank,
    one_line,
    progress_stream,
    restore_document,
    restore_text,
    schedule_text,
    stored_summary,
    stored_table,
    verdict_document,
    with_human_sizes,
    zsh_completion,
)
from idm_backup_operator.handlers.startup import (
    DEFAULT_PVC_ROOT,
    DEFAULT_WEBHOOK_CERT_DIR,
    PVC_ROOT_ENV,
    WEBHOOK_CERT_DIR_ENV,
    WEBHOOK_PORT_ENV,
    WebhookConfig,
    configure_logging,
)
from idm_backup_operator.idmbackupschedule import reconcile
from idm_backup_operator.kube import locking, references, scratch
from idm_backup_operator.kube.backups import IdmBackups, NotFound, Refused
from idm_backup_operator.slots import (
    DEFAULT_MEMORY_MIB,
    DEFAULT_SLOTS,
    MEMORY_ENV,
    PER_NAMESPACE_ENV,
    SLOTS_ENV,
    BackupSlots,
)
from idm_backup_operator.storage import ObjectNotFound, S3Store, StorageError, Store, StoredObject, Upload
from idm_backup_operator.streams import CHUNK_SIZE

AMBIENT_ENV = "IDM_BACKUP_S3_AMBIENT_CREDENTIALS"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# Exit status of every command but `run`. 1 is only ever "the backup is broken" or "the restore failed"; a
# script that alerts on it alerts on backups and restores, and retries or pages someone else on 3.
EXIT_OK = 0
EXIT_BROKEN = 1  # verify: it cannot be restored; backup-now --wait: it failed; restore, drill: it failed
EXIT_USAGE = 2  # the command line is wrong (argparse's own status for usage errors)
EXIT_ERROR = 3  # could not do it, or could not check: API server, storage, a file, a missing resource
EXIT_INTERRUPTED = 130
EXIT_STATUS = f"""\
exit status:
  {EXIT_OK}    done; verify: the backup can be restored; backup-now --wait: the backup succeeded;
       restore, drill: it succeeded
  {EXIT_BROKEN}    the backup is broken or the restore failed: verify: it cannot be restored;
       backup-now --wait: it failed; restore, drill: it failed (the reason is printed)
  {EXIT_USAGE}    usage: the command line is wrong (restore: without --confirm; drill: a template file
       that is not one)
  {EXIT_ERROR}    could not do it or could not check: the API server or the storage is unreachable or
       refuses, a resource or file is missing or unreadable, backup-now --wait, restore or drill timed
       out
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
Errors are one line on stderr, starting with "error: "."""

OUTPUT_FORMATS = ("table", "wide", "json", "yaml")
RECENT_EVENTS = 20
POLL_INTERVAL = 2.0  # seconds between two reads of a backup that backup-now --wait follows
WATCH_SECONDS = 10  # restore: the longest watch request; then the restore is read again
SCRATCH_GONE_SECONDS = 60  # drill: how long its end may wait for the scratch server to be deleted
DEFAULT_KEY_SECRET_KEY = "private.asc"  # as IdmRestore's spec.decryption.secretKeySecretRef.key
API_TIMEOUT = (10, 60)  # (connect, read) seconds of each API call made here


class CommandError(Exception):
    """A failure to report in one line, without a traceback, and the exit status it ends with."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- run ------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_format, verbose=args.verbose)
    # The handlers register with kopf when imported: the package came in with handlers.startup (above);
    # the metrics' event handlers are named here too, in case the package does not import them.
    import idm_backup_operator.handlers.observe

    webhook = None
    if args.webhook_port:
        # kopf refuses to start with validation handlers but no server: they are registered (imported)
        # only when the webhook is asked for.
        import idm_backup_operator.handlers.admission  # noqa: F401

        webhook = WebhookConfig(args.webhook_port, args.webhook_address, Path(args.webhook_cert_dir))
    # kopf hands this memo to the start-up handler and copies it for every object.
    memo = kopf.Memo(
        namespaces=list(args.namespace or ()),
        lock_namespace=args.lock_namespace,
        metrics_config=metrics.MetricsConfig(port=args.metrics_port, address=args.metrics_address),
        webhook_config=webhook,
        ambient_s3_credentials=args.s3_ambient_credentials,
        backup_slots=BackupSlots.configured(
            args.max_concurrent_backups,
            args.max_concurrent_backups_per_namespace,
            args.upload_memory_budget_mib,
        ),
    )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        # Standalone by default: one replica. With --peering, replicas find each other through kopf's
        # (Cluster)KopfPeering object of that name. kopf pauses every operator that sees a live peer of
        # higher priority, and all of them if priorities tie. The earliest started wins: a new pod of a
        # rollout waits instead of taking over backups that are running, and when the active replica
        # leaves (its entry is removed, or expires after 60 s if it was killed) the next oldest goes on.
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=-time.time_ns() // 1_000_000 if args.peering else 0,
        liveness_endpoint=args.liveness,
        memo=memo,
    )
    return 0


# -- shared: Kubernetes from the kubeconfig -------------------------------------------------------------

_seen_api_host = ""  # for the message when the API server cannot be reached


def _api(args: argparse.Namespace) -> client.ApiClient:
    """In a pod its service account, unless --kubeconfig or --context say otherwise; else the kubeconfig:
    --kubeconfig, else $KUBECONFIG (read now, as kubectl does), else ~/.kube/config."""
    global _seen_api_host
    if not (args.kubeconfig or args.context):
        try:
            config.load_incluster_config()
            _seen_api_host = client.Configuration.get_default_copy().host
            return client.ApiClient()
        except config.ConfigException:
            pass
    path = args.kubeconfig or os.environ.get("KUBECONFIG")
    try:
        api = config.new_client_from_config(config_file=path, context=args.context)
    except (config.ConfigException, OSError, ValueError, yaml.YAMLError) as err:
        where = f" in {path}" if path else ""
        raise CommandError(f"no usable Kubernetes configuration{where}: {one_line(err)}") from None
    _seen_api_host = api.configuration.host
    return api


def _namespace(args: argparse.Namespace) -> str:
    """-n, else the kubeconfig context's namespace, else the pod's own, else "default" (as kubectl)."""
    if args.namespace:
        return str(args.namespace)
    try:
        contexts, active = config.list_kube_config_contexts(
            config_file=args.kubeconfig or os.environ.get("KUBECONFIG")
        )
        if args.context:
            active = next((c for c in contexts if c.get("name") == args.context), None)
        namespace = (active or {}).get("context", {}).get("namespace")
        if namespace:
            return str(namespace)
    except (config.ConfigException, OSError):
        if SERVICE_ACCOUNT_NAMESPACE.exists():
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def _api_refusal(err: client.ApiException) -> str:
    """The API server's own message (a Status object's), not the whole response."""
    try:
        message = json.loads(err.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{err.status} {err.reason}" + (f": {message}" if message else "")


def _unreachable(err: urllib3.exceptions.HTTPError) -> str:
    cause = one_line(getattr(err, "reason", None) or err)
    found = re.search(r"\[(?:Errno -?\d+|SSL[^\]]*)\] ([^'\"()]+)", cause)
    return (
        f"cannot reach the Kubernetes API server {_seen_api_host}: {(found[1] if found else cause).strip()}"
    )


def _get(custom: Any, namespace: str, plural: str, name: str, kind: str) -> dict[str, Any]:
    try:
        obj: dict[str, Any] = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, _request_timeout=API_TIMEOUT
        )
    except client.ApiException as err:
        if err.status == 404:
            raise CommandError(f"{kind} {namespace}/{name} not found") from None
        raise CommandError(f"cannot read {kind} {namespace}/{name}: {_api_refusal(err)}") from None
    return obj


def _events(api: client.ApiClient, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The object's recent core/v1 Events, oldest first: those the operator posts, and kopf's."""
    meta = obj["metadata"]
    try:
        found = client.CoreV1Api(api).list_namespaced_event(
            meta["namespace"],
            field_selector=f"involvedObject.uid={meta['uid']}",
            _request_timeout=API_TIMEOUT,
        )
    except client.ApiException as err:
        raise CommandError(
            f"cannot list the Events of {meta['namespace']}/{meta['name']}: {_api_refusal(err)}"
        ) from None
    events = []
    for event in found.items:
        last = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
        first = event.first_timestamp or last
        source = event.reporting_component or (event.source.component if event.source else None)
        events.append(
            {
                "type": event.type,
                "reason": event.reason,
                "message": event.message,
                "count": event.count or 1,
                "firstTimestamp": first.isoformat() if first else None,
                "lastTimestamp": last.isoformat() if last else None,
                "source": source,
            }
        )
    events.sort(key=lambda e: e["lastTimestamp"] or "")
    return events[-RECENT_EVENTS:]


def _locate(obj: Mapping[str, Any]) -> stored.Located | None:
    """Where the IdmBackup stored its backup, by its spec and status; a status no operator could have
    written (a directory outside ipa-backup's) is an error to report, not a traceback."""
    try:
        return stored.locate(obj)
    except (ValueError, KeyError, TypeError) as err:
        meta = obj["metadata"]
        raise CommandError(
            f"cannot tell where IdmBackup {meta['namespace']}/{meta['name']} stored: {err}"
        ) from None


# -- backup-now -----------------------------------------------------------------------------------------


def manual_backup_name(schedule: str, now: datetime.datetime) -> str:
    """`<schedule>-manual-<YYYYMMDDhhmmss>` (UTC); a long schedule name is cut and given a hash."""
    return bounded_name(schedule, f"-manual-{now.astimezone(datetime.UTC):%Y%m%d%H%M%S}")


def _step_line(status: Mapping[str, Any]) -> str:
    """`Running: ipa-backup: Backing up ...`; while Pending, why it waits."""
    phase = status.get("phase") or Phase.PENDING.value
    text = f"{phase}: {status.get('step') or 'waiting for the operator'}"
    waiting = [
        c for c in status.get("conditions") or [] if c.get("type") == "Waiting" and c.get("status") == "True"
    ]
    if waiting and waiting[0].get("message"):
        text += f" ({waiting[0]['message']})"
    return text


def _backup_now(args: argparse.Namespace) -> int:
    api = _api(args)
    custom = client.CustomObjectsApi(api)
    namespace = _namespace(args)
    schedule = _get(custom, namespace, IDMBACKUPSCHEDULES, args.schedule, IDMBACKUPSCHEDULE)
    now = datetime.datetime.now(datetime.UTC)
    name = manual_backup_name(args.schedule, now)
    # The schedule's own recipe: same template, labels and owner as its ticks, so that retention,
    # the schedule's status and garbage collection treat it like any of its backups.
    body = reconcile.child_body(schedule, name, now)
    body["metadata"]["annotations"][MANUAL_ANNOTATION] = "true"
    try:
        created = IdmBackups(custom).create(body)
    except Refused as err:
        raise CommandError(f"IdmBackup {namespace}/{name} refused: {err}") from None
    if not created:
        raise CommandError(f"IdmBackup {namespace}/{name} exists already: try again in a second")
    print(f"idmbackup {namespace}/{name} created from schedule {clean(args.schedule)}", flush=True)
    if not args.wait:
        return EXIT_OK
    # Step by step, with the time each has taken; while the archive streams, bytes from status.progress.
    deadline = time.monotonic() + args.timeout
    with Progress(sys.stdout) as progress:
        while True:
            status = _get(custom, namespace, IDMBACKUPS, name, IDMBACKUP).get("status") or {}
            if is_finished(status.get("phase")):
                break
            progress.step(_step_line(status))
            transfer = status.get("progress") or {}
            if str(status.get("step") or "").startswith("uploading") and "bytesRead" in transfer:
                progress.transferred(int(transfer["bytesRead"]), transfer.get("totalBytes"))
            if time.monotonic() >= deadline:
                raise CommandError(
                    f"IdmBackup {namespace}/{name} did not finish within {args.timeout:g}s; it goes on: "
                    f"idm-backup-operator describe backup {name} -n {namespace}"
                )
            progress.tick()
            time.sleep(POLL_INTERVAL)
    archive, message = status.get("archive") or {}, status.get("message") or ""
    if archive.get("uri"):
        where = "" if archive["uri"] in message else f" at {archive['uri']}"
        message += f" ({human_or_blank(archive.get('sizeBytes'))}{where})"
    reason = f"{status['reason']}: " if status.get("reason") and status["phase"] != Phase.SUCCEEDED else ""
    print(clean(f"{status['phase']}: {reason}{message}"), flush=True)
    return EXIT_OK if status["phase"] == Phase.SUCCEEDED else EXIT_BROKEN


# -- restore --------------------------------------------------------------------------------------------

# The files of a backup directory: a location given as one of them stands for the directory.
_BACKUP_FILES = re.compile(r"header|manifest\.json|ipa-(full|data)\.tar(\.gpg)?")
_NOT_A_NAME = re.compile(r"[^a-z0-9.-]+")


def restore_name(base: str, now: datetime.datetime, verb: str = "restore") -> str:
    """`<base>-restore-<YYYYMMDDhhmmss>` (UTC), `<base>-drill-...` for a drill; a long base is cut and given
    a hash."""
    base = _NOT_A_NAME.sub("-", base.lower()).strip("-.") or "idm"
    return bounded_name(base, f"-{verb}-{now.astimezone(datetime.UTC):%Y%m%d%H%M%S}")


@dataclasses.dataclass(frozen=True)
class RestoreLocation:
    """spec.source.location, and what its path says: <ns>/<host>/<ipa-full|ipa-data>-<time>/."""

    storage: dict[str, Any]
    directory: str
    host: str | None


def restore_location(uri: str, *, pvc_root: str, s3: Mapping[str, Any]) -> RestoreLocation:
    """A stored backup directory as the operator reads it: s3://bucket/prefix/<ns>/<host>/<dir>/,
    pvc://claim/subPath/<ns>/<host>/<dir>/, or a path under the operator's PVC root (as a PVC backup's
    status.archive.uri shows it); or one of the directory's files. `s3` is the rest of spec's s3 storage
    (endpoint, credentials...), which the operator uses: the command itself reads nothing from storage."""
    root = PurePosixPath(pvc_root)
    if uri.startswith("s3://"):
        bucket, _, path = uri.removeprefix("s3://").partition("/")
        claim = None
    elif uri.startswith("pvc://"):
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        bucket = None
    elif uri.startswith("/") and PurePosixPath(uri).is_relative_to(root):
        claim, _, path = str(PurePosixPath(uri).relative_to(root)).partition("/")
        bucket = None
    else:
        raise CommandError(
            f"--location {uri}: a backup directory is s3://bucket/prefix/<namespace>/<host>/<directory>/, "
            f"pvc://claim/subPath/<namespace>/<host>/<directory>/ or a path under {pvc_root} (--pvc-root)",
            EXIT_USAGE,
        )
    parts = [part for part in path.split("/") if part]
    if parts and _BACKUP_FILES.fullmatch(parts[-1]):
        parts.pop()
    if not (bucket or claim) or not parts or any(part in (".", "..") for part in parts):
        raise CommandError(f"--location {uri} does not name a backup directory", EXIT_USAGE)
    # The layout's last three levels are the directory; what is above them, the storage's prefix.
    prefix, directory = "/".join(parts[:-3]), "/".join(parts[-3:]) + "/"
    if bucket:
        storage = {"s3": {"bucket": bucket, **({"prefix": prefix} if prefix else {}), **s3}}
    else:
        storage = {"pvc": {"claimName": claim, **({"subPath": prefix} if prefix else {})}}
    return RestoreLocation(storage, directory, parts[-2] if len(parts) >= 3 else None)


@dataclasses.dataclass(frozen=True)
class _Source:
    spec: dict[str, Any]  # spec.source
    describe: str
    base_name: str  # of the IdmRestore's default name
    target: Mapping[str, Any] | None  # the spec.target to start from: the backup's own
    host: str | None  # the FQDN the backup was taken on, if known: what --confirm must say


_LOCATION_OPTIONS = (
    ("--s3-endpoint", "s3_endpoint"),
    ("--s3-addressing", "s3_addressing"),
    ("--s3-region", "s3_region"),
    ("--s3-credentials-secret", "s3_credentials_secret"),
    ("--s3-ca-secret", "s3_ca_secret"),
)


def _location_s3(args: argparse.Namespace) -> dict[str, Any]:
    s3: dict[str, Any] = {}
    if args.s3_endpoint:
        s3["endpoint"] = args.s3_endpoint
    if args.s3_addressing != "default" or args.s3_endpoint:
        # As everywhere in this command line: path style with an explicit endpoint, unless told otherwise.
        s3["forcePathStyle"] = args.s3_addressing != "virtual"
    if args.s3_region:
        s3["region"] = args.s3_region
    if args.s3_credentials_secret:
        s3["credentialsSecretRef"] = {"name": args.s3_credentials_secret}
    if args.s3_ca_secret:
        s3["caSecretRef"] = {"name": args.s3_ca_secret}
    return s3


def _check_restore_what(args: argparse.Namespace) -> None:
    """One source, and storage options only for a location: said before anything is read."""
    given = [flag for flag, value in (("BACKUP", args.backup), ("--schedule", args.schedule)) if value]
    given += ["--location"] if args.location else []
    if len(given) != 1:
        raise CommandError(
            f"{args.command} what? Give one of BACKUP (an IdmBackup's name), --schedule NAME or "
            "--location URI" + (f", not {' and '.join(given)}" if given else ""),
            EXIT_USAGE,
        )
    if not args.location:
        extra = [flag for flag, dest in _LOCATION_OPTIONS if getattr(args, dest) not in (None, "default")]
        if extra:
            raise CommandError(
                f"{', '.join(extra)}: only with --location (a backup is read from its own storage)",
                EXIT_USAGE,
            )


def _restore_source(args: argparse.Namespace, custom: Any, namespace: str) -> _Source:
    """What to restore, and what the cluster says of it: the target it was taken of, and its FQDN."""
    if args.backup:
        obj = _get(custom, namespace, IDMBACKUPS, args.backup, IDMBACKUP)
        return _Source(
            {"backupRef": {"name": args.backup}},
            f"IdmBackup {args.backup}",
            args.backup,
            (obj.get("spec") or {}).get("target"),
            ((obj.get("status") or {}).get("target") or {}).get("host"),
        )
    if args.schedule:
        schedule = _get(custom, namespace, IDMBACKUPSCHEDULES, args.schedule, IDMBACKUPSCHEDULE)
        try:
            latest = IdmBackups(custom).latest_succeeded(namespace, args.schedule)
        except NotFound:
            raise CommandError(f"{IDMBACKUPSCHEDULE} {namespace}/{args.schedule} not found") from None
        except client.ApiException as err:
            raise CommandError(
                f"cannot list the IdmBackups of {args.schedule}: {_api_refusal(err)}"
            ) from None
        template = ((schedule.get("spec") or {}).get("template") or {}).get("spec") or {}
        # The server that backup was taken of; the template's, if it has none yet (or the restore, which
        # picks the latest when it starts, would find one by then).
        chosen = f", now {latest['metadata']['name']}" if latest else ", none yet"
        return _Source(
            {"scheduleRef": {"name": args.schedule}},
            f"the latest Succeeded backup of IdmBackupSchedule {args.schedule}{chosen}",
            args.schedule,
            ((latest or {}).get("spec") or {}).get("target") or template.get("target"),
            (((latest or {}).get("status") or {}).get("target") or {}).get("host"),
        )
    found = restore_location(args.location, pvc_root=args.pvc_root, s3=_location_s3(args))
    return _Source(
        {"location": {"storage": found.storage, "directory": found.directory}},
        args.location,
        found.directory.rstrip("/").rsplit("/", 1)[-1],
        None,
        found.host,
    )


_CHOOSE_POD = ("podName", "podSelector", "host")


def _restore_target(args: argparse.Namespace, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """spec.target: the backup's own, with what the options change; all of it from them for a location."""
    target = copy.deepcopy(dict(base or {}))
    if args.pod or args.host:
        for key in _CHOOSE_POD:
            target.pop(key, None)
        target["podName" if args.pod else "host"] = args.pod or args.host
    if args.container:
        target["container"] = args.container
    ldap = target["ldap"] = _ldap(args, target.get("ldap"))
    missing = [
        flag
        for flag, there in (
            ("--pod or --host", any(key in target for key in _CHOOSE_POD)),
            ("--ldap-url", "url" in ldap),
            ("--ldap-password-secret", "passwordSecretRef" in ldap),
        )
        if not there
    ]
    if missing:
        raise CommandError(
            f"which server to restore into? {', '.join(missing)} needed"
            + ("" if base else " (there is no IdmBackup to take spec.target from)"),
            EXIT_USAGE,
        )
    return target


def _ldap(args: argparse.Namespace, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The server's LDAP (a target's, a drill's): `base` with what --ldap-* say."""
    ldap = dict(base or {})
    if args.ldap_url:
        ldap["url"] = args.ldap_url
    if args.ldap_password_secret:
        ldap["passwordSecretRef"] = {"name": args.ldap_password_secret}
    if args.ldap_ca_secret:
        ldap["caSecretRef"] = {"name": args.ldap_ca_secret}
    return ldap


def _target_text(target: Mapping[str, Any]) -> str:
    if target.get("podName"):
        return f"pod {target['podName']}"
    if target.get("host"):
        return f"the pod of {target['host']}"
    return "the pod its podSelector selects"


def _decryption(args: argparse.Namespace) -> dict[str, Any]:
    """spec.decryption, if a key Secret is given, as a part of the spec."""
    if not args.key_secret:
        if args.passphrase_secret or args.key_secret_key != DEFAULT_KEY_SECRET_KEY:
            raise CommandError("--key-secret-key and --passphrase-secret go with --key-secret", EXIT_USAGE)
        return {}
    decryption: dict[str, Any] = {"secretKeySecretRef": {"name": args.key_secret, "key": args.key_secret_key}}
    if args.passphrase_secret:
        decryption["passphraseSecretRef"] = {"name": args.passphrase_secret}
    return {"decryption": decryption}


def _add_restore_how(how: argparse._ArgumentGroup) -> None:
    """What a restore restores and what it accepts: the same for a restore and a drill."""
    how.add_argument(
        "--type",
        choices=("Data", "Full"),
        help="Data: LDAP data only; Full: configuration files too, every IPA service stopped (default: Data)",
    )
    how.add_argument("--online", action="store_true", help="Data only: restore while IPA keeps running")
    how.add_argument(
        "--backend",
        action="append",
        choices=("userRoot", "ipaca"),
        help="Data only: restore this backend (repeatable; default: every backend in the archive)",
    )
    how.add_argument(
        "--allow-version-mismatch",
        action="store_true",
        help="restore even if the archive's FreeIPA version differs from the server's",
    )
    how.add_argument(
        "--allow-symlinked-config",
        action="store_true",
        help="allow a Full restore into a pod whose /etc/ipa is a symlink (freeipa-container)",
    )


def _restore_how(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.type:
        spec["type"] = args.type
    if args.online:
        spec["online"] = True
    if args.backend:
        spec["backends"] = list(dict.fromkeys(args.backend))
    if args.allow_version_mismatch:
        spec["allowVersionMismatch"] = True
    if args.allow_symlinked_config:
        spec["allowSymlinkedConfig"] = True
    return spec


def _restore_spec(args: argparse.Namespace, source: _Source, target: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": source.spec, "target": target, "confirm": args.confirm}
    return {**spec, **_decryption(args), **_restore_how(args)}


def _restore_versions(custom: Any, namespace: str, name: str, deadline: float) -> Iterator[dict[str, Any]]:
    """The IdmRestore as it is now, then every change to it until the deadline. A watch, not reads now and
    then: a step may last less than a poll's interval, and each is shown."""
    while True:
        obj = _get(custom, namespace, IDMRESTORES, name, IDMRESTORE)
        yield obj
        left = deadline - time.monotonic()
        if left <= 0:
            return
        seconds = max(1, int(min(left, WATCH_SECONDS)))
        try:
            for event in watch.Watch().stream(
                custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                IDMRESTORES,
                field_selector=f"metadata.name={name}",
                resource_version=obj["metadata"]["resourceVersion"],
                timeout_seconds=seconds,
                _request_timeout=(API_TIMEOUT[0], seconds + API_TIMEOUT[1]),
            ):
                if event["type"] == "DELETED":
                    raise CommandError(f"IdmRestore {namespace}/{name} was deleted before it finished")
                if event["type"] in ("ADDED", "MODIFIED"):
                    yield event["object"]
        except client.ApiException as err:
            if err.status != 410:  # 410: the version is too old to watch from; read it again
                raise CommandError(
                    f"cannot watch IdmRestore {namespace}/{name}: {_api_refusal(err)}"
                ) from None


def _restore(args: argparse.Namespace) -> int:
    _check_restore_what(args)
    namespace = _namespace(args)
    # A location needs nothing from the cluster until the IdmRestore is created.
    custom = None if args.location else client.CustomObjectsApi(_api(args))
    source = _restore_source(args, custom, namespace)
    target = _restore_target(args, source.target)
    if not args.confirm:
        host = target.get("host") or source.host
        what = host or f"the server it restores into ({_target_text(target)})"
        typed = f"--confirm {host}" if host else "--confirm with that server's FQDN"
        raise CommandError(
            f"a restore overwrites the live directory of {what}: if that is what you want, add {typed}",
            EXIT_USAGE,
        )
    spec = _restore_spec(args, source, target)
    return _create_and_follow(args, custom, namespace, source, spec, lambda _: f"into {_target_text(target)}")


def _create_and_follow(
    args: argparse.Namespace,
    custom: Any,
    namespace: str,
    source: _Source,
    spec: dict[str, Any],
    into: Callable[[str], str],
) -> int:
    """What restore and drill share once the spec is made: create the IdmRestore, say so (`into` its name
    says where it goes), follow it step by step and print how it ended. 0 if it succeeded, 1 if it failed."""
    custom = custom or client.CustomObjectsApi(_api(args))
    now = datetime.datetime.now(datetime.UTC)
    name = args.name or restore_name(source.base_name, now, args.command)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": IDMRESTORE,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    try:
        created = custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, IDMRESTORES, body, _request_timeout=API_TIMEOUT
        )
    except client.ApiException as err:
        if err.status == 409:
            again = "choose another --name" if args.name else "try again in a second"
            raise CommandError(f"IdmRestore {namespace}/{name} exists already: {again}") from None
        raise CommandError(f"IdmRestore {namespace}/{name} refused: {_api_refusal(err)}") from None
    stream = progress_stream(args.output)
    if stream is not None:
        print(
            clean(f"idmrestore {namespace}/{name} created: {source.describe} {into(name)}"),
            file=stream,
            flush=True,
        )
    obj: dict[str, Any] = created
    if args.wait:
        obj = _follow_restore(custom, namespace, name, args.timeout, stream)
    document = restore_document(obj)
    if args.wait and document["drill"] is not None:
        document["drill"]["remaining"] = _scratch_remaining(custom.api_client, namespace, name, stream)
    if args.output in ("json", "yaml"):
        emit_document(document, args.output)
    elif args.wait:
        print("\n".join(restore_text(document)), flush=True)
    if not args.wait:
        return EXIT_OK
    return EXIT_OK if document["phase"] == Phase.SUCCEEDED else EXIT_BROKEN


def _follow_restore(custom: Any, namespace: str, name: str, timeout: float, stream: Any) -> dict[str, Any]:
    """Each new step as a line (live on a terminal), until the restore finished; the IdmRestore then."""
    with Progress(stream) as progress:
        try:
            for obj in _restore_versions(custom, namespace, name, time.monotonic() + timeout):
                status = obj.get("status") or {}
                if is_finished(status.get("phase")):
                    return obj
                progress.step(_step_line(status))
                progress.tick()
        except KeyboardInterrupt:
            raise CommandError(
                f"interrupted; IdmRestore {namespace}/{name} goes on (deleting it stops it: kubectl delete "
                f"idmrestore {name} -n {namespace})",
                EXIT_INTERRUPTED,
            ) from None
    raise CommandError(
        f"IdmRestore {namespace}/{name} did not finish within {timeout:g}s; it goes on: "
        f"kubectl describe idmrestore {name} -n {namespace}"
    )


def _scratch_remaining(api: client.ApiClient, namespace: str, name: str, stream: Any) -> list[str] | None:
    """What is left of a finished drill's scratch server (its pod, claim and NetworkPolicy, by their label),
    after waiting up to SCRATCH_GONE_SECONDS: the operator deletes them once the drill has ended, which
    its status says a moment before. None if they cannot be listed; a warning on stderr says why."""
    core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
    selector = f"{DRILL_LABEL}={name}"
    deadline = time.monotonic() + SCRATCH_GONE_SECONDS
    with Progress(stream) as progress:
        while True:
            try:
                left = [
                    f"{kind}/{item.metadata.name}"
                    for kind, listing in (
                        ("pod", core.list_namespaced_pod),
                        ("persistentvolumeclaim", core.list_namespaced_persistent_volume_claim),
                        ("networkpolicy", networking.list_namespaced_network_policy),
                    )
                    for item in listing(
                        namespace, label_selector=selector, _request_timeout=API_TIMEOUT
                    ).items
                ]
            except client.ApiException as err:
                problem = _api_refusal(err)
            except urllib3.exceptions.HTTPError as err:
                problem = _unreachable(err)
            else:
                if not left or time.monotonic() >= deadline:
                    return left
                progress.step(f"waiting for the scratch server to be deleted: {', '.join(left)}")
                progress.tick()
                time.sleep(1)
                continue
            _error(f"cannot tell whether the scratch server of {name} is gone: {problem}", "warning")
            return None


_YAML_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _yaml_file(path: str, option: str) -> dict[str, Any]:
    """The one YAML mapping in a file given to `option`; usage errors (2) say what is wrong with it."""
    text = _read_file(path, f"{option} file").decode("utf-8", "replace")
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or err
        raise CommandError(f"{option} {path} is not YAML: {where}{one_line(problem)}", EXIT_USAGE) from None
    if len(documents) == 1 and isinstance(documents[0], dict):
        return documents[0]
    if not documents:
        found = "nothing"
    elif len(documents) > 1:
        found = f"{len(documents)} YAML documents"
    else:
        found = _YAML_KINDS.get(type(documents[0]), "something else")
    raise CommandError(f"{option} {path} holds {found}, not one YAML mapping", EXIT_USAGE)


def read_pod_template(path: str, *, claim_replaces_data: bool) -> dict[str, Any]:
    """--pod-template: a PodTemplateSpec (metadata, spec), or a whole Pod manifest, of which only the labels
    and the spec are used (less spec.nodeName: where the scheduler put that pod). Refused (2) before anything
    is created: what is no pod template, and a template mounting a claim the drill would share, production's
    data perhaps (the claim template replaces the volume named data; a read-only claim is left alone)."""
    document = _yaml_file(path, "--pod-template")
    kind, spec, metadata = document.get("kind"), document.get("spec"), document.get("metadata") or {}
    if kind not in (None, "Pod"):
        hint = (
            ": its spec.template is a PodTemplateSpec"
            if isinstance(spec, dict) and "template" in spec
            else ""
        )
        raise CommandError(
            f"--pod-template {path} is a {kind}, not a Pod or a PodTemplateSpec{hint}", EXIT_USAGE
        )
    containers = spec.get("containers") if isinstance(spec, dict) else None
    if not containers or not isinstance(containers, list) or not all(isinstance(c, dict) for c in containers):
        raise CommandError(
            f"--pod-template {path} has no spec.containers: a PodTemplateSpec (metadata, spec) or a Pod "
            "manifest is needed",
            EXIT_USAGE,
        )
    if not isinstance(metadata, dict):
        raise CommandError(f"--pod-template {path}: its metadata is not a mapping", EXIT_USAGE)
    assert isinstance(spec, dict)
    if kind == "Pod":
        # What makes the pod what it is; not its name, namespace, owners or status.
        metadata = {"labels": metadata["labels"]} if metadata.get("labels") else {}
        spec = {k: v for k, v in spec.items() if k != "nodeName"}
    shared = [
        f"{volume} (claim {claim})"
        for volume, claim in scratch.shared_claims({"spec": spec}, claim_replaces_data=claim_replaces_data)
    ]
    if shared:
        raise CommandError(
            f"--pod-template {path} mounts {', '.join(shared)} read-write: the drill would restore into a "
            "volume it shares, production's perhaps. Give --volume-claim-template (a claim of its own for "
            "the volume named data), or take that volume out",
            EXIT_USAGE,
        )
    return {**({"metadata": metadata} if metadata else {}), "spec": spec}


def read_claim_template(path: str) -> dict[str, Any]:
    """--volume-claim-template: a PersistentVolumeClaim's spec, or a whole claim manifest (its spec)."""
    document = _yaml_file(path, "--volume-claim-template")
    kind = document.get("kind")
    if kind is not None and kind != "PersistentVolumeClaim":
        raise CommandError(
            f"--volume-claim-template {path} is a {kind}, not a PersistentVolumeClaim or its spec", EXIT_USAGE
        )
    spec = document.get("spec") if kind else document
    if not isinstance(spec, dict) or not {"accessModes", "resources"} & set(spec):
        raise CommandError(
            f"--volume-claim-template {path} has no claim spec: neither accessModes nor resources", EXIT_USAGE
        )
    return spec


def _drill(args: argparse.Namespace) -> int:
    _check_restore_what(args)
    # The files first: a template that is none is said before anything is read or created.
    claim = read_claim_template(args.volume_claim_template) if args.volume_claim_template else None
    template = read_pod_template(args.pod_template, claim_replaces_data=claim is not None)
    namespace = _namespace(args)
    custom = None if args.location else client.CustomObjectsApi(_api(args))
    source = _restore_source(args, custom, namespace)
    drill: dict[str, Any] = {"podTemplate": template, "ldap": _ldap(args, None)}
    if claim is not None:
        drill["volumeClaimTemplate"] = claim
    if args.ready_timeout is not None:
        drill["readyTimeoutSeconds"] = args.ready_timeout
    spec = {"mode": "Drill", "source": source.spec, **_decryption(args), **_restore_how(args), "drill": drill}
    return _create_and_follow(
        args,
        custom,
        namespace,
        source,
        spec,
        lambda name: f"into scratch pod {bounded_name(name, '-drill')}, walled off, deleted afterwards",
    )


# -- list -----------------------------------------------------------------------------------------------


def _list_backups(custom: Any, namespace: str | None, selector: str | None) -> list[dict[str, Any]]:
    try:
        if namespace is None:
            found = custom.list_cluster_custom_object(
                GROUP, VERSION, IDMBACKUPS, label_selector=selector, _request_timeout=API_TIMEOUT
            )
        else:
            found = custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, IDMBACKUPS, label_selector=selector, _request_timeout=API_TIMEOUT
            )
    except client.ApiException as err:
        raise CommandError(f"cannot list IdmBackups: {_api_refusal(err)}") from None
    items: list[dict[str, Any]] = found["items"]
    items.sort(
        key=lambda b: (b["metadata"]["namespace"], b["metadata"]["creationTimestamp"], b["metadata"]["name"])
    )
    return [backup_summary(item) for item in items]


def _list(args: argparse.Namespace) -> int:
    if args.storage is not None:
        return _list_storage(args)
    custom = client.CustomObjectsApi(_api(args))
    selector = f"{SCHEDULE_LABEL}={args.schedule}" if args.schedule else None
    backups = _list_backups(custom, None if args.all_namespaces else _namespace(args), selector)
    if args.output in ("json", "yaml"):
        emit_document({"items": backups}, args.output)
    elif not backups:
        print("no IdmBackups found")
    else:
        print(backups_table(backups, wide=args.output == "wide", namespaces=args.all_namespaces))
    return EXIT_OK


def _list_storage(args: argparse.Namespace) -> int:
    if not args.storage and not args.schedule:
        raise CommandError(
            "--storage needs a location (s3://bucket/prefix or a directory) or --schedule", EXIT_USAGE
        )
    # The scratch directory holds a CA file the store may read on each connection, and goes after.
    with tempfile.TemporaryDirectory(prefix="idm-backup-cli-") as ca_dir:
        if args.storage:
            try:
                store = verify.open_location(args.storage, _s3_options(args))
            except verify.LocationError as err:
                raise CommandError(str(err), EXIT_USAGE) from None
        else:
            store = _schedule_store(args, Path(ca_dir))
        found = [stored_summary(backup) for backup in verify.list_stored(store)]
    location = args.storage or store.uri("")
    if args.output in ("json", "yaml"):
        emit_document({"location": location, "items": found}, args.output)
        return EXIT_OK
    if not found:
        print(f"no backups stored under {clean(location)}")
        return EXIT_OK
    print(stored_table(found, wide=args.output == "wide"))
    return EXIT_OK


def _schedule_store(args: argparse.Namespace, scratch: Path) -> Store:
    """The store a schedule's template writes to, opened with the template's own credentials."""
    api = _api(args)
    namespace = _namespace(args)
    schedule = _get(
        client.CustomObjectsApi(api), namespace, IDMBACKUPSCHEDULES, args.schedule, IDMBACKUPSCHEDULE
    )
    spec = parse_backup_spec(schedule["spec"]["template"]["spec"])
    return _open_spec_store(api, namespace, spec, args, scratch)


def _open_spec_store(
    api: client.ApiClient, namespace: str, spec: BackupSpec, args: argparse.Namespace, scratch: Path
) -> Store:
    try:
        # A person's own AWS environment is theirs to use when the spec names no Secret.
        store = references.open_store(
            client.CoreV1Api(api),
            namespace,
            spec.storage,
            Path(args.pvc_root),
            scratch,
            ambient_credentials=True,
        )
    except references.ResolveError as err:
        raise CommandError(str(err)) from None
    if isinstance(store, S3Store) and args.s3_endpoint:
        # The endpoint the operator uses in the cluster may not be reachable from here.
        store = S3Store(dataclasses.replace(store.config, endpoint_url=args.s3_endpoint))
    return store


# -- describe -------------------------------------------------------------------------------------------

# kubectl's spellings too: describe idmbackup NAME, describe idmbackupschedules NAME.
_KINDS = {
    **dict.fromkeys(("backup", "backups", "idmbackup", "idmbackups"), "backup"),
    **dict.fromkeys(("schedule", "schedules", "idmbackupschedule", "idmbackupschedules"), "schedule"),
}


def _describe(args: argparse.Namespace) -> int:
    api = _api(args)
    custom = client.CustomObjectsApi(api)
    namespace = _namespace(args)
    if args.kind == "backup":
        obj = _get(custom, namespace, IDMBACKUPS, args.name, IDMBACKUP)
        with tempfile.TemporaryDirectory(prefix="idm-backup-cli-") as scratch:
            files = _stored_files(api, obj, args, Path(scratch))
        document = describe_backup(obj, _events(api, obj), files)
        text = backup_text
    else:
        obj = _get(custom, namespace, IDMBACKUPSCHEDULES, args.name, IDMBACKUPSCHEDULE)
        backups = _list_backups(custom, namespace, f"{SCHEDULE_LABEL}={args.name}")
        document = describe_schedule(obj, _events(api, obj), backups)
        text = schedule_text
    if args.output in ("json", "yaml"):
        emit_document(document, args.output)
    else:
        print("\n".join(text(document)))
    return EXIT_OK


def _stored_files(
    api: client.ApiClient, obj: Mapping[str, Any], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """The backup's files in its store, read-only: whether each is there, its size, and the manifest's
    record of it. What cannot be read is named in "problem"; describe goes on without it."""
    result: dict[str, Any] = {"location": None, "files": [], "manifest": None, "problem": None}
    try:
        found = _locate(obj)
    except CommandError as err:
        result["problem"] = str(err)
        return result
    if found is None:
        result["problem"] = "nothing stored: ipa-backup reported no backup directory"
        return result
    if args.skip_storage:
        uri = ((obj.get("status") or {}).get("archive") or {}).get("uri")
        result["location"] = uri.rsplit("/", 1)[0] + "/" if uri else None
        result["problem"] = "not read (--skip-storage)"
        return result
    keys = found.keys
    try:
        store = _open_spec_store(api, found.resource.namespace, found.spec, args, scratch)
        result["location"] = store.uri(keys.directory)
        manifest = stored.read_manifest(store, keys) or {}
        files = manifest.get("files") or {}
        records = {(files.get(k) or {}).get("name"): files.get(k) or {} for k in ("header", "archive")}
        for key in (keys.header, keys.archive, keys.manifest):
            name = key.rsplit("/", 1)[1]
            there = store.stat(key)
            record = records.get(name) or {}
            result["files"].append(
                {
                    "name": name,
                    "uri": store.uri(key),
                    "stored": there is not None,
                    "sizeBytes": there.size if there else None,
                    "manifestSizeBytes": record.get("size"),
                    "manifestSHA256": record.get("sha256"),
                }
            )
        if manifest:
            owner = (manifest.get("resource") or {}).get("uid")
            result["manifest"] = {
                "createdAt": manifest.get("createdAt"),
                "operatorVersion": manifest.get("operatorVersion"),
                "resourceUID": owner,
                "ownedByThisBackup": stored.owns(manifest, found.resource),
            }
        else:
            result["problem"] = "no manifest.json: the backup is incomplete (the manifest is written last)"
    except (CommandError, StorageError, stored.StoredBackupError) as err:
        result["problem"] = str(err)
    return result


# -- verify ---------------------------------------------------------------------------------------------


def _s3_options(args: argparse.Namespace) -> verify.S3Options:
    return verify.S3Options(endpoint=args.s3_endpoint, addressing=args.s3_addressing, ca_bundle=args.s3_ca)


def _is_location(target: str) -> bool:
    return "://" in target or "/" in target or Path(target).is_dir()


class _Counted(io.RawIOBase):
    """A stored file read through `WatchedStore`: counts what passes, and keeps what failed."""

    def __init__(self, store: WatchedStore, name: str, source: BinaryIO) -> None:
        self._store, self._name, self._source = store, name, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._source.read(len(view))
        except StorageError as err:
            self._store.failed(err)
            raise
        view[: len(data)] = data
        self._store.read(self._name, data)
        return len(data)

    def close(self) -> None:
        self._source.close()
        super().close()


class WatchedStore(Store):
    """The store `verify` reads through: it shows which file is read and how far (the archive against the
    manifest's size), remembers the storage failures (could not check, rather than broken), and writes,
    deletes and lists nothing. verify.py has no progress hook; its reads are what it does."""

    def __init__(self, inner: Store, progress: Progress) -> None:
        self.inner, self.progress = inner, progress
        self.failures: list[StorageError] = []
        self._manifest = bytearray()
        self._archive_size: int | None = None
        self._done = 0

    def failed(self, err: StorageError) -> None:
        if not isinstance(err, ObjectNotFound):  # a missing file is the backup's fault, not the store's
            self.failures.append(err)

    def read(self, name: str, data: bytes) -> None:
        if name == layout.MANIFEST_FILE:
            if len(self._manifest) < 16 * 1024 * 1024:
                self._manifest += data
        elif name != "header":
            self._done += len(data)
            self.progress.transferred(self._done, self._archive_size)

    def uri(self, key: str) -> str:
        return self.inner.uri(key)

    def open_read(self, key: str) -> BinaryIO:
        name = key.rsplit("/", 1)[-1]
        if name == layout.MANIFEST_FILE:
            self.progress.step("reading the manifest")
        elif name == "header":
            self.progress.step("checking the header")
        else:
            try:
                self._archive_size = layout.parse_manifest(bytes(self._manifest))["files"]["archive"]["size"]
            except (ValueError, KeyError, TypeError):
                self._archive_size = None
            self._done = 0
            self.progress.step(f"reading {name}")
        try:
            source = self.inner.open_read(key)
        except StorageError as err:
            self.failed(err)
            raise
        return io.BufferedReader(_Counted(self, name, source), CHUNK_SIZE)

    def stat(self, key: str) -> StoredObject | None:
        return self.inner.stat(key)

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        raise StorageError("verify lists nothing")

    def open_upload(self, key: str) -> Upload:
        raise StorageError("verify writes nothing")

    def delete(self, key: str) -> None:
        raise StorageError("verify deletes nothing")

    def check_writable(self) -> None:
        raise StorageError("verify writes nothing")

    def clean_incomplete(self, prefix: str = "", *, started_before: datetime.datetime) -> list[str]:
        raise StorageError("verify deletes nothing")


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise CommandError(f"cannot read {what} {path}: {err.strerror or err}") from None


# verify's reasons that are about the key given, not the backup.
_KEY_PROBLEMS = (
    "the archive is encrypted (to ",
    "the key file holds no OpenPGP private key",
    "the key (",
    "the private key cannot be used",
)


def _verify(args: argparse.Namespace) -> int:
    secret_key = _read_file(args.key, "the key file") if args.key else None
    passphrase = None
    if args.passphrase_file:
        passphrase = _read_file(args.passphrase_file, "the passphrase file").decode().rstrip("\r\n")
    with tempfile.TemporaryDirectory(prefix="idm-backup-cli-") as scratch:
        expected_uid = server_id = None
        if _is_location(args.target):
            try:
                store, directory = verify.backup_directory_location(args.target, _s3_options(args))
            except verify.LocationError as err:
                raise CommandError(str(err), EXIT_USAGE) from None
        else:
            store, directory, expected_uid, server_id = _resource_location(args, Path(scratch))
        with Progress(progress_stream(args.output)) as progress:
            watched = WatchedStore(store, progress)
            verdict = verify.verify_backup(
                watched,
                directory,
                secret_key=secret_key,
                passphrase=passphrase,
                expected_uid=expected_uid,
                server_id=server_id,
            )
    # Nothing says the backup is broken, only that it could not be checked: every reason is a storage
    # failure (could not read it), or the key given (no key, not a recipient's, unusable).
    failures = [one_line(err) for err in watched.failures]
    if verdict.reasons and all(any(f in one_line(r) for f in failures) for r in verdict.reasons):
        raise CommandError(f"could not check {verdict.location}: {verdict.reasons[0]}")
    if verdict.reasons and all(r.startswith(_KEY_PROBLEMS) for r in verdict.reasons):
        raise CommandError(f"cannot check {verdict.location}: {verdict.reasons[0]}", EXIT_USAGE)
    if args.output in ("json", "yaml"):
        emit_document(verdict_document(verdict), args.output)
    else:
        shown = dataclasses.replace(verdict, facts=[with_human_sizes(fact) for fact in verdict.facts])
        print(clean(shown.render(), newlines=True))
    return EXIT_OK if verdict.restorable else EXIT_BROKEN


def _resource_location(args: argparse.Namespace, scratch: Path) -> tuple[Store, str, str, str | None]:
    """Where an IdmBackup stored its backup, from its status, and the store opened with its Secret."""
    api = _api(args)
    namespace = _namespace(args)
    obj = _get(client.CustomObjectsApi(api), namespace, IDMBACKUPS, args.target, IDMBACKUP)
    found = _locate(obj)
    if found is None:
        status = obj.get("status") or {}
        phase = status.get("phase") or Phase.PENDING.value
        message = f"IdmBackup {namespace}/{args.target} stored nothing (phase {phase}" + (
            f": {status['message']})" if status.get("message") else ")"
        )
        # A failed backup that stored nothing cannot be restored; one still going cannot be checked yet.
        raise CommandError(message, EXIT_BROKEN if phase == Phase.FAILED else EXIT_ERROR)
    store = _open_spec_store(api, namespace, found.spec, args, scratch)
    return store, found.keys.directory, found.resource.uid, verify.server_id(found.realm)


def _completion(args: argparse.Namespace) -> int:
    parser = build_parser()
    sys.stdout.write(bash_completion(parser) if args.shell == "bash" else zsh_completion(parser))
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _at_least(minimum: int, maximum: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is more than {maximum}")
        return value

    return parse


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage access")
    group.add_argument(
        "--s3-endpoint",
        help="S3 endpoint URL (default: the resource's, or $AWS_ENDPOINT_URL_S3/$AWS_ENDPOINT_URL)",
    )
    group.add_argument(
        "--s3-addressing",
        choices=("default", "path", "virtual"),
        default="default",
        help="S3 addressing style for URIs (default: path with an explicit endpoint, else automatic)",
    )
    group.add_argument("--s3-ca", help="CA bundle for the S3 endpoint (default: $AWS_CA_BUNDLE)")
    group.add_argument(
        "--pvc-root",
        default=os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT),
        help="where PVCs are mounted, for backups stored on a PVC (default: %(default)s)",
    )


def _add_restore_options(parser: argparse.ArgumentParser, verb: str, server: str) -> None:
    """What restore and drill both take first: the backup, the cluster, the output and the key."""
    what = parser.add_argument_group(f"what to {verb} (one of)")
    what.add_argument("backup", nargs="?", metavar="BACKUP", help="an IdmBackup's name: its stored archive")
    what.add_argument(
        "--schedule", metavar="NAME", help="an IdmBackupSchedule: its latest Succeeded backup, when it starts"
    )
    what.add_argument(
        "--location",
        metavar="URI",
        help="a stored backup directory: s3://bucket/prefix/<namespace>/<host>/<directory>/, "
        "pvc://claim/subPath/<namespace>/<host>/<directory>/, or a path under --pvc-root",
    )
    _add_kube_options(parser, f"the IdmRestore's namespace, with its backup, Secrets and {server}")
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json", "yaml"),
        default="text",
        help="how to print how it ended: text, or one JSON or YAML document on stdout, with progress on "
        "stderr if that is a terminal (default: %(default)s)",
    )
    key = parser.add_argument_group("decryption")
    key.add_argument("--key-secret", metavar="NAME", help="the Secret holding the ASCII-armored private key")
    key.add_argument(
        "--key-secret-key",
        metavar="KEY",
        default=DEFAULT_KEY_SECRET_KEY,
        help="its key in the Secret (default: %(default)s)",
    )
    key.add_argument(
        "--passphrase-secret", metavar="NAME", help="a Secret holding the key's passphrase (key: passphrase)"
    )


def _add_ldap_options(group: Any, *, required: bool) -> None:
    group.add_argument(
        "--ldap-url",
        metavar="URL",
        required=required,
        help="its LDAP URL, e.g. ldaps://ipa-hidden.example.test" + (" (required)" if required else ""),
    )
    group.add_argument(
        "--ldap-password-secret",
        metavar="NAME",
        required=required,
        help="the Secret with the Directory Manager's password (key: password)"
        + (" (required)" if required else ""),
    )
    group.add_argument(
        "--ldap-ca-secret",
        metavar="NAME",
        help="a Secret with the CA that signed its LDAP certificate, /etc/ipa/ca.crt (key ca.crt; "
        "default: the system's CAs)",
    )


def _add_following(group: Any, verb: str) -> None:
    group.add_argument(
        "--name", help=f"the IdmRestore's name (default: <backup, schedule or directory>-{verb}-<UTC time>)"
    )
    group.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"follow the {verb} until it finished and print how; exit 1 if it failed (default: wait)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=7200,
        metavar="SECONDS",
        help=f"give up waiting after this many seconds (exit 3); the {verb} goes on (default: %(default)g)",
    )


def _add_location_storage(parser: argparse.ArgumentParser) -> None:
    located = parser.add_argument_group("storage, for --location (the operator reads it, not this command)")
    located.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint URL as the operator reaches it (default: AWS)"
    )
    located.add_argument(
        "--s3-addressing",
        choices=("default", "path", "virtual"),
        default="default",
        help="S3 addressing style (default: path with an endpoint, else virtual)",
    )
    located.add_argument("--s3-region", metavar="REGION", help="the bucket's region (default: us-east-1)")
    located.add_argument(
        "--s3-credentials-secret",
        metavar="NAME",
        help="the Secret with the access key (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); default: the "
        "operator's own identity, if its administrator allowed that",
    )
    located.add_argument(
        "--s3-ca-secret", metavar="NAME", help="a Secret with the endpoint's CA (key ca.crt)"
    )
    located.add_argument(
        "--pvc-root",
        metavar="DIR",
        default=os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT),
        help="where the operator mounts PVCs, for a --location path (default: %(default)s)",
    )


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions, examples and exit codes are laid out by hand (`_command`); options wrap as usual."""


def _command(
    sub: Any,
    name: str,
    summary: str,
    examples: str,
    *,
    description: str | None = None,
    exit_status: bool = True,
) -> argparse.ArgumentParser:
    epilog = f"examples:\n{examples}" + (f"\n\n{EXIT_STATUS}" if exit_status else "")
    text = description or summary[0].upper() + summary[1:] + "."
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=text if "\n" in text else textwrap.fill(text, 100),
        epilog=epilog,
        formatter_class=_Help,
    )
    return parser


def _add_kube_options(
    parser: argparse.ArgumentParser, namespace_help: str, *, all_namespaces: bool = False
) -> None:
    group = parser.add_argument_group("Kubernetes (as kubectl spells them)")
    group.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config; in a pod, its service account)",
    )
    group.add_argument("--context", help="the kubeconfig context to use (default: its current-context)")
    scope = group.add_mutually_exclusive_group() if all_namespaces else group
    scope.add_argument("-n", "--namespace", help=f"{namespace_help} (default: the kubeconfig context's)")
    if all_namespaces:
        scope.add_argument(
            "-A", "--all-namespaces", action="store_true", help="IdmBackups of every namespace"
        )
    parser.add_argument("--verbose", action="store_true", help="log what is done (debug) on stderr")


def _add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default="table",
        help=f"{what}: a table (wide: more columns) with sizes in human units, or one JSON or YAML "
        "document on stdout with sizes in bytes (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idm-backup-operator",
        description="Backups of FreeIPA on Kubernetes",
        epilog=EXIT_STATUS.replace("exit status:", "exit status of every command but run:", 1),
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = _command(
        sub,
        "run",
        "run the operator",
        """\
  # in a pod, as the chart runs it: every namespace, JSON logs, the webhook
  idm-backup-operator run --log-format json --webhook-port 9443
  # from a laptop, with the kubeconfig: one namespace, its locks there too
  idm-backup-operator run --namespace identity --lock-namespace identity
  # one of several replicas: one is active, the next takes over
  idm-backup-operator run --peering idm-backup-operator""",
        exit_status=False,
    )
    run.add_argument(
        "--namespace", action="append", help="watch only this namespace (repeatable); default: all namespaces"
    )
    run.add_argument(
        "--lock-namespace",
        type=locking.namespace_name,
        default=os.environ.get(locking.LOCK_NAMESPACE_ENV) or None,
        help="namespace of the servers' locks (Leases), for an operator run outside a cluster (env "
        f"{locking.LOCK_NAMESPACE_ENV}; default: in a pod its own namespace, else the first --namespace)",
    )
    run.add_argument("--liveness", help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=os.environ.get(logs.FORMAT_ENV) or "text",
        help=f"log lines as text or JSON (env {logs.FORMAT_ENV}; default: %(default)s)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int(metrics.PORT_ENV, metrics.DEFAULT_PORT),
        help=f"serve Prometheus metrics on this port, 0 for none (env {metrics.PORT_ENV}; "
        "default: %(default)s)",
    )
    run.add_argument(
        "--metrics-address",
        default=os.environ.get(metrics.ADDRESS_ENV) or metrics.default_address(),
        help=f"address to serve metrics on (env {metrics.ADDRESS_ENV}; default: %(default)s, "
        "all interfaces in a pod)",
    )
    run.add_argument(
        "--s3-ambient-credentials",
        action="store_true",
        default=os.environ.get(AMBIENT_ENV, "").lower() in ("1", "true", "yes"),
        help="let S3 specs without credentialsSecretRef use the operator's own AWS identity (IRSA, EKS Pod "
        f"Identity, AWS_* variables); off by default, since anyone who can create an IdmBackup then acts "
        f"with it (env {AMBIENT_ENV})",
    )
    slots = run.add_argument_group("concurrency")
    slots.add_argument(
        "--max-concurrent-backups",
        type=_at_least(1),
        default=_env_int(SLOTS_ENV, DEFAULT_SLOTS),
        help="backups this operator runs at once; more wait in a fair queue, Pending with a Waiting "
        f"condition (env {SLOTS_ENV}; default: %(default)s)",
    )
    slots.add_argument(
        "--max-concurrent-backups-per-namespace",
        type=_at_least(0),
        default=_env_int(PER_NAMESPACE_ENV, 0),
        help="at most this many of them from one namespace, 0 for no limit beyond the total; a freed "
        f"slot always goes to the namespace with the fewest running (env {PER_NAMESPACE_ENV}; "
        "default: %(default)s)",
    )
    slots.add_argument(
        "--upload-memory-budget-mib",
        type=_at_least(0),
        default=_env_int(MEMORY_ENV, DEFAULT_MEMORY_MIB),
        help="MiB of upload buffers (three S3 parts per backup) all running backups may hold together; a "
        "backup whose parts do not fit waits, one that could never fit is refused; 0 for no budget "
        f"(env {MEMORY_ENV}; default: %(default)s)",
    )
    hook = run.add_argument_group("admission webhook")
    hook.add_argument(
        "--webhook-port",
        type=int,
        default=_env_int(WEBHOOK_PORT_ENV, 0),
        help="serve the validating admission webhook (HTTPS) on this port, 0 for none "
        f"(env {WEBHOOK_PORT_ENV}; default: %(default)s); paths /validate-idmbackup and "
        "/validate-idmbackupschedule",
    )
    hook.add_argument(
        "--webhook-address",
        default=metrics.default_address(),
        help="address to serve the webhook on (default: %(default)s, all interfaces in a pod)",
    )
    hook.add_argument(
        "--webhook-cert-dir",
        default=os.environ.get(WEBHOOK_CERT_DIR_ENV) or DEFAULT_WEBHOOK_CERT_DIR,
        help=f"directory with the webhook's tls.crt and tls.key, reloaded when they change (env "
        f"{WEBHOOK_CERT_DIR_ENV}; default: %(default)s)",
    )
    ha = run.add_mutually_exclusive_group()
    ha.add_argument(
        "--peering",
        metavar="NAME",
        help="run as one of several replicas: kopf peering through the (Cluster)KopfPeering NAME",
    )
    ha.add_argument("--standalone", action="store_true", help="a single replica, no peering (the default)")
    run.set_defaults(func=_run)

    now = _command(
        sub,
        "backup-now",
        "create a backup from a schedule's template, now",
        """\
  idm-backup-operator backup-now nightly -n identity
  # follow it (step by step, live on a terminal), exit 1 if it fails
  idm-backup-operator backup-now nightly -n identity --wait --timeout 3600
  idm-backup-operator backup-now nightly --context prod --namespace identity --wait""",
    )
    now.add_argument("schedule", help="the IdmBackupSchedule's name")
    _add_kube_options(now, "its namespace")
    now.add_argument(
        "--wait",
        action="store_true",
        help="follow the backup until it finished, with its progress; exit 1 if it failed",
    )
    now.add_argument(
        "--timeout", type=float, default=7200, help="with --wait: give up after this many seconds (exit 3)"
    )
    now.set_defaults(func=_backup_now)

    listing = _command(
        sub,
        "list",
        "list backups: the IdmBackups, or what is stored (--storage)",
        """\
  idm-backup-operator list -n identity
  idm-backup-operator list -A -o wide
  idm-backup-operator list -n identity -o json | jq -r '.items[] | select(.phase == "Failed") | .name'
  # what is stored: from the manifests, with the AWS_* environment for credentials
  idm-backup-operator list --storage s3://idm-backups/prod --s3-endpoint https://s3.example.com
  # where a schedule's template stores, with the template's own credentials Secret
  idm-backup-operator list -n identity --schedule nightly --storage -o yaml""",
    )
    _add_kube_options(listing, "namespace", all_namespaces=True)
    _add_output(listing, "how to print them")
    listing.add_argument("--schedule", help="only this schedule's backups; with --storage alone, its storage")
    listing.add_argument(
        "--storage",
        nargs="?",
        const="",
        metavar="LOCATION",
        help="list the backups stored at s3://bucket/prefix or in a directory (read from their manifests); "
        "without LOCATION, in the storage of --schedule's template",
    )
    _add_storage_options(listing)
    listing.set_defaults(func=_list)

    describe = _command(
        sub,
        "describe",
        "show a backup or a schedule: status, conditions, Events, stored files",
        """\
  idm-backup-operator describe backup nightly-202611260200 -n identity
  idm-backup-operator describe schedule nightly -n identity -o yaml
  idm-backup-operator describe backup nightly-202611260200 -n identity -o json | jq .storedFiles
  # without reading the storage (no S3 credentials needed)
  idm-backup-operator describe backup nightly-202611260200 -n identity --skip-storage""",
        description="Show an IdmBackup (status, conditions, recent Events, and its files as stored: present, "
        "sizes, the manifest's checksums) or an IdmBackupSchedule (status, conditions, its backups, recent "
        "Events). Nothing is changed, in the cluster or in the storage.",
    )
    describe.add_argument(
        "kind",
        type=lambda text: _KINDS.get(text.lower(), text),
        choices=("backup", "schedule"),
        help="what to describe (idmbackup and idmbackupschedule work too)",
    )
    describe.add_argument("name", help="its name")
    _add_kube_options(describe, "its namespace")
    _add_output(describe, "how to print it")
    describe.add_argument(
        "--skip-storage", action="store_true", help="do not read the stored files (no storage access)"
    )
    _add_storage_options(describe)
    describe.set_defaults(func=_describe)

    check = _command(
        sub,
        "verify",
        "check that a stored backup can be restored",
        """\
  idm-backup-operator verify nightly-202611260200 -n identity --key restore.asc
  AWS_PROFILE=backups idm-backup-operator verify \\
      s3://idm-backups/prod/identity/ipa.example.test/ipa-full-2026-11-26-02-00-03/ --key restore.asc
  idm-backup-operator verify ./ipa-full-2026-11-26-02-00-03 --key restore.asc -o json | jq .restorable""",
        description="Download the manifest, check the header's and archive's sizes and sha256, decrypt the\n"
        "archive with the private key, check the plaintext against the manifest and list the tar.\n"
        "Progress (step, bytes, rate, time left) is live on a terminal, plain lines otherwise.",
    )
    check.add_argument(
        "target",
        help="an IdmBackup's name, or a backup directory: s3://bucket/.../ipa-full-.../ or a local path",
    )
    _add_kube_options(check, "the IdmBackup's namespace")
    _add_output(check, "how to print the verdict")
    check.add_argument("--key", help="the private key file (ASCII-armored or binary), for encrypted archives")
    check.add_argument("--passphrase-file", help="a file holding the private key's passphrase")
    _add_storage_options(check)
    check.set_defaults(func=_verify)

    restore = _command(
        sub,
        "restore",
        "restore a backup into a FreeIPA server: create an IdmRestore and follow it",
        """\
  # a server from its own backup (the IdmBackup's spec.target), followed step by step
  idm-backup-operator restore nightly-202611260200 -n identity --key-secret restore-key \\
      --confirm ipa-hidden.example.test
  # the latest Succeeded backup of a schedule; only userRoot, while IPA keeps running
  idm-backup-operator restore --schedule nightly -n identity --key-secret restore-key \\
      --backend userRoot --online --confirm ipa-hidden.example.test
  # from the bucket alone (the IdmBackup is gone): where it is, with which Secret, into which server
  idm-backup-operator restore -n identity --key-secret restore-key \\
      --location s3://idm-backups/prod/identity/ipa-hidden.example.test/ipa-data-2026-11-26-02-00-03/ \\
      --s3-endpoint https://s3.example.com --s3-credentials-secret s3-credentials --pod ipa-hidden \\
      --ldap-url ldaps://ipa-hidden.example.test --ldap-password-secret ipa-dm-password \\
      --confirm ipa-hidden.example.test
  # create it and leave it to the operator
  idm-backup-operator restore nightly-202611260200 -n identity --key-secret restore-key \\
      --confirm ipa-hidden.example.test --no-wait -o json | jq -r .name""",
        description="Create an IdmRestore: the operator verifies the archive with the private key (from a\n"
        "Secret), stages it in the server's pod, runs ipa-restore, checks the restored entries over LDAP,\n"
        "hides the replica again and lists the other masters to re-initialize. Without --pod or --host the\n"
        "server is the one the backup was taken of (the IdmBackup's spec.target).\n"
        "A restore overwrites the server's live directory: --confirm with its FQDN is required.\n"
        "Each step is printed as it starts (live on a terminal), then how the restore ended.",
    )
    _add_restore_options(restore, "restore", "server")
    into = restore.add_argument_group("the server to restore into (default: the backup's spec.target)")
    pod = into.add_mutually_exclusive_group()
    pod.add_argument("--pod", metavar="NAME", help="the FreeIPA server's pod")
    pod.add_argument(
        "--host", metavar="FQDN", help="the server's FQDN: the pod whose IPA_SERVER_HOSTNAME it is"
    )
    into.add_argument(
        "--container", metavar="NAME", help="the container that runs FreeIPA (default: the pod's first)"
    )
    _add_ldap_options(into, required=False)
    into.add_argument(
        "--confirm",
        metavar="FQDN",
        help="the server's FQDN, typed out: its live directory is overwritten (required)",
    )
    how = restore.add_argument_group("how")
    _add_restore_how(how)
    _add_following(how, "restore")
    _add_location_storage(restore)
    restore.set_defaults(func=_restore)

    drill = _command(
        sub,
        "drill",
        "prove a backup restores: into a throwaway server, timed, then deleted",
        """\
  # a backup into a scratch copy of its server (pod.yaml: a Pod or a PodTemplateSpec with the same
  # image, realm and host name), behind a deny-all-egress policy, and how long the restore took
  idm-backup-operator drill nightly-202611260200 -n identity --key-secret restore-key \\
      --pod-template pod.yaml --ldap-url ldaps://ipa-hidden.example.test \\
      --ldap-password-secret drill-dm-password --ldap-ca-secret ipa-ca
  # in a namespace of its own, from the bucket, on a scratch volume; the restore time for a script
  idm-backup-operator drill -n idm-drills --key-secret restore-key \\
      --location s3://idm-backups/prod/identity/ipa-hidden.example.test/ipa-data-2026-11-26-02-00-03/ \\
      --s3-endpoint https://s3.example.com --s3-credentials-secret s3-credentials \\
      --pod-template pod.yaml --volume-claim-template claim.yaml \\
      --ldap-url ldaps://ipa-hidden.example.test --ldap-password-secret drill-dm-password \\
      -o json | jq .drill.restoreSeconds
  # the latest Succeeded backup of a schedule, created and left to the operator
  idm-backup-operator drill --schedule nightly -n identity --key-secret restore-key \\
      --pod-template pod.yaml --ldap-url ldaps://ipa-hidden.example.test \\
      --ldap-password-secret drill-dm-password --no-wait""",
        description="Create an IdmRestore in mode Drill: the operator creates a throwaway FreeIPA pod from\n"
        "the template, behind a NetworkPolicy that denies all its egress, and restores the archive into it\n"
        "with every gate and check of a restore; production is not touched. It records how long the restore\n"
        "took (from staging to the end of the data check: the restore time a real recovery can expect) and\n"
        "the entries found, then deletes the pod, its claim and its policy, whatever happened.\n"
        "The operator must run drills (IDM_BACKUP_ENABLE_DRILLS=true), and refuses one whose scratch pod a\n"
        "backup of the namespace could target: run drills in a namespace of their own.\n"
        "Each step is printed as it starts (live on a terminal), then how the drill ended.",
    )
    _add_restore_options(drill, "drill", "the scratch server")
    scratch = drill.add_argument_group("the scratch server (created for the drill, deleted after it)")
    scratch.add_argument(
        "--pod-template",
        metavar="FILE",
        required=True,
        help="YAML: a PodTemplateSpec (metadata, spec), or a Pod manifest whose labels and spec are used; "
        "like the production server's, with the same image, realm and host name (required)",
    )
    scratch.add_argument(
        "--volume-claim-template",
        metavar="FILE",
        help="YAML: a PersistentVolumeClaim's spec (or manifest) for the pod's volume named data, created "
        "and deleted with it",
    )
    _add_ldap_options(scratch, required=True)
    scratch.add_argument(
        "--ready-timeout",
        type=_at_least(60, 86400),
        metavar="SECONDS",
        help="how long it may take to install itself and become Ready (default: 1800)",
    )
    how = drill.add_argument_group("how")
    _add_restore_how(how)
    _add_following(how, "drill")
    _add_location_storage(drill)
    drill.set_defaults(func=_drill)

    completion = _command(
        sub,
        "completion",
        "print a shell completion script",
        """\
  source <(idm-backup-operator completion bash)     # bash, in this shell
  idm-backup-operator completion bash > /etc/bash_completion.d/idm-backup-operator
  idm-backup-operator completion zsh > "${fpath[1]}/_idm-backup-operator"   # zsh, with compinit""",
        exit_status=False,
    )
    completion.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    completion.set_defaults(func=_completion)
    return parser


def _error(message: str, label: str = "error") -> None:
    print(f"{label}: {clean(one_line(message))}", file=sys.stderr, flush=True)


def _quiet_logging(verbose: bool) -> None:
    """Library warnings (urllib3's retries, botocore's) are not the command's output: shown with --verbose."""
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    elif not root.handlers:
        root.addHandler(logging.NullHandler())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is not _run and args.func is not _completion:
        _quiet_logging(args.verbose)
    try:
        result: int = args.func(args)
    except CommandError as err:
        _error(str(err))
        return err.code
    except client.ApiException as err:
        _error(f"the Kubernetes API server refused: {_api_refusal(err)}")
        return EXIT_ERROR
    except urllib3.exceptions.HTTPError as err:
        _error(_unreachable(err))
        return EXIT_ERROR
    except (StorageError, references.ResolveError, stored.StoredBackupError) as err:
        _error(str(err))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `| head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as err:
        _error(f"{err.filename + ': ' if err.filename else ''}{err.strerror or err}")
        return EXIT_ERROR
    return result


if __name__ == "__main__":
    sys.exit(main())
