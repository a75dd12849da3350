"""Operator start-up: API clients shared by all handlers, and kopf's own settings."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client, config

from idm_backup_operator import logs, metrics
from idm_backup_operator.api.names import (
    FINALIZER,
    GROUP,
    IDMBACKUPS,
    IDMBACKUPSCHEDULES,
    KOPF_ANNOTATION_PREFIX,
    VERSION,
)
from idm_backup_operator.handlers import idmbackupschedule as schedules
from idm_backup_operator.idmbackup import leftovers
from idm_backup_operator.kube import locking, webhookcert
from idm_backup_operator.kube.podexec import PodExec
from idm_backup_operator.kube.services import Services
from idm_backup_operator.slots import BackupSlots

log = logging.getLogger(__name__)

PVC_ROOT_ENV = "IDM_BACKUP_PVC_ROOT"
DEFAULT_PVC_ROOT = "/var/lib/idm-backup-operator/pvc"
# How old an incomplete upload must be for start-up to remove it (default: the longest deadline, 7 days).
LEFTOVER_AGE_ENV = "IDM_BACKUP_LEFTOVER_AGE_SECONDS"
# Restore drills create pods from IdmRestore templates: off unless the administrator turns them on.
DRILLS_ENV = "IDM_BACKUP_ENABLE_DRILLS"
_YES = ("1", "true", "yes")
WEBHOOK_PORT_ENV = "IDM_BACKUP_WEBHOOK_PORT"
WEBHOOK_CERT_DIR_ENV = "IDM_BACKUP_WEBHOOK_CERT_DIR"
DEFAULT_WEBHOOK_CERT_DIR = "/etc/idm-backup-operator/webhook-tls"
# The chart's operator certificate mode: how often the operator checks its certificate, the Secret that
# keeps it and the configuration's caBundle (kube/webhookcert.py).
WEBHOOK_CERT_CHECK_ENV = "IDM_BACKUP_WEBHOOK_CERT_CHECK_SECONDS"
DEFAULT_WEBHOOK_CERT_CHECK_SECONDS = 60.0
# How long a shutdown waits for running backups to wind down: stopping ipa-backup takes seconds,
# `ipactl start` of a real server up to a minute or two. The chart's grace period leaves room for it.
WIND_DOWN_SECONDS = 150


@dataclasses.dataclass(frozen=True)
class WebhookConfig:
    """Where the validating admission webhook listens, and its certificate directory: tls.crt and tls.key,
    or (the chart's operator mode) the certificate.json that says what certificate to make."""

    port: int
    address: str
    cert_dir: Path

    def server(self, certfile: Path | None = None, pkeyfile: Path | None = None) -> kopf.WebhookServer:
        # The API server verifies us with the caBundle of the ValidatingWebhookConfiguration (the Helm
        # chart's, cert-manager's, or the one the operator puts there); kopf only serves, and reloads the
        # files when they change.
        return kopf.WebhookServer(
            addr=self.address,
            port=self.port,
            certfile=certfile or self.cert_dir / "tls.crt",
            pkeyfile=pkeyfile or self.cert_dir / "tls.key",
        )


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


def configure_logging(log_format: str = "text", *, verbose: bool = False) -> None:
    """Set up the root logger for the operator: kopf's handler, our format, redaction everywhere."""
    if log_format not in logs.FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: use one of {', '.join(logs.FORMATS)}")
    # kopf installs its own handler on the root logger (a second one would print every line twice);
    # with log_prefix, text lines say which object they are about, as "[namespace/name]".
    # JSON lines come from logs.JsonFormatter on that handler, not from kopf's own JSON format
    # (kopf.LogFormat.JSON, python-json-logger): that one formats a record's exception again from the
    # exception itself, so the traceback the filter redacted (exc_text) would be printed unredacted, and it
    # names the fields differently (timestamp, severity, the object nested under "object").
    kopf.configure(verbose=verbose, log_prefix=log_format == "text")
    redacting = logs.RedactingFilter()
    for handler in logging.getLogger().handlers:
        if log_format == "json":
            handler.setFormatter(logs.JsonFormatter())
        handler.addFilter(redacting)
    # kopf posts what its per-object loggers say as Events, from a handler on this logger rather than
    # the root's: a filter on the logger itself runs before that handler too.
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, logs.RedactingFilter) for f in objects.filters):
        objects.addFilter(redacting)
    for noisy in logs.NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.INFO)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and the last handled spec go into annotations of our own prefix; the CRD status schema
    # has no room for kopf's bookkeeping, and the prefix makes clear who owns them.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_ANNOTATION_PREFIX)
    settings.persistence.finalizer = FINALIZER
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Our handlers post their own, meaningful Events; kopf's per-handler ones would only add noise.
    settings.posting.level = logging.WARNING
    # The namespace of every server's lock, before anything starts: without one, the operator stops here.
    try:
        locking.configure(memo.get("lock_namespace"), memo.get("namespaces") or ())
    except locking.LockNamespaceUnknown as err:
        raise kopf.PermanentError(str(err)) from None
    api = api_client()
    memo.api = api
    # (namespace, schedule uid) -> asyncio.Event, set when one of its backups ends or a restore there
    # takes or gives back a server's lock.
    memo.schedule_wakeups = {}
    # uids of the backups this process has finished; a few dozen bytes per backup ever taken.
    memo.backups_finished = set()
    # uid -> the final status of a backup this process ended but could not record; written again.
    memo.unwritten_outcomes = {}
    # Backups are blocking and long: each runs in a thread of its own pool, one thread per slot, so that
    # kopf's pool stays free for finalizers and admission however many backups run or wait.
    slots: BackupSlots = memo.get("backup_slots") or BackupSlots.from_env()
    memo.backup_slots = slots
    memo.backup_executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=slots.limit, thread_name_prefix="backup"
    )
    memo.services = Services(
        core=client.CoreV1Api(api),
        coordination=client.CoordinationV1Api(api),
        execs=PodExec(api),
        pvc_root=Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)),
        ambient_s3_credentials=bool(memo.get("ambient_s3_credentials")),
        drills_enabled=bool(memo.get("drills_enabled")) or os.environ.get(DRILLS_ENV, "").lower() in _YES,
        locks_changed=functools.partial(schedules.wake_namespace, memo),
    )
    start_metrics(memo, api)
    memo.metrics.registry.register(metrics.SlotMetrics(slots))


