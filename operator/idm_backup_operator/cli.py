"""Command line: `idm-backup-operator run` starts the operator; the other commands serve its users.

* ``run``: the operator itself (in a pod, or locally with a kubeconfig);
* ``backup-now SCHEDULE``: a backup from a schedule's template, now, owned by the schedule;
* ``list``: the IdmBackups of a namespace, or (``--storage``) the backups stored in a bucket or directory;
* ``verify``: whether a stored backup can be restored, checked end to end with the private key.

Everything but ``run`` works from a laptop: Kubernetes through the kubeconfig, S3 through the
IdmBackup's own credentials Secret or, for a URI, the usual ``AWS_*`` environment variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client, config

from idm_backup_operator import __version__, logs, metrics
from idm_backup_operator.api.names import (
    GROUP,
    IDMBACKUP,
    IDMBACKUPS,
    IDMBACKUPSCHEDULE,
    IDMBACKUPSCHEDULES,
    MANUAL_ANNOTATION,
    SCHEDULE_LABEL,
    VERSION,
    bounded_name,
)
from idm_backup_operator.api.phase import Phase, is_finished
from idm_backup_operator.api.spec import BackupSpec, parse_backup_spec
from idm_backup_operator.archive import stored, verify
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
from idm_backup_operator.kube import locking, references
from idm_backup_operator.kube.backups import IdmBackups, Refused
from idm_backup_operator.slots import (
    DEFAULT_MEMORY_MIB,
    DEFAULT_SLOTS,
    MEMORY_ENV,
    PER_NAMESPACE_ENV,
    SLOTS_ENV,
    BackupSlots,
)
from idm_backup_operator.storage import S3Store, StorageError, Store
from idm_backup_operator.streams import human_size

AMBIENT_ENV = "IDM_BACKUP_S3_AMBIENT_CREDENTIALS"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class CommandError(Exception):
    """A failure to report in one line, without a traceback; exits with status 1."""


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


def _api() -> client.ApiClient:
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        try:
            # The client library reads $KUBECONFIG once, at import; read it now, as kubectl does.
            return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
        except config.ConfigException as err:
            raise CommandError(f"no Kubernetes configuration: {err}") from None


def _namespace(args: argparse.Namespace) -> str:
    """-n, else the kubeconfig context's namespace, else the pod's own, else "default" (as kubectl)."""
    if args.namespace:
        return str(args.namespace)
    try:
        _, active = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        namespace = (active or {}).get("context", {}).get("namespace")
        if namespace:
            return str(namespace)
    except (config.ConfigException, OSError):
        if SERVICE_ACCOUNT_NAMESPACE.exists():
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def _get(custom: Any, namespace: str, plural: str, name: str, kind: str) -> dict[str, Any]:
    try:
        obj: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except client.ApiException as err:
        if err.status == 404:
            raise CommandError(f"{kind} {namespace}/{name} not found") from None
        raise CommandError(f"cannot read {kind} {namespace}/{name}: {err.status} {err.reason}") from None
    return obj


# -- backup-now -----------------------------------------------------------------------------------------


def manual_backup_name(schedule: str, now: datetime.datetime) -> str:
    """`<schedule>-manual-<YYYYMMDDhhmmss>` (UTC); a long schedule name is cut and given a hash."""
    return bounded_name(schedule, f"-manual-{now.astimezone(datetime.UTC):%Y%m%d%H%M%S}")


def _backup_now(args: argparse.Namespace) -> int:
    api = _api()
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
    print(f"idmbackup {namespace}/{name} created from schedule {args.schedule}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = _get(custom, namespace, IDMBACKUPS, name, IDMBACKUP).get("status") or {}
        if is_finished(status.get("phase")):
            print(f"{status['phase']}: {status.get('message', '')}")
            return 0 if status["phase"] == Phase.SUCCEEDED else 1
        time.sleep(2)
    raise CommandError(f"IdmBackup {namespace}/{name} did not finish within {args.timeout}s")


# -- list -----------------------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _human(size: Any) -> str:
    return human_size(size) if isinstance(size, int) else ""


def _list(args: argparse.Namespace) -> int:
    if args.storage is not None:
        return _list_storage(args)
    custom = client.CustomObjectsApi(_api())
    selector = f"{SCHEDULE_LABEL}={args.schedule}" if args.schedule else None
    try:
        if args.all_namespaces:
            items = custom.list_cluster_custom_object(GROUP, VERSION, IDMBACKUPS, label_selector=selector)[
                "items"
            ]
        else:
            items = custom.list_namespaced_custom_object(
                GROUP, VERSION, _namespace(args), IDMBACKUPS, label_selector=selector
            )["items"]
    except client.ApiException as err:
        raise CommandError(f"cannot list IdmBackups: {err.status} {err.reason}") from None
    items.sort(
        key=lambda b: (b["metadata"]["namespace"], b["metadata"]["creationTimestamp"], b["metadata"]["name"])
    )
    header = ["NAME", "PHASE", "TYPE", "SIZE", "COMPLETED", "ARCHIVE"]
    rows = [["NAMESPACE", *header] if args.all_namespaces else header]
    for item in items:
        status = item.get("status") or {}
        archive = status.get("archive") or {}
        row = [
            item["metadata"]["name"],
            status.get("phase") or Phase.PENDING.value,
            (item.get("spec") or {}).get("type") or "Full",
            _human(archive.get("sizeBytes")),
            status.get("completionTime") or "",
            archive.get("uri") or (status.get("reason") or ""),
        ]
        rows.append([item["metadata"]["namespace"], *row] if args.all_namespaces else row)
    if len(rows) == 1:
        print("no IdmBackups found")
        return 0
    print(_table(rows))
    return 0


def _list_storage(args: argparse.Namespace) -> int:
    if not args.storage and not args.schedule:
        raise CommandError("--storage needs a location (s3://bucket/prefix or a directory) or --schedule")
    # The scratch directory holds a CA file the store may read on each connection, and goes after.
    with tempfile.TemporaryDirectory(prefix="idm-backup-cli-") as scratch:
        if args.storage:
            store = verify.open_location(args.storage, _s3_options(args))
        else:
            store = _schedule_store(args, Path(scratch))
        try:
            found = verify.list_stored(store)
        except StorageError as err:
            raise CommandError(str(err)) from None
    if not found:
        print(f"no backups stored under {args.storage or store.uri('')}")
        return 0
    rows = [["DIRECTORY", "TYPE", "HOST", "CREATED", "SIZE", "IDMBACKUP"]]
    for backup in found:
        manifest = backup.manifest
        if manifest is None:
            rows.append([backup.directory, "", "", "", "", backup.problem or ""])
            continue
        resource = manifest.get("resource") or {}
        rows.append(
            [
                backup.directory,
                (manifest.get("header") or {}).get("type", ""),
                (manifest.get("server") or {}).get("host", ""),
                manifest.get("createdAt", ""),
                _human(manifest["files"]["archive"].get("size")),
                f"{resource.get('namespace')}/{resource.get('name')}",
            ]
        )
    print(_table(rows))
    return 0


def _schedule_store(args: argparse.Namespace, scratch: Path) -> Store:
    """The store a schedule's template writes to, opened with the template's own credentials."""
    api = _api()
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


# -- verify ---------------------------------------------------------------------------------------------


def _s3_options(args: argparse.Namespace) -> verify.S3Options:
    return verify.S3Options(endpoint=args.s3_endpoint, addressing=args.s3_addressing, ca_bundle=args.s3_ca)


def _is_location(target: str) -> bool:
    return "://" in target or "/" in target or Path(target).is_dir()


def _verify(args: argparse.Namespace) -> int:
    secret_key = Path(args.key).read_bytes() if args.key else None
    passphrase = Path(args.passphrase_file).read_text().rstrip("\r\n") if args.passphrase_file else None
    with tempfile.TemporaryDirectory(prefix="idm-backup-cli-") as scratch:
        expected_uid = server_id = None
        if _is_location(args.target):
            try:
                store, directory = verify.backup_directory_location(args.target, _s3_options(args))
            except verify.LocationError as err:
                raise CommandError(str(err)) from None
        else:
            store, directory, expected_uid, server_id = _resource_location(args, Path(scratch))
        verdict = verify.verify_backup(
            store,
            directory,
            secret_key=secret_key,
            passphrase=passphrase,
            expected_uid=expected_uid,
            server_id=server_id,
        )
    print(verdict.render())
    return 0 if verdict.restorable else 1


def _resource_location(args: argparse.Namespace, scratch: Path) -> tuple[Store, str, str, str | None]:
    """Where an IdmBackup stored its backup, from its status, and the store opened with its Secret."""
    api = _api()
    namespace = _namespace(args)
    obj = _get(client.CustomObjectsApi(api), namespace, IDMBACKUPS, args.target, IDMBACKUP)
    found = stored.locate(obj)
    if found is None:
        status = obj.get("status") or {}
        raise CommandError(
            f"IdmBackup {namespace}/{args.target} stored nothing (phase {status.get('phase') or 'Pending'}"
            f"{': ' + status['message'] if status.get('message') else ''})"
        )
    store = _open_spec_store(api, namespace, found.spec, args, scratch)
    return store, found.keys.directory, found.resource.uid, verify.server_id(found.realm)


# -- the parser -----------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idm-backup-operator", description="Backups of FreeIPA on Kubernetes"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator")
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

    now = sub.add_parser("backup-now", help="create a backup from a schedule's template, now")
    now.add_argument("schedule", help="the IdmBackupSchedule's name")
    now.add_argument("-n", "--namespace", help="its namespace (default: the kubeconfig context's)")
    now.add_argument(
        "--wait", action="store_true", help="wait until the backup finished; exit 1 if it failed"
    )
    now.add_argument(
        "--timeout", type=float, default=7200, help="with --wait: give up after this many seconds"
    )
    now.set_defaults(func=_backup_now)

    listing = sub.add_parser("list", help="list backups: the IdmBackups, or what is stored (--storage)")
    scope = listing.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="IdmBackups of every namespace")
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

    check = sub.add_parser(
        "verify",
        help="check that a stored backup can be restored",
        description="Download the manifest, check the header's and archive's sizes and sha256, decrypt the "
        "archive with the private key, check the plaintext against the manifest and list the tar: "
        "exit status 0 when the backup can be restored, 1 when it cannot, 2 for usage errors.",
    )
    check.add_argument(
        "target",
        help="an IdmBackup's name, or a backup directory: s3://bucket/.../ipa-full-.../ or a local path",
    )
    check.add_argument(
        "-n", "--namespace", help="the IdmBackup's namespace (default: the kubeconfig context's)"
    )
    check.add_argument("--key", help="the private key file (ASCII-armored or binary), for encrypted archives")
    check.add_argument("--passphrase-file", help="a file holding the private key's passphrase")
    _add_storage_options(check)
    check.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. an unreadable key file
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
