"""The validating admission webhook: refuses, at kubectl apply, what would only fail at backup time.

Registered only when the operator runs with --webhook-port (kopf refuses validation handlers without a
server). The handler ids are the URL paths: /validate-idmbackup, /validate-idmbackupschedule and
/validate-idmrestore (CREATE only: an IdmRestore's spec cannot change).

Who asks matters. The operator reads every Secret of a namespace, so the Secrets an object names must be
readable by whoever set them there (a SubjectAccessReview for the AdmissionReview's userInfo): the
operator's own requests, the backups its schedules create, are the only ones exempt. And the answers
(whether a Secret exists, whether a pod is ready) are only for the API server: with a client CA in the
certificate directory, a caller without a certificate it signed is refused during the TLS handshake.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

# Imported for its handlers: they must be registered before this module's, so that kopf, which runs
# start-up handlers in the order they were registered, has created the webhook server when
# require_client_certificates looks at it.
import idm_backup_operator.handlers.startup  # noqa: F401
from idm_backup_operator.api.names import (
    GROUP,
    IDMBACKUP,
    IDMBACKUPS,
    IDMBACKUPSCHEDULE,
    IDMBACKUPSCHEDULES,
    IDMRESTORE,
    IDMRESTORES,
    SCHEDULE_LABEL,
    VERSION,
)
from idm_backup_operator.handlers.startup import WebhookConfig
from idm_backup_operator.idmbackup import validation
from idm_backup_operator.idmbackupschedule import validation as schedule_validation
from idm_backup_operator.idmrestore import validation as restore_validation
from idm_backup_operator.kube.backups import IdmBackups
from idm_backup_operator.kube.services import Services

# In the webhook's certificate directory, next to tls.crt and tls.key: the CA that signed the API
# server's client certificate for webhooks (its --admission-control-config-file).
CLIENT_CA_FILE = "client-ca.crt"

log = logging.getLogger(__name__)


@kopf.on.startup()
def require_client_certificates(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Without a client CA, anything that reaches the port may ask about any namespace, as anyone.

    The CA is in the certificate directory (--webhook-cert-dir), in every certificate mode: in the
    chart's operator mode too, where the served certificate itself is in a directory of the operator's.
    """
    server = settings.admission.server
    if not isinstance(server, kopf.WebhookServer) or server.certfile is None:
        return
    webhook: WebhookConfig | None = memo.get("webhook_config")
    cert_dir = webhook.cert_dir if webhook is not None else Path(server.certfile).parent
    client_ca = cert_dir / CLIENT_CA_FILE
    if not client_ca.is_file():
        log.warning(
            "the admission webhook answers any caller that reaches its port: add %s, the CA of the API "
            "server's client certificate, to require that certificate",
            client_ca,
        )
        return
    server.verify_cafile = client_ca
    server.verify_mode = ssl.CERT_REQUIRED
    log.info("the admission webhook requires a client certificate signed by %s", client_ca)


class _OwnIdentity:
    """The operator's own user name, as the API server knows it (a SelfSubjectReview), asked once.

    It holds in a pod (system:serviceaccount:<namespace>:<name>) and outside one (the kubeconfig's user),
    without configuration that could disagree with the credentials actually used.
    """

    def __init__(self) -> None:
        self._username: str | None = None
        self._lock = asyncio.Lock()

    async def username(self, api: client.ApiClient) -> str | None:
        async with self._lock:
            if self._username is None:
                try:
                    review = await asyncio.to_thread(
                        client.AuthenticationV1Api(api).create_self_subject_review,
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                    )
                except client.ApiException as err:
                    # Asked again on the next review; meanwhile every request is treated as a person's.
                    log.warning("cannot tell the operator's own user name (%s %s)", err.status, err.reason)
                    return None
                self._username = review.status.user_info.username
            return self._username


_OWN_IDENTITY = _OwnIdentity()