@kopf.on.startup()
async def clean_leftover_uploads(memo: kopf.Memo, **_: Any) -> None:
    """In the background: start-up must not wait on every bucket of the cluster."""
    age = datetime.timedelta(
        seconds=float(os.environ.get(LEFTOVER_AGE_ENV) or leftovers.DEFAULT_AGE.total_seconds())
    )
    memo.leftover_cleaning = asyncio.create_task(
        asyncio.to_thread(
            leftovers.clean_leftovers, memo.services, memo.get("namespaces") or [], older_than=age
        )
    )


def start_metrics(memo: kopf.Memo, api: client.ApiClient) -> None:
    """Metrics from the resources as they are now, then the endpoint: never a scrape of empty gauges.

    The command line puts its options into the memo; started some other way, the environment decides.
    """
    state = metrics.BackupMetrics()
    memo.metrics = state
    namespaces: list[str] = list(memo.get("namespaces") or ())
    custom = client.CustomObjectsApi(api)
    try:
        state.seed(
            metrics.list_resources(custom, GROUP, VERSION, IDMBACKUPS, namespaces),
            metrics.list_resources(custom, GROUP, VERSION, IDMBACKUPSCHEDULES, namespaces),
        )
    except client.ApiException as err:
        # The watches deliver the same objects moments later; only the very first scrapes are short.
        log.warning("could not list the resources for the metrics (%s %s)", err.status, err.reason)
    endpoint: metrics.MetricsConfig = memo.get("metrics_config") or metrics.MetricsConfig.from_env()
    if endpoint.port == 0:
        return
    try:
        memo.metrics_server = metrics.MetricsServer(state, endpoint)
    except OSError as err:
        # Backups matter more than their metrics: the operator runs on, and says so loudly.
        log.error("metrics are not served: cannot listen on %s:%s: %s", endpoint.address, endpoint.port, err)
        return
    log.info("serving metrics on http://%s:%s/metrics", endpoint.address, memo.metrics_server.port)