async def _requester(userinfo: Mapping[str, Any], memo: kopf.Memo) -> validation.Requester | None:
    """The person (or other service account) behind the request; None for the operator itself."""
    username = userinfo.get("username")
    if username and username == await _OWN_IDENTITY.username(memo.api):
        return None
    return validation.Requester.from_userinfo(userinfo)


def _unchanged_or_leaving(body: kopf.Body, old: kopf.Body | None, operation: str | None) -> bool:
    """The operator's own writes (finalizers, annotations) and deletions must never be blocked: a Secret
    deleted since the object was created would otherwise pin it, and its finalizer, for ever."""
    if body.metadata.get("deletionTimestamp"):
        return True
    return operation == "UPDATE" and old is not None and old.get("spec") == body.get("spec")


def _scope(body: kopf.Body, memo: kopf.Memo) -> validation.ReferenceScope:
    services: Services = memo.services
    return validation.ReferenceScope(
        services.core,
        body.metadata.namespace or "",
        services.pvc_root,
        services.ambient_s3_credentials,
        authorization=client.AuthorizationV1Api(memo.api),
    )


def _answer(kind: str, body: kopf.Body, findings: validation.Findings, warnings: list[str]) -> None:
    warnings.extend(findings.warnings)
    if findings.errors:
        raise kopf.AdmissionError(validation.refusal(kind, body.metadata.name or "", findings), code=422)


@kopf.on.validate(GROUP, VERSION, IDMBACKUPS, id="validate-idmbackup", operations=["CREATE", "UPDATE"])
async def validate_backup(
    body: kopf.Body,
    warnings: list[str],
    memo: kopf.Memo,
    userinfo: Mapping[str, Any],
    old: kopf.Body | None = None,
    operation: str | None = None,
    **_: Any,
) -> None:
    if _unchanged_or_leaving(body, old, operation):
        return
    requester = await _requester(userinfo, memo)
    # A schedule's backup is created by the operator itself: its problems belong in its Failed status,
    # where metrics and alerts see them, not in a refusal only the operator's log would show. The label
    # alone proves nothing (anyone may set it), so it counts only on the operator's own requests.
    by_schedule = requester is None and SCHEDULE_LABEL in (body.metadata.labels or {})
    findings = await asyncio.to_thread(
        validation.backup_findings,
        body.spec,
        _scope(body, memo),
        references="skip" if by_schedule else "refuse",
        requester=requester,
    )
    _answer(IDMBACKUP, body, findings, warnings)


@kopf.on.validate(
    GROUP, VERSION, IDMBACKUPSCHEDULES, id="validate-idmbackupschedule", operations=["CREATE", "UPDATE"]
)
async def validate_schedule(
    body: kopf.Body,
    warnings: list[str],
    memo: kopf.Memo,
    userinfo: Mapping[str, Any],
    old: kopf.Body | None = None,
    operation: str | None = None,
    **_: Any,
) -> None:
    if _unchanged_or_leaving(body, old, operation):
        return
    requester = await _requester(userinfo, memo)
    now = datetime.datetime.now(datetime.UTC)
    findings = await asyncio.to_thread(
        schedule_validation.schedule_findings, body.spec, _scope(body, memo), now, requester=requester
    )
    _answer(IDMBACKUPSCHEDULE, body, findings, warnings)


@kopf.on.validate(GROUP, VERSION, IDMRESTORES, id="validate-idmrestore", operations=["CREATE"])
async def validate_restore(
    body: kopf.Body,
    warnings: list[str],
    memo: kopf.Memo,
    userinfo: Mapping[str, Any],
    old: kopf.Body | None = None,
    operation: str | None = None,
    **_: Any,
) -> None:
    if _unchanged_or_leaving(body, old, operation):
        return
    services: Services = memo.services
    findings = await asyncio.to_thread(
        restore_validation.restore_findings,
        body.spec,
        _scope(body, memo),
        requester=await _requester(userinfo, memo),
        backups=IdmBackups(services.custom),
    )
    _answer(IDMRESTORE, body, findings, warnings)