@kopf.on.startup()
async def serve_webhook(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """The webhook's server (after `configure`, whose API client it uses): with the certificate files of
    its directory, or, when the chart's operator mode put a certificate.json there, with a certificate the
    operator makes or takes from its Secret, and keeps (kube/webhookcert.py)."""
    webhook: WebhookConfig | None = memo.get("webhook_config")
    if webhook is None:
        return
    try:
        plan = webhookcert.Plan.load(webhook.cert_dir)
    except ValueError as err:
        raise kopf.PermanentError(f"{webhook.cert_dir}: {err}") from None
    if plan is None:
        settings.admission.server = webhook.server()
        return
    keeper: webhookcert.CertificateKeeper | None = memo.get("webhook_certificate")
    if keeper is None:
        keeper = webhookcert.CertificateKeeper(
            client.CoreV1Api(memo.api), client.AdmissionregistrationV1Api(memo.api), plan
        )
        memo.webhook_certificate = keeper
    try:
        await asyncio.to_thread(keeper.reconcile)
    except webhookcert.CertificateUnavailable as err:
        # Nothing to serve yet (the Secret not synced yet, or RBAC): kopf tries again.
        raise kopf.TemporaryError(str(err), delay=10) from None
    settings.admission.server = webhook.server(keeper.served, keeper.served)
    interval = float(os.environ.get(WEBHOOK_CERT_CHECK_ENV) or DEFAULT_WEBHOOK_CERT_CHECK_SECONDS)
    memo.webhook_certificate_upkeep = asyncio.create_task(_keep_webhook_certificate(keeper, interval))


async def _keep_webhook_certificate(keeper: webhookcert.CertificateKeeper, interval: float) -> None:
    """Renewals, another replica's certificate, a caBundle or a Secret that a sync replaced: checked every
    `interval` seconds. kopf notices a changed file within a minute and serves it."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(keeper.reconcile)
        except Exception as err:  # the webhook keeps serving what it has; the next round tries again
            log.warning("webhook certificate: %s; tried again in %g s", err, interval)


@kopf.on.cleanup()
async def stop_webhook_certificate(memo: kopf.Memo, **_: Any) -> None:
    upkeep: asyncio.Task[None] | None = memo.get("webhook_certificate_upkeep")
    if upkeep is not None:
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep
    keeper: webhookcert.CertificateKeeper | None = memo.get("webhook_certificate")
    if keeper is not None:
        shutil.rmtree(keeper.directory, ignore_errors=True)


@kopf.on.cleanup()
async def wind_down_backups(memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """SIGTERM (a rollout, a drain): running backups stop ipa-backup, start IPA's services again and go
    back to Pending for the next operator; this waits for them, within the pod's grace period."""
    services: Services | None = memo.get("services")
    executor: concurrent.futures.ThreadPoolExecutor | None = memo.get("backup_executor")
    if services is None or executor is None:
        return
    services.stopping.set()
    try:
        await asyncio.wait_for(
            asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True), WIND_DOWN_SECONDS
        )
    except TimeoutError:
        logger.error(
            f"backups still running after {WIND_DOWN_SECONDS} s of shutdown: the next operator recovers them"
        )


@kopf.on.cleanup()
def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    server: metrics.MetricsServer | None = memo.get("metrics_server")
    if server is not None:
        server.stop()
