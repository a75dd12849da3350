"""The validating admission webhook, called by the real API server over HTTPS on 127.0.0.1.

The operator runs as a local process with --webhook-port and a serving certificate for 127.0.0.1 from the
platform's CA. The Helm chart's ValidatingWebhookConfiguration, rendered for the test's namespace and
that URL, points the API server at it. Objects are created as users create them, with the API client and
with kubectl, whose output is what a person sees. The chart's default certificate mode, where the operator
makes its own certificate and fills in the configuration's caBundle, has tests of its own at the end.

The operator uses the platform's admin kubeconfig, as do the API client and kubectl: the admin is the
operator's own identity here. Other people are the admin impersonating them (`kubectl --as`), so that the
API server authenticates them as it would a real user and puts them in the AdmissionReview's userInfo.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import http.client
import json
import socket
import ssl
import subprocess
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from idm_backup_operator.api.names import FINALIZER, SCHEDULE_LABEL
from idm_backup_operator.idmrestore import validation as restore_validation
from idm_backup_operator.kube import references, webhookcert
from idm_backup_operator.kube.backups import NotFound
from testbed import freeipa_pod, pki, processes, stack
from testbed.deploy import OperatorProcess
from testbed.gpgkeys import ExportedKey
from tests.helpers import (
    GROUP,
    KEY_SECRET,
    PLURAL,
    S3_SECRET,
    SCHEDULES,
    VERSION,
    apply,
    backup_spec,
    create_backup,
    create_schedule,
    get_backup,
    of_kind,
    render,
    s3_storage,
    wait_deleted,
    wait_finished,
    wait_for,
)


@pytest.fixture
def webhook(
    api: client.ApiClient,
    platform: stack.Platform,
    crds: None,
    namespace: str,
    tmp_path: Path,
    helm: Callable[..., str],
) -> Iterator[OperatorProcess]:
    """The operator with its webhook, and the API server configured to call it for this namespace."""
    pki_dir = Path(platform.state_dir) / "pki"
    certs = pki.webhook_cert_dir(pki_dir, tmp_path / "webhook-tls")
    port = processes.free_port()
    (tmp_path / "pvc").mkdir()
    operator = OperatorProcess(
        namespace,
        platform.kubeconfig,
        tmp_path / "pvc",
        tmp_path / "operator.log",
        args=[
            "--webhook-port",
            str(port),
            "--webhook-address",
            "127.0.0.1",
            "--webhook-cert-dir",
            str(certs),
        ],
    )
    operator.start()
    configuration = _chart_configuration(helm, platform, namespace, port)
    admission = client.AdmissionregistrationV1Api(api)
    admission.create_validating_webhook_configuration(configuration)
    name = configuration["metadata"]["name"]
    try:
        # The configuration reaches the API server's webhook manager asynchronously, and the operator
        # needs a moment to listen: wait until a refusal that only the webhook can give comes back.
        def answering() -> bool:
            try:
                create_backup(
                    api, namespace, "probe", _spec(platform, "probe", target={"podName": "nowhere"})
                )
            except client.ApiException as err:
                return "denied the request" in (err.body or "")
            client.CustomObjectsApi(api).delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "probe"
            )
            return False

        wait_for("the webhook to answer", answering, timeout=60, interval=0.5)
        yield operator
    finally:
        admission.delete_validating_webhook_configuration(name)
        operator.stop()


def _chart_configuration(
    helm: Callable[..., str], platform: stack.Platform, namespace: str, port: int
) -> dict[str, Any]:
    """The chart's own configuration, pointed at https://127.0.0.1:<port>: namespace mode limits it to
    the test's namespace, and the CA is the platform's, which signs the serving certificates."""
    ca_bundle = base64.b64encode((Path(platform.state_dir) / "pki" / "ca.crt").read_bytes()).decode()
    (configuration,) = of_kind(
        render(
            helm,
            "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{namespace}}}",
            "--set", f"webhook.url=https://127.0.0.1:{port}", "--set", "webhook.certificate.mode=secret",
            "--set", "webhook.certificate.secretName=unused-with-a-url",
            "--set", f"webhook.certificate.caBundle={ca_bundle}",
            namespace=namespace,
        ),
        "ValidatingWebhookConfiguration",
    )  # fmt: skip
    return configuration


def _spec(platform: stack.Platform, prefix: str, **spec: Any) -> dict[str, Any]:
    return backup_spec(
        platform, s3_storage(platform, f"admission/{prefix}"), type="Data", online=True, **spec
    )


def _refusal(err: client.ApiException) -> str:
    assert err.status == 422, (err.status, err.body)
    return err.body or ""


def _kubectl(platform: stack.Platform, namespace: str, manifest: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(stack.binaries()["kubectl"]),
            f"--kubeconfig={platform.kubeconfig}",
            "-n",
            namespace,
            "apply",
            "-f",
            "-",
        ],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_backup_with_broken_references_is_refused_with_every_problem_named(
    api: client.ApiClient, namespace: str, platform: stack.Platform, webhook: OperatorProcess, secrets: None
) -> None:
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "not-a-key"},
            "stringData": {"key.asc": "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\ngarbage\n"},
        },
    )
    spec = _spec(
        platform,
        "broken",
        target={
            "podName": "ipa-hidden",
            "ldap": {
                "url": "ldaps://ipa.example.test",
                "startTLS": True,
                "passwordSecretRef": {"name": "no-such-password"},
            },
        },
        encryption={"publicKeysSecretRef": {"name": "not-a-key"}},
    )
    spec["storage"]["s3"]["credentialsSecretRef"] = {"name": S3_SECRET, "accessKeyIDKey": "ACCESS"}
    spec["storage"]["s3"]["prefix"] = "backups/../elsewhere"
    with pytest.raises(client.ApiException) as refused:
        create_backup(api, namespace, "broken", spec)
    body = _refusal(refused.value)
    assert "IdmBackup broken refused (6 problems)" in body
    assert "spec.target.ldap.startTLS: an ldaps:// URL is already encrypted" in body
    assert "spec.storage.s3.prefix: invalid prefix 'backups/../elsewhere'" in body
    assert f"spec.target: target pod {namespace}/ipa-hidden not found" in body
    assert f"spec.target.ldap.passwordSecretRef: Secret {namespace}/no-such-password not found" in body
    assert "spec.encryption: no OpenPGP key found in the key material" in body
    assert f"spec.storage.s3.credentialsSecretRef: Secret {namespace}/{S3_SECRET} has no key ACCESS" in body
    with pytest.raises(client.ApiException) as lookup:
        get_backup(api, namespace, "broken")
    assert lookup.value.status == 404  # refused means never stored, not merely unreadable
    # No secret value leaks into the refusal: the S3 secret key is in the Secret it names.
    assert platform.s3_secret_key not in body


def test_kubectl_shows_the_refusal_and_a_good_backup_is_admitted_and_runs(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    webhook: OperatorProcess,
    secrets: None,
    freeipa: Any,
) -> None:
    freeipa()
    bad = _kubectl(
        platform,
        namespace,
        f"""
apiVersion: idm-backup.io/v1alpha1
kind: IdmBackup
metadata: {{name: typo}}
spec:
  type: Data
  target:
    podName: ipa-hidden
    ldap: {{url: "{platform.ldap_uri}", passwordSecretRef: {{name: {freeipa_pod.DM_PASSWORD_SECRET}}}}}
  encryption: {{publicKeysSecretRef: {{name: backup-public-keys}}}}
  storage: {{pvc: {{claimName: backups}}}}
""",
    )
    assert bad.returncode == 1
    assert (
        'admission webhook "validate.idmbackups.idm-backup.io" denied the request: IdmBackup typo refused '
        "(2 problems): "
    ) in bad.stderr
    assert f"spec.encryption: Secret {namespace}/backup-public-keys not found" in bad.stderr
    assert "spec.storage.pvc.claimName: PVC backups is not mounted in the operator" in bad.stderr
    assert "Traceback" not in bad.stderr

    create_backup(api, namespace, "good", _spec(platform, namespace, deletionPolicy="Delete"))
    assert wait_finished(api, namespace, "good", webhook)["status"]["phase"] == "Succeeded"
    # Once admitted, the object's references may go away: the operator's own writes (the finalizer of a
    # Delete-policy backup, labels) and the deletion itself must still pass the webhook.
    client.CoreV1Api(api).delete_namespaced_secret(KEY_SECRET, namespace)
    custom = client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "good", {"metadata": {"labels": {"idm-backup.io/pinned": "true"}}}
    )
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "good")
    wait_deleted(api, namespace, "good")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "schedule",
            "0 3 30 2 *",
            "spec.schedule: schedule '0 3 30 2 *' never fires: day-of-month '30' never occurs in month '2'",
        ),
        ("schedule", "0 25 * * *", "spec.schedule: hour value 25 is out of range 0-23"),
        ("timeZone", "Europe/Atlantis", "spec.timeZone: unknown time zone 'Europe/Atlantis'"),
        ("timeZone", "localtime", "spec.timeZone: unknown time zone 'localtime': give an IANA name"),
    ],
)
def test_a_schedule_that_cannot_fire_is_refused(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    webhook: OperatorProcess,
    secrets: None,
    field: str,
    value: str,
    message: str,
) -> None:
    spec = {
        "schedule": "0 3 * * *",
        "timeZone": "Europe/Berlin",
        "template": {"spec": _spec(platform, "cron")},
        field: value,
    }
    with pytest.raises(client.ApiException) as refused:
        create_schedule(api, namespace, "nightly", spec)
    assert f"IdmBackupSchedule nightly refused (1 problem): {message}" in _refusal(refused.value)


def test_a_schedule_with_a_bad_cron_and_a_bad_zone_is_told_both(
    api: client.ApiClient, namespace: str, platform: stack.Platform, webhook: OperatorProcess, secrets: None
) -> None:
    spec = {"schedule": "0 3 * * * *", "timeZone": "Berlin", "template": {"spec": _spec(platform, "both")}}
    with pytest.raises(client.ApiException) as refused:
        create_schedule(api, namespace, "nightly", spec)
    assert (
        "IdmBackupSchedule nightly refused (2 problems): spec.schedule: 6 fields given: this looks like a "
        "cron expression with a seconds field (as in CloudNativePG) — use the standard 5 fields: minute "
        "hour day-of-month month day-of-week; spec.timeZone: unknown time zone 'Berlin'"
    ) in _refusal(refused.value)


def test_what_the_schema_cannot_say_is_refused_by_the_webhook(
    api: client.ApiClient, namespace: str, platform: stack.Platform, webhook: OperatorProcess, secrets: None
) -> None:
    """The schema checks an endpoint's form, the S3 client also its host name (which failed the backup as
    "InternalError: Invalid endpoint"); a maxAge too long for any clock made the webhook itself fail."""
    spec = _spec(platform, "endpoint")
    spec["storage"]["s3"]["endpoint"] = "http://s3_host.example.test:7070"
    with pytest.raises(client.ApiException) as refused:
        create_backup(api, namespace, "underscore", spec)
    assert (
        "spec.storage.s3.endpoint: 'http://s3_host.example.test:7070' has an invalid host name "
        "'s3_host.example.test'"
    ) in _refusal(refused.value)
    schedule = {
        "schedule": "0 3 * * *",
        "template": {"spec": _spec(platform, "age")},
        "retention": {"maxAge": "99999999999d"},
    }
    with pytest.raises(client.ApiException) as refused:
        create_schedule(api, namespace, "forever", schedule)
    assert (
        "IdmBackupSchedule forever refused (1 problem): spec.retention: maxAge '99999999999d' is too long"
    ) in _refusal(refused.value)


def test_a_schedule_update_is_checked_but_the_operators_own_writes_are_not(
    api: client.ApiClient, namespace: str, platform: stack.Platform, webhook: OperatorProcess, secrets: None
) -> None:
    create_schedule(
        api,
        namespace,
        "nightly",
        {"schedule": "0 3 * * *", "suspend": True, "template": {"spec": _spec(platform, "u")}},
    )
    custom = client.CustomObjectsApi(api)
    with pytest.raises(client.ApiException) as refused:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, SCHEDULES, "nightly", {"spec": {"schedule": "0 3 * * 8"}}
        )
    assert "spec.schedule: day-of-week value 8 is out of range 0-7" in _refusal(refused.value)
    # The operator's status writes go through the status subresource, outside the webhook's rules; its
    # metadata writes are left alone because the spec did not change.
    wait_for(
        "the schedule's status",
        lambda: (
            (
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, SCHEDULES, "nightly").get(
                    "status"
                )
                or {}
            ).get("observedGeneration")
            == 1
        ),
    )
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, "nightly", {"metadata": {"annotations": {"team": "idm"}}}
    )
    assert patched["metadata"]["annotations"]["team"] == "idm"
    assert patched["spec"]["schedule"] == "0 3 * * *"  # the refused change left no trace


def test_a_schedule_with_a_missing_secret_is_admitted_with_a_warning_and_its_backup_fails_visibly(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    webhook: OperatorProcess,
    secrets: None,
    freeipa: Any,
) -> None:
    """GitOps may apply the schedule before its Secret: kubectl warns; the backup it creates is not refused
    (it would vanish from history and alerts) but fails with the reason in its status."""
    freeipa()
    applied = _kubectl(
        platform,
        namespace,
        f"""
apiVersion: idm-backup.io/v1alpha1
kind: IdmBackupSchedule
metadata: {{name: early}}
spec:
  schedule: "0 3 * * *"
  immediate: true
  template:
    spec:
      type: Data
      online: true
      target:
        podName: ipa-hidden
        ldap: {{url: "{platform.ldap_uri}", passwordSecretRef: {{name: {freeipa_pod.DM_PASSWORD_SECRET}}}}}
      encryption: {{publicKeysSecretRef: {{name: keys-applied-later}}}}
      storage:
        s3: {{bucket: {platform.s3_bucket}, endpoint: "{platform.s3_endpoint}", forcePathStyle: true,
              prefix: admission/early, credentialsSecretRef: {{name: {S3_SECRET}}}}}
""",
    )
    assert applied.returncode == 0, applied.stderr
    assert (
        f"Warning: spec.template.spec.encryption: Secret {namespace}/keys-applied-later not found "
        "(the backup will fail until this is fixed)"
    ) in applied.stderr

    def child() -> dict[str, Any] | None:
        items = client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]
        return items[0] if items else None

    backup = wait_for("the schedule's immediate backup", child, timeout=60)
    status = wait_finished(api, namespace, backup["metadata"]["name"], webhook)["status"]
    assert status["phase"] == "Failed"
    assert f"Secret {namespace}/keys-applied-later not found" in status["message"]


def test_without_the_webhook_the_same_spec_checks_fail_the_backup_before_it_touches_the_server(
    api: client.ApiClient, namespace: str, platform: stack.Platform, operator: OperatorProcess, secrets: None
) -> None:
    spec = _spec(platform, "no-webhook", target={"podSelector": {}})
    del spec["target"]["podName"]
    spec["storage"]["s3"]["kmsKeyID"] = "alias/idm"
    create_backup(api, namespace, "unchecked", spec)
    status = wait_finished(api, namespace, "unchecked", operator)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert status["message"] == (
        "invalid spec: spec.target.podSelector: an empty selector matches every pod in the namespace; "
        "spec.storage.s3.kmsKeyID: only used with serverSideEncryption aws:kms"
    )


def test_with_no_webhook_answering_only_creates_and_spec_changes_are_refused(
    api: client.ApiClient,
    platform: stack.Platform,
    crds: None,
    namespace: str,
    helm: Callable[..., str],
) -> None:
    """The chart's configuration (failurePolicy Fail) pointed at a port where nothing listens, as when
    the operator is down: a Delete-policy backup's finalizer must still come off, or its namespace could
    not be deleted until an operator answers. An IdmBackup's spec is immutable (its CRD): a schedule's
    is what an update can change."""
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IdmBackup",
            "metadata": {"name": "held", "finalizers": [FINALIZER]},
            "spec": _spec(platform, "held", deletionPolicy="Delete"),
        },
    )
    schedule = {"schedule": "0 3 * * *", "suspend": True, "template": {"spec": _spec(platform, "nightly")}}
    create_schedule(api, namespace, "nightly", schedule)
    configuration = _chart_configuration(helm, platform, namespace, processes.free_port())
    admission = client.AdmissionregistrationV1Api(api)
    admission.create_validating_webhook_configuration(configuration)
    try:
        # The configuration reaches the API server's webhook manager asynchronously.
        def refused() -> str | None:
            try:
                create_backup(api, namespace, "probe", _spec(platform, "probe"))
            except client.ApiException as err:
                return err.body or ""
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "probe")
            return None

        body = wait_for("the configuration to be in force", refused, timeout=60, interval=0.5)
        assert 'failed calling webhook "validate.idmbackups.idm-backup.io"' in json.loads(body)["message"]
        with pytest.raises(client.ApiException) as changed:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, SCHEDULES, "nightly", {"spec": {"schedule": "0 4 * * *"}}
            )
        assert (
            'failed calling webhook "validate.idmbackupschedules.idm-backup.io"'
            in json.loads(changed.value.body or "{}")["message"]
        )
        annotated = {"metadata": {"annotations": {"team": "idm"}}}
        patched = custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, SCHEDULES, "nightly", annotated
        )
        assert patched["metadata"]["annotations"]["team"] == "idm"
        assert patched["spec"]["schedule"] == "0 3 * * *"

        labelled = {"metadata": {"labels": {"idm-backup.io/pinned": "true"}}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "held", labelled)
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "held")
        assert get_backup(api, namespace, "held")["metadata"]["deletionTimestamp"]
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "held", {"metadata": {"finalizers": None}}
        )
        wait_deleted(api, namespace, "held")
    finally:
        admission.delete_validating_webhook_configuration(configuration["metadata"]["name"])


def _claims(tmp_path: Path, *names: str) -> None:
    for name in names:
        (tmp_path / "pvc" / name).mkdir()


def test_a_claim_given_to_other_namespaces_is_refused_at_apply_naming_them(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    secrets: None,
    freeipa: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    # What the chart renders for pvcMounts [shared, {claimName: team-only, namespaces: [team-a, team-b]}].
    monkeypatch.setenv(references.PVC_NAMESPACES_ENV, json.dumps({"team-only": ["team-a", "team-b"]}))
    request.getfixturevalue("webhook")
    _claims(tmp_path, "shared", "team-only")
    freeipa()
    spec = _spec(platform, "claims")
    spec["storage"] = {"pvc": {"claimName": "team-only"}}
    body = _refused(lambda: _dry_run_backup(api, namespace, "borrowed", spec))
    assert (
        "IdmBackup borrowed refused (1 problem): spec.storage.pvc.claimName: PVC team-only may be used only "
        f"from namespaces team-a, team-b, not from {namespace} (the Helm chart's storage.pvcMounts)"
    ) in body
    spec["storage"] = {"pvc": {"claimName": "shared"}}
    assert _dry_run_backup(api, namespace, "own", spec)["spec"]["storage"] == {"pvc": {"claimName": "shared"}}


def test_without_the_webhook_a_claim_given_to_other_namespaces_fails_the_backup_before_it_touches_anything(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    secrets: None,
    freeipa: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.setenv(references.PVC_NAMESPACES_ENV, json.dumps({"team-only": ["team-a"]}))
    operator: OperatorProcess = request.getfixturevalue("operator")
    _claims(tmp_path, "team-only")
    freeipa()
    spec = _spec(platform, "claims")
    spec["storage"] = {"pvc": {"claimName": "team-only"}}
    create_backup(api, namespace, "borrowed", spec)
    status = wait_finished(api, namespace, "borrowed", operator)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "StorageUnavailable")
    assert status["message"] == (
        f"storage not usable: PVC team-only may be used only from namespace team-a, not from {namespace} "
        "(the Helm chart's storage.pvcMounts)"
    )
    # Refused before the pre-flight read the server's configuration, and nothing was written to the claim.
    assert "host" not in status.get("target", {})
    assert list((tmp_path / "pvc" / "team-only").iterdir()) == []


# -- who asks: the Secrets a request names must be readable by whoever sends it ------------------------

AUTHORS = "idm-backup-authors"


def _as(api: client.ApiClient, user: str) -> client.ApiClient:
    """The API as `user` (in the group AUTHORS) sees it: the admin's credentials with impersonation
    headers, as `kubectl --as=<user> --as-group=<group>` sends them."""
    impersonated = client.ApiClient(api.configuration)
    impersonated.set_default_header("Impersonate-User", user)
    impersonated.set_default_header("Impersonate-Group", AUTHORS)
    return impersonated


def _authors_may(
    api: client.ApiClient,
    namespace: str,
    as_user: client.ApiClient,
    secrets: list[str],
    resources: tuple[str, ...] = (PLURAL, SCHEDULES),
    verbs: tuple[str, ...] = ("create", "get", "list", "patch", "update"),
) -> None:
    """Bind AUTHORS, as a group (the webhook must pass groups on), to what a backup author needs (or
    `verbs` on `resources`) and `get` on `secrets` (every Secret if empty); wait until the API server's
    authorizer knows it."""
    secret_rule: dict[str, Any] = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    if secrets:
        secret_rule["resourceNames"] = secrets
    rules = [
        {"apiGroups": [GROUP], "resources": list(resources), "verbs": list(verbs)},
        secret_rule,
    ]
    rbac = client.RbacAuthorizationV1Api(api)
    try:
        rbac.create_namespaced_role(namespace, {"metadata": {"name": "authors"}, "rules": rules})
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "authors"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "authors"},
                "subjects": [{"kind": "Group", "name": AUTHORS, "apiGroup": "rbac.authorization.k8s.io"}],
            },
        )
    except client.ApiException as err:
        if err.status != 409:
            raise
        rbac.patch_namespaced_role("authors", namespace, {"rules": rules})

    def allowed(name: str) -> bool:
        review = client.AuthorizationV1Api(as_user).create_self_subject_access_review(
            {
                "spec": {
                    "resourceAttributes": {
                        "namespace": namespace,
                        "verb": "get",
                        "resource": "secrets",
                        "name": name,
                    }
                }
            }
        )
        return bool(review.status.allowed)

    wait_for("the authors' Role to take effect", lambda: all(allowed(s) for s in secrets or ["any"]))


def _dry_run_backup(
    as_user: client.ApiClient, namespace: str, name: str, spec: dict[str, Any], **meta: Any
) -> Any:
    """Through every admission step, the webhook included, without storing (or running) anything."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IdmBackup", "metadata": {"name": name, **meta}}
    return client.CustomObjectsApi(as_user).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, {**body, "spec": spec}, dry_run="All"
    )


def _refused(create: Callable[[], Any]) -> str:
    with pytest.raises(client.ApiException) as refused:
        create()
    return _refusal(refused.value)


def test_a_backup_may_use_only_the_secrets_its_creator_may_read(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    webhook: OperatorProcess,
    secrets: None,
    freeipa: Any,
) -> None:
    """The operator may read every Secret of the namespace; alice, who may create IdmBackups, may read
    the DM password and the S3 credentials only. Her backup may not use the public keys, nor an LDAP CA
    Secret, which does not even exist: she is not told so, since she may not read it."""
    freeipa()
    alice = _as(api, "alice")
    _authors_may(api, namespace, alice, [freeipa_pod.DM_PASSWORD_SECRET, S3_SECRET])
    spec = _spec(platform, "readable")
    spec["target"]["ldap"]["caSecretRef"] = {"name": "no-such-ca"}
    body = _refused(lambda: _dry_run_backup(alice, namespace, "borrowed", spec))
    assert (
        "IdmBackup borrowed refused (2 problems): spec.target.ldap.caSecretRef: alice may not read " in body
    )
    for field, secret in (
        ("spec.target.ldap.caSecretRef", "no-such-ca"),
        ("spec.encryption.publicKeysSecretRef", KEY_SECRET),
    ):
        assert (
            f"{field}: alice may not read Secret {namespace}/{secret}, so no backup they create may use it "
            "(RBAC: get on secrets)"
        ) in body
    assert "not found" not in body
    # The label the operator puts on its schedules' backups is no way around it: anyone may set it.
    labelled = _refused(
        lambda: _dry_run_backup(alice, namespace, "borrowed", spec, labels={SCHEDULE_LABEL: "nightly"})
    )
    assert (
        f"spec.encryption.publicKeysSecretRef: alice may not read Secret {namespace}/{KEY_SECRET}" in labelled
    )

    del spec["target"]["ldap"]["caSecretRef"]
    _authors_may(api, namespace, alice, [freeipa_pod.DM_PASSWORD_SECRET, S3_SECRET, KEY_SECRET])
    admitted = _dry_run_backup(alice, namespace, "own", spec)
    assert admitted["spec"]["encryption"] == {"mode": "GPG", "publicKeysSecretRef": {"name": KEY_SECRET}}


def test_the_schedule_label_skips_the_reference_checks_only_for_the_operator(
    api: client.ApiClient, namespace: str, platform: stack.Platform, webhook: OperatorProcess, secrets: None
) -> None:
    """The operator creates its schedules' backups and runs here with the test's kubeconfig, so the test's
    own (admin) user is the operator's identity; alice, who may read every Secret, is someone else."""
    alice = _as(api, "alice")
    _authors_may(api, namespace, alice, [])
    spec = _spec(platform, "label", encryption={"publicKeysSecretRef": {"name": "keys-not-there"}})
    labels = {SCHEDULE_LABEL: "nightly"}
    body = _refused(lambda: _dry_run_backup(alice, namespace, "tick", spec, labels=labels))
    assert f"spec.encryption: Secret {namespace}/keys-not-there not found" in body
    # The operator's own: its problems go to the backup's Failed status instead (see the schedule test).
    admitted = _dry_run_backup(api, namespace, "tick", spec, labels=labels)
    assert admitted["metadata"]["labels"] == labels


def test_a_schedule_may_name_only_secrets_its_author_may_read_when_created_and_when_its_spec_changes(
    api: client.ApiClient, namespace: str, platform: stack.Platform, webhook: OperatorProcess, secrets: None
) -> None:
    """The schedule's backups are created by the operator, which may read everything: whoever sets the
    template is who is checked, on create and on every change of the spec, and refused, not warned."""
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "other-team-s3"},
            "stringData": {"AWS_ACCESS_KEY_ID": "other", "AWS_SECRET_ACCESS_KEY": "other-secret"},
        },
    )
    alice = _as(api, "alice")
    _authors_may(api, namespace, alice, [freeipa_pod.DM_PASSWORD_SECRET, S3_SECRET, KEY_SECRET])
    template = _spec(platform, "schedule")
    borrowed = copy.deepcopy(template)
    borrowed["storage"]["s3"]["credentialsSecretRef"] = {"name": "other-team-s3"}
    message = (
        f"spec.template.spec.storage.s3.credentialsSecretRef: alice may not read Secret "
        f"{namespace}/other-team-s3, so no backup they create may use it (RBAC: get on secrets)"
    )
    body = _refused(
        lambda: create_schedule(
            alice, namespace, "nightly", {"schedule": "0 3 * * *", "template": {"spec": borrowed}}
        )
    )
    assert f"IdmBackupSchedule nightly refused (1 problem): {message}" in body

    create_schedule(
        alice,
        namespace,
        "nightly",
        {"schedule": "0 3 * * *", "suspend": True, "template": {"spec": template}},
    )
    custom = client.CustomObjectsApi(alice)
    body = _refused(
        lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, SCHEDULES, "nightly", {"spec": {"template": {"spec": borrowed}}}
        )
    )
    assert f"IdmBackupSchedule nightly refused (1 problem): {message}" in body
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, "nightly", {"metadata": {"labels": {"team": "idm"}}}
    )
    assert patched["metadata"]["labels"] == {"team": "idm"}
    assert patched["spec"]["template"]["spec"]["storage"]["s3"]["credentialsSecretRef"]["name"] == S3_SECRET


def test_a_refusal_does_not_list_the_keys_a_secret_has(
    api: client.ApiClient, namespace: str, platform: stack.Platform, webhook: OperatorProcess, secrets: None
) -> None:
    """Key names can say much (whose, which system, which year): the refusal names only the key asked for."""
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "ldap-material"},
            "stringData": {"dm-password-2026-prod": "x", "ca-of-the-hr-directory": "y"},
        },
    )
    spec = _spec(platform, "keys", target={"podName": "ipa-hidden"})
    spec["target"]["ldap"]["passwordSecretRef"] = {"name": "ldap-material"}
    spec["target"]["ldap"]["caSecretRef"] = {"name": "ldap-material"}
    spec["storage"]["s3"]["caSecretRef"] = {"name": "ldap-material"}
    body = _refused(lambda: create_backup(api, namespace, "keys", spec))
    for field, key in (
        ("spec.target.ldap.passwordSecretRef", "password"),
        ("spec.target.ldap.caSecretRef", "ca.crt"),
        ("spec.storage.s3.caSecretRef", "ca.crt"),
    ):
        assert f"{field}: Secret {namespace}/ldap-material has no key '{key}'" in body
    assert "dm-password-2026-prod" not in body and "ca-of-the-hr-directory" not in body


# -- IdmRestores: reviewed on creation, with the Secrets they read checked as a backup's are ---------------

RESTORES = "idmrestores"
RESTORE_KEY = "restore-private-key"
HOST = "ipa-hidden.example.test"


def _restore_spec(platform: stack.Platform, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A Data restore into the stand-in's ipa-hidden, decrypted with RESTORE_KEY."""
    return {
        "source": source,
        "decryption": {"secretKeySecretRef": {"name": RESTORE_KEY}},
        "target": backup_spec(platform, {})["target"],
        "confirm": HOST,
        **spec,
    }


def _location(platform: stack.Platform, prefix: str) -> dict[str, Any]:
    return {
        "location": {
            "storage": s3_storage(platform, f"admission/{prefix}"),
            "directory": f"freeipa/{HOST}/ipa-data-2026-11-28-02-00-00/",
        }
    }


def _create_restore(
    as_user: client.ApiClient, namespace: str, name: str, spec: dict[str, Any], *, dry_run: bool = True
) -> Any:
    """Through every admission step, the webhook included; with dry_run (the default) nothing is stored,
    so the operator never restores anything into the stand-in."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IdmRestore",
        "metadata": {"name": name},
        "spec": spec,
    }
    return client.CustomObjectsApi(as_user).create_namespaced_custom_object(
        GROUP, VERSION, namespace, RESTORES, body, **({"dry_run": "All"} if dry_run else {})
    )


def _refused_restore(create: Callable[[], Any]) -> str:
    """The refusal's message, as kubectl prints it (the body's JSON escapes '<' and '>')."""
    return str(json.loads(_refused(create))["message"])


def _key_secret(name: str, material: bytes, key: str = "private.asc") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {key: base64.b64encode(material).decode()},
    }


def test_a_restore_without_a_usable_private_key_is_refused(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    webhook: OperatorProcess,
    secrets: None,
    backup_key: ExportedKey,
) -> None:
    """The public half, which every backup's namespace holds, is the usual mistake: it is named as such."""
    apply(
        api,
        namespace,
        _key_secret("public-half", backup_key.armored),
        _key_secret("not-a-key", b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\ngarbage\n"),
    )
    spec = _restore_spec(platform, _location(platform, "restore-key"))
    missing = _refused_restore(lambda: _create_restore(api, namespace, "missing", spec, dry_run=False))
    # No FreeIPA here: its pod and Directory Manager password are missing too.
    assert "IdmRestore missing refused (3 problems): " in missing
    assert f"spec.target: target pod {namespace}/ipa-hidden not found" in missing
    dm = freeipa_pod.DM_PASSWORD_SECRET
    assert f"spec.target.ldap.passwordSecretRef: Secret {namespace}/{dm} not found" in missing
    assert f"spec.decryption.secretKeySecretRef: Secret {namespace}/{RESTORE_KEY} not found" in missing

    spec["decryption"] = {
        "secretKeySecretRef": {"name": "public-half"},
        "passphraseSecretRef": {"name": "public-half"},
    }
    public = _refused_restore(lambda: _create_restore(api, namespace, "public", spec, dry_run=False))
    assert "IdmRestore public refused (4 problems): " in public
    assert (
        f"spec.decryption.secretKeySecretRef: Secret {namespace}/public-half key 'private.asc' holds only a "
        "public key: decrypting the archive needs the private key (gpg --armor --export-secret-keys "
        "<fingerprint>)"
    ) in public
    assert (
        f"spec.decryption.passphraseSecretRef: Secret {namespace}/public-half has no key 'passphrase'"
        in public
    )

    spec["decryption"] = {"secretKeySecretRef": {"name": "not-a-key"}}
    garbage = _refused_restore(lambda: _create_restore(api, namespace, "garbage", spec, dry_run=False))
    assert (
        f"spec.decryption.secretKeySecretRef: Secret {namespace}/not-a-key key 'private.asc' holds no "
        "OpenPGP key" in garbage
    )
    for name in ("missing", "public", "garbage"):
        with pytest.raises(client.ApiException) as lookup:
            client.CustomObjectsApi(api).get_namespaced_custom_object(
                GROUP, VERSION, namespace, RESTORES, name
            )
        assert lookup.value.status == 404  # refused means never stored


def test_a_restore_may_use_only_the_secrets_its_creator_may_read(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    webhook: OperatorProcess,
    secrets: None,
    freeipa: Any,
    backup_key: ExportedKey,
) -> None:
    """bob may create IdmRestores, nothing else, and read the DM password and the private key. A restore
    reads its archive with the storage's Secrets on his behalf: a location's, or for a backupRef the
    IdmBackup's own. Those he may not read refuse it, named, without saying whether they exist; once he
    may, the same restores are admitted. The operator's own requests are not asked about."""
    freeipa()
    apply(api, namespace, _key_secret(RESTORE_KEY, backup_key.secret))
    create_backup(api, namespace, "nightly", _spec(platform, "restore-source"))
    backup = wait_finished(api, namespace, "nightly", webhook)
    assert backup["status"]["phase"] == "Succeeded", backup["status"]

    bob = _as(api, "bob")
    readable = [freeipa_pod.DM_PASSWORD_SECRET, RESTORE_KEY]
    _authors_may(api, namespace, bob, readable, resources=(RESTORES,), verbs=("create",))
    location = _restore_spec(platform, _location(platform, "restore-source"))
    location["target"]["ldap"]["caSecretRef"] = {"name": "no-such-ca"}
    body = _refused_restore(lambda: _create_restore(bob, namespace, "from-bucket", location))
    assert "IdmRestore from-bucket refused (2 problems): " in body
    for field, secret in (
        ("spec.target.ldap.caSecretRef", "no-such-ca"),
        ("spec.source.location.storage.s3.credentialsSecretRef", S3_SECRET),
    ):
        assert (
            f"{field}: bob may not read Secret {namespace}/{secret}, so no restore they create may use it "
            "(RBAC: get on secrets)"
        ) in body
    assert "not found" not in body

    by_name = _restore_spec(platform, {"backupRef": {"name": "nightly"}})
    message = (
        f"spec.source.backupRef: IdmBackup nightly's spec.storage.s3.credentialsSecretRef: bob may not read "
        f"Secret {namespace}/{S3_SECRET}, so no restore they create may use it (RBAC: get on secrets)"
    )
    assert f"IdmRestore back refused (1 problem): {message}" in _refused(
        lambda: _create_restore(bob, namespace, "back", by_name)
    )
    # The operator's own identity (the admin, here) is not asked about: the same restore is admitted.
    assert _create_restore(api, namespace, "back", by_name)["spec"]["source"] == {
        "backupRef": {"name": "nightly"}
    }

    _authors_may(api, namespace, bob, [*readable, S3_SECRET], resources=(RESTORES,), verbs=("create",))
    admitted = _create_restore(bob, namespace, "back", by_name)
    assert admitted["spec"]["confirm"] == HOST
    del location["target"]["ldap"]["caSecretRef"]
    assert _create_restore(bob, namespace, "from-bucket", location)["metadata"]["name"] == "from-bucket"
    # What the backup's status says about its archive is held against the restore.
    elsewhere = {**by_name, "confirm": "ipa.example.test"}
    assert (
        f"IdmRestore elsewhere refused (1 problem): spec.confirm: IdmBackup {namespace}/nightly is a backup "
        f"of {HOST}, and ipa-restore restores only a server's own backup: confirm (the target's FQDN) must "
        f"be '{HOST}'"
    ) in _refused_restore(lambda: _create_restore(bob, namespace, "elsewhere", elsewhere))
    missing = _restore_spec(platform, {"backupRef": {"name": "weekly"}})
    assert (
        "IdmRestore nothing refused (1 problem): spec.source.backupRef: IdmBackup "
        f"{namespace}/weekly not found"
    ) in _refused_restore(lambda: _create_restore(bob, namespace, "nothing", missing))
    # A drill has the operator create a pod from bob's template: only if bob may create pods himself.
    drill = _restore_spec(platform, {"backupRef": {"name": "nightly"}}, mode="Drill")
    ldap = drill.pop("target")["ldap"]
    del drill["confirm"]
    drill["drill"] = {"podTemplate": {"spec": {"containers": [{"name": "c", "image": "x"}]}}, "ldap": ldap}
    assert (
        f"IdmRestore drill refused (1 problem): spec.drill.podTemplate: bob may not create pods in "
        f"namespace {namespace}, so no drill they create may have the operator create one for them "
        "(RBAC: create on pods)"
    ) in _refused_restore(lambda: _create_restore(bob, namespace, "drill", drill))


# -- restore_findings by itself, against fakes of the API: the source's states, without a platform -----


class _FakeCore:
    def __init__(self, secrets: dict[str, dict[str, bytes]]) -> None:
        self.secrets = secrets
        self.read: list[str] = []

    def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
        self.read.append(name)
        if name not in self.secrets:
            raise client.ApiException(status=404, reason="Not Found")
        return types.SimpleNamespace(
            data={k: base64.b64encode(v).decode() for k, v in self.secrets[name].items()}
        )

    def read_namespaced_pod(self, name: str, namespace: str, **_: Any) -> Any:
        ready = types.SimpleNamespace(type="Ready", status="True")
        return types.SimpleNamespace(
            metadata=types.SimpleNamespace(name=name, deletion_timestamp=None),
            status=types.SimpleNamespace(phase="Running", conditions=[ready]),
            spec=types.SimpleNamespace(containers=[types.SimpleNamespace(name="freeipa")]),
        )


class _FakeAuthorization:
    def __init__(self, readable: set[str]) -> None:
        self.readable = readable
        self.asked: list[str] = []

    def create_subject_access_review(self, review: Any, **_: Any) -> Any:
        name = review.spec.resource_attributes.name
        self.asked.append(name)
        return types.SimpleNamespace(status=types.SimpleNamespace(allowed=name in self.readable))


class _FakeBackups:
    def __init__(self, backups: dict[str, dict[str, Any]], schedules: dict[str, str | None]) -> None:
        self.backups, self.schedules = backups, schedules

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        if name not in self.backups:
            raise NotFound(name)
        return self.backups[name]

    def latest_succeeded(self, namespace: str, schedule_name: str) -> dict[str, Any] | None:
        if schedule_name not in self.schedules:
            raise NotFound(schedule_name)
        latest = self.schedules[schedule_name]
        return None if latest is None else self.backups[latest]


def _stored_backup(name: str, phase: str, s3_secret: str, **status: Any) -> dict[str, Any]:
    spec = {
        "type": "Data",
        "target": {
            "podName": "ipa-hidden",
            "ldap": {"url": "ldaps://ipa", "passwordSecretRef": {"name": "dm"}},
        },
        "encryption": {"publicKeysSecretRef": {"name": "keys"}},
        "storage": {"s3": {"bucket": "backups", "credentialsSecretRef": {"name": s3_secret}}},
    }
    return {
        "metadata": {"namespace": "ns", "name": name, "uid": f"uid-{name}"},
        "spec": spec,
        "status": {"phase": phase, **status},
    }


def test_restore_findings_check_the_source_the_key_and_who_may_read_what(
    backup_key: ExportedKey, tmp_path: Path
) -> None:
    directory = f"ns/{HOST}/ipa-data-2026-11-28-02-00-00"
    archive = {
        "name": f"{HOST}/ipa-data-2026-11-28-02-00-00",
        "uri": f"s3://backups/{directory}/ipa-data.tar.gpg",
        "encrypted": True,
        "recipients": [backup_key.fingerprint],
    }
    header = {"type": "DATA", "host": HOST}
    where_stored = {
        "target": {"host": HOST},
        "ipaBackup": {"directory": "/var/lib/ipa/backup/ipa-data-2026-11-28-02-00-00"},
    }
    stored_ok = _stored_backup("ok", "Succeeded", "s3", archive=archive, header=header, **where_stored)
    other = {**archive, "recipients": ["0" * 40]}
    backups = _FakeBackups(
        {
            "ok": stored_ok,
            "running": _stored_backup("running", "Running", "s3"),
            "failed": _stored_backup("failed", "Failed", "s3"),
            "other-key": _stored_backup(
                "other-key", "Succeeded", "s3", archive=other, header=header, **where_stored
            ),
            "team-b": _stored_backup(
                "team-b", "Succeeded", "s3-team-b", archive=archive, header=header, **where_stored
            ),
        },
        {"nightly": "ok", "new": None},
    )
    core = _FakeCore(
        {
            "dm": {"password": b"secret"},
            "key": {"private.asc": backup_key.secret},
            "public": {"private.asc": backup_key.armored},
            "s3": {"AWS_ACCESS_KEY_ID": b"id", "AWS_SECRET_ACCESS_KEY": b"key"},
            "s3-team-b": {"AWS_ACCESS_KEY_ID": b"b", "AWS_SECRET_ACCESS_KEY": b"b-key"},
        }
    )
    auth = _FakeAuthorization({"dm", "key", "public", "s3"})
    where = restore_validation.ReferenceScope(core, "ns", tmp_path, False, authorization=auth)  # type: ignore[arg-type]
    alice = restore_validation.Requester("alice")

    def findings(source: dict[str, Any], key: str = "key", **spec: Any) -> restore_validation.Findings:
        raw = {
            "source": source,
            "decryption": {"secretKeySecretRef": {"name": key}},
            "target": {
                "podName": "ipa-hidden",
                "ldap": {"url": "ldaps://ipa", "passwordSecretRef": {"name": "dm"}},
            },
            "confirm": HOST,
            **spec,
        }
        return restore_validation.restore_findings(raw, where, requester=alice, backups=backups)

    ok = findings({"backupRef": {"name": "ok"}})
    assert (ok.errors, ok.warnings) == ([], [])
    assert sorted(set(auth.asked)) == ["dm", "key", "s3"]
    assert findings({"scheduleRef": {"name": "nightly"}}).errors == []
    running = findings({"backupRef": {"name": "running"}})
    assert running.errors == []
    assert running.warnings == [
        "spec.source.backupRef: IdmBackup ns/running is Running, not Succeeded: the restore fails "
        "(SourceNotSucceeded) unless the backup has Succeeded when the restore starts"
    ]
    assert findings({"backupRef": {"name": "failed"}}).errors == [
        "spec.source.backupRef: IdmBackup ns/failed Failed: only a Succeeded backup can be restored"
    ]
    assert findings({"backupRef": {"name": "gone"}}).errors == [
        "spec.source.backupRef: IdmBackup ns/gone not found"
    ]
    assert findings({"scheduleRef": {"name": "weekly"}}).errors == [
        "spec.source.scheduleRef: IdmBackupSchedule ns/weekly not found"
    ]
    new = findings({"scheduleRef": {"name": "new"}})
    assert (new.errors, new.warnings) == (
        [],
        [
            "spec.source.scheduleRef: IdmBackupSchedule ns/new has no Succeeded backup yet: the restore "
            "fails (SourceNotFound) unless one has Succeeded when it starts"
        ],
    )
    assert findings({"backupRef": {"name": "ok"}}, type="Full").errors == [
        "spec.type: a Full restore needs a FULL backup; IdmBackup ns/ok is DATA"
    ]
    assert findings({"backupRef": {"name": "other-key"}}).errors == [
        "spec.decryption.secretKeySecretRef: Secret ns/key key 'private.asc' holds none of the keys "
        f"IdmBackup ns/other-key is encrypted to (recipients: {'0' * 40}): it cannot decrypt the archive"
    ]
    assert findings({"backupRef": {"name": "ok"}}, key="public").errors == [
        "spec.decryption.secretKeySecretRef: Secret ns/public key 'private.asc' holds only a public key: "
        "decrypting the archive needs the private key (gpg --armor --export-secret-keys <fingerprint>)"
    ]
    # The backup's own storage Secret: alice may not read team B's, which is therefore not even read.
    core.read.clear()
    assert findings({"backupRef": {"name": "team-b"}}).errors == [
        "spec.source.backupRef: IdmBackup team-b's spec.storage.s3.credentialsSecretRef: alice may not read "
        "Secret ns/s3-team-b, so no restore they create may use it (RBAC: get on secrets)"
    ]
    assert "s3-team-b" not in core.read
    location = {
        "location": {
            "storage": {
                "s3": {"bucket": "backups", "prefix": "../up", "credentialsSecretRef": {"name": "s3-team-b"}}
            },
            "directory": f"{directory}/",
        }
    }
    assert findings(location).errors == [
        "spec.source.location.storage.s3.prefix: invalid prefix '../up': it must be a relative path without "
        "'.' or '..'",
        "spec.source.location.storage.s3.credentialsSecretRef: alice may not read Secret ns/s3-team-b, so no "
        "restore they create may use it (RBAC: get on secrets)",
    ]
    # A drill's scratch pod is created by the operator: a Secret its template names must be readable too.
    drill = restore_validation.restore_findings(
        {
            "mode": "Drill",
            "source": {"backupRef": {"name": "ok"}},
            "decryption": {"secretKeySecretRef": {"name": "key"}},
            "drill": {
                "podTemplate": {
                    "spec": {"containers": [{"name": "ipa", "envFrom": [{"secretRef": {"name": "admin"}}]}]}
                },
                "ldap": {"url": "ldaps://ipa", "passwordSecretRef": {"name": "dm"}},
            },
        },
        where,
        requester=alice,
        backups=backups,
    )
    assert drill.errors == [
        "spec.drill.podTemplate: alice may not read Secret ns/admin, so no restore they create may use it "
        "(RBAC: get on secrets)",
        # Nor create the pod herself (the fake authorizer grants no verb but get on named Secrets).
        "spec.drill.podTemplate: alice may not create pods in namespace ns, so no drill they create may have "
        "the operator create one for them (RBAC: create on pods)",
    ]
    # Without a requester (the operator's own request) nobody is asked about; the references still count.
    auth.asked.clear()
    own = restore_validation.restore_findings(
        {
            "source": {"backupRef": {"name": "team-b"}},
            "target": {
                "podName": "ipa-hidden",
                "ldap": {"url": "ldaps://ipa", "passwordSecretRef": {"name": "dm"}},
            },
            "confirm": HOST,
        },
        where,
        requester=None,
        backups=backups,
    )
    assert own.errors == [
        "spec.decryption: IdmBackup ns/team-b is encrypted: set decryption.secretKeySecretRef to a Secret "
        "holding the private key of one of its recipients"
    ]
    assert auth.asked == []


# -- who may call the webhook at all ----------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _client_pki(directory: Path) -> Path:
    """A CA of its own for the API server's client certificate (client-ca.crt), a certificate it signed
    (client.crt), and one from another CA (stranger.crt): what an API server, and anyone else, holds."""
    directory.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for ca in ("client-ca", "stranger-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN={ca}",
                 "-days", "1", cwd=directory)  # fmt: skip
    (directory / "client.ext").write_text("extendedKeyUsage = clientAuth\n")
    for name, ca in (("client", "client-ca"), ("stranger", "stranger-ca")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", "client.ext",
                 cwd=directory)  # fmt: skip
    return directory


def _review(namespace: str, spec: dict[str, Any]) -> bytes:
    """An AdmissionReview as anyone can write one: here claiming a cluster admin."""
    request = {
        "uid": str(uuid.uuid4()),
        "kind": {"group": GROUP, "version": VERSION, "kind": "IdmBackup"},
        "resource": {"group": GROUP, "version": VERSION, "resource": PLURAL},
        "operation": "CREATE",
        "namespace": namespace,
        "userInfo": {"username": "mallory", "groups": ["system:masters", "system:authenticated"]},
        "object": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IdmBackup",
            "metadata": {"name": "probe", "namespace": namespace},
            "spec": spec,
        },
    }
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    return json.dumps(review).encode()


def _ask(
    port: int, server_ca: Path, review: bytes, cert: tuple[Path, Path] | None, *, tls12: bool = False
) -> dict[str, Any]:
    """POST the review to the webhook as a caller holding `cert` (or none). TLS 1.2 makes a refused
    certificate fail the handshake itself; with 1.3 the client may only see the connection close."""
    context = ssl.create_default_context(cafile=str(server_ca))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(*cert)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("POST", "/validate-idmbackup", review, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, (response.status, response.reason)
        answer: dict[str, Any] = json.loads(response.read())
        return answer
    finally:
        connection.close()


def test_with_the_charts_client_ca_the_webhook_answers_only_callers_holding_a_certificate_it_signed(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    crds: None,
    tmp_path: Path,
    helm: Callable[..., str],
) -> None:
    """Without it, any pod that reaches the port could send a review, claim any user, and learn whether a
    Secret exists in any namespace. The certificate directory is the chart's Secret, as the pod mounts it."""
    pki_dir = _client_pki(tmp_path / "client-pki")
    port = processes.free_port()
    docs = render(
        helm,
        "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{namespace}}}",
        "--set", f"webhook.url=https://127.0.0.1:{port}", "--set", "webhook.certificate.mode=helm",
        "--set-file", f"webhook.clientAuth.caBundle={pki_dir / 'client-ca.crt'}",
        namespace=namespace,
    )  # fmt: skip
    (secret,) = of_kind(docs, "Secret")
    cert_dir = tmp_path / "webhook-tls"
    cert_dir.mkdir()
    for key, value in secret["data"].items():
        (cert_dir / key).write_bytes(base64.b64decode(value))
    assert (cert_dir / "client-ca.crt").read_bytes() == (pki_dir / "client-ca.crt").read_bytes()
    (tmp_path / "pvc").mkdir()
    operator = OperatorProcess(
        namespace,
        platform.kubeconfig,
        tmp_path / "pvc",
        tmp_path / "operator.log",
        args=[
            "--webhook-port",
            str(port),
            "--webhook-address",
            "127.0.0.1",
            "--webhook-cert-dir",
            str(cert_dir),
        ],
    )
    operator.start()
    try:
        review = _review(
            namespace, _spec(platform, "mtls", encryption={"publicKeysSecretRef": {"name": "someones-keys"}})
        )
        server_ca, client_cert = cert_dir / "ca.crt", (pki_dir / "client.crt", pki_dir / "client.key")

        def answered() -> dict[str, Any] | None:
            # Until the operator listens and kopf knows the resource (its first answers are 404s).
            try:
                return _ask(port, server_ca, review, client_cert)
            except (OSError, AssertionError):
                return None

        answer = wait_for("the webhook to answer the API server's certificate", answered, timeout=60)
        assert answer["response"]["allowed"] is False
        assert f"Secret {namespace}/someones-keys not found" in answer["response"]["status"]["message"]
        # Anyone else is refused during the TLS handshake, before a byte of the review is read (without an
        # alert: the client sees an EOF in the middle of it); the same TLS 1.2 handshake with the API
        # server's certificate is answered.
        for refused in (None, (pki_dir / "stranger.crt", pki_dir / "stranger.key")):
            with pytest.raises(ssl.SSLError):
                _ask(port, server_ca, review, refused, tls12=True)
        assert _ask(port, server_ca, review, client_cert, tls12=True) == answer
        assert "requires a client certificate signed by" in operator.output()
        _an_api_server_without_the_certificate_is_refused_too(api, namespace, platform, docs)
    finally:
        operator.stop()


def _an_api_server_without_the_certificate_is_refused_too(
    api: client.ApiClient, namespace: str, platform: stack.Platform, docs: list[dict[str, Any]]
) -> None:
    """This platform's API server presents no client certificate to webhooks (no
    --admission-control-config-file): with the chart's configuration (failurePolicy Fail) it refuses
    every IdmBackup, and says why. What a cluster sees when clientAuth is set but the API server is not."""
    (configuration,) = of_kind(docs, "ValidatingWebhookConfiguration")
    admission = client.AdmissionregistrationV1Api(api)
    admission.create_validating_webhook_configuration(configuration)
    try:

        def refused() -> str | None:
            try:
                create_backup(api, namespace, "probe", _spec(platform, "probe"))
            except client.ApiException as err:
                return err.body if "failed calling webhook" in (err.body or "") else None
            # Not yet called: the configuration reaches the API server's webhook manager asynchronously.
            client.CustomObjectsApi(api).delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "probe"
            )
            return None

        body = wait_for("the API server to fail calling the webhook", refused, timeout=60, interval=0.5)
        assert 'failed calling webhook \\"validate.idmbackups.idm-backup.io\\"' in body, body
    finally:
        admission.delete_validating_webhook_configuration(configuration["metadata"]["name"])


# -- the chart's default: the operator makes, keeps and publishes its own certificate ---------------------

CERT_CHECK_ENV = "IDM_BACKUP_WEBHOOK_CERT_CHECK_SECONDS"  # handlers/startup.py; every minute by default


# The chart's configuration has one webhook per kind: IdmBackup, IdmBackupSchedule and IdmRestore.
WEBHOOKS = 3


@dataclasses.dataclass
class OwnCertificate:
    """The chart's webhook objects in operator mode, applied as a GitOps tool applies them, and the
    operators serving them. The certificate directory holds the Secret's keys, as the pod mounts it."""

    namespace: str
    port: int
    manifest: Path
    secret: str
    configuration: str
    start: Callable[..., OperatorProcess]
    operators: list[OperatorProcess]

    def stored(self, api: client.ApiClient) -> dict[str, str]:
        data: dict[str, str] = client.CoreV1Api(api).read_namespaced_secret(self.secret, self.namespace).data
        return data

    def ca_bundles(self, api: client.ApiClient) -> list[str | None]:
        configuration = client.AdmissionregistrationV1Api(api).read_validating_webhook_configuration(
            self.configuration
        )
        return [w.client_config.ca_bundle for w in configuration.webhooks]


def _kubectl_run(platform: stack.Platform, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(stack.binaries()["kubectl"]), f"--kubeconfig={platform.kubeconfig}", "-n", namespace, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _through_the_api_server(api: client.ApiClient, namespace: str, platform: stack.Platform) -> str:
    """What the API server answers to a dry run of an IdmBackup that only the webhook refuses (its pod does
    not exist): the refusal when the webhook answered, or the error it met calling the webhook."""
    try:
        _dry_run_backup(api, namespace, "probe", _spec(platform, "probe", target={"podName": "nowhere"}))
    except client.ApiException as err:
        return err.body or f"{err.status} {err.reason}"
    return "admitted"


def _served_certificate(port: int, ca_bundle: bytes, tmp_path: Path) -> tuple[bytes, dict[str, Any]]:
    """The certificate the operator on `port` serves, verified against `ca_bundle` for 127.0.0.1, the
    name the API server dials here."""
    cafile = tmp_path / f"ca-{uuid.uuid4().hex[:6]}.crt"
    cafile.write_bytes(ca_bundle)
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der, peer = tls.getpeercert(binary_form=True), tls.getpeercert()
    assert der is not None and peer is not None
    return der, peer


def _json_messages(operator: OperatorProcess) -> list[str]:
    """Every line of the operator's log is a JSON object (--log-format json); their messages."""
    return [json.loads(line)["message"] for line in operator.output().splitlines() if line.strip()]


@pytest.fixture
def own_certificate(
    api: client.ApiClient,
    platform: stack.Platform,
    crds: None,
    namespace: str,
    tmp_path: Path,
    helm: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[OwnCertificate]:
    """The chart with its defaults (certificate mode operator), for this namespace and a local operator."""
    port = processes.free_port()
    docs = render(
        helm,
        "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{namespace}}}",
        "--set", f"webhook.url=https://127.0.0.1:{port}",
        namespace=namespace,
    )  # fmt: skip
    (secret,) = of_kind(docs, "Secret")
    (configuration,) = of_kind(docs, "ValidatingWebhookConfiguration")
    manifest = tmp_path / "webhook.yaml"
    manifest.write_text(yaml.safe_dump_all([secret, configuration]))
    # kubectl apply, as Helm and Argo CD apply by default: three-way, with the last applied state.
    applied = _kubectl_run(platform, namespace, "apply", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    cert_dir = tmp_path / "webhook-tls"
    cert_dir.mkdir()
    for key, value in secret["data"].items():
        (cert_dir / key).write_bytes(base64.b64decode(value))
    (tmp_path / "pvc").mkdir()
    monkeypatch.setenv("IDM_BACKUP_LOG_FORMAT", "json")
    monkeypatch.setenv(CERT_CHECK_ENV, "1")
    operators: list[OperatorProcess] = []

    def start(name: str = "operator", listen: int = port) -> OperatorProcess:
        args = [
            "--webhook-port",
            str(listen),
            "--webhook-address",
            "127.0.0.1",
            "--webhook-cert-dir",
            str(cert_dir),
        ]
        operator = OperatorProcess(
            namespace, platform.kubeconfig, tmp_path / "pvc", tmp_path / f"{name}.log", args=args
        )
        operator.start()
        operators.append(operator)
        return operator

    own = OwnCertificate(
        namespace,
        port,
        manifest,
        secret["metadata"]["name"],
        configuration["metadata"]["name"],
        start,
        operators,
    )
    try:
        start()
        wait_for(
            "the webhook to answer through the API server",
            lambda: "denied the request" in _through_the_api_server(api, namespace, platform),
            timeout=60,
            interval=0.5,
        )
        yield own
    finally:
        client.AdmissionregistrationV1Api(api).delete_validating_webhook_configuration(own.configuration)
        for operator in operators:
            operator.stop()


def test_the_operator_makes_its_certificate_and_the_api_server_trusts_it_with_no_drift_left(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    own_certificate: OwnCertificate,
    secrets: None,
    freeipa: Any,
    tmp_path: Path,
) -> None:
    own = own_certificate
    rendered = yaml.safe_load_all(own.manifest.read_text())
    chart_data = next(d for d in rendered if d["kind"] == "Secret")["data"]
    stored = own.stored(api)
    # The chart's keys as rendered; the operator's next to them.
    assert {k: stored[k] for k in chart_data} == chart_data
    assert set(stored) - set(chart_data) == {"ca.crt", "ca.key", "serving.crt", "serving.key"}
    assert own.ca_bundles(api) == [stored["ca.crt"]] * WEBHOOKS
    # What it serves: a certificate of that CA, for the name the API server dials, and the chart's names.
    ca = base64.b64decode(stored["ca.crt"])
    der, peer = _served_certificate(own.port, ca, tmp_path)
    assert der == ssl.PEM_cert_to_DER_cert(base64.b64decode(stored["serving.crt"]).decode())
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    assert ("DNS", f"rel-idm-backup-operator-webhook.{namespace}.svc") in peer["subjectAltName"]

    # The API server: a bad spec refused by the webhook, a good one admitted.
    body = _through_the_api_server(api, namespace, platform)
    assert f"spec.target: target pod {namespace}/nowhere not found" in body, body
    freeipa()
    admitted = _dry_run_backup(api, namespace, "good", _spec(platform, "good"))
    assert admitted["spec"]["target"]["podName"] == "ipa-hidden"

    # No drift: what the operator wrote is not in the chart's manifests, so neither a three-way diff (Helm,
    # Argo CD's default) nor a server-side one (Flux, Argo CD's server-side diff) sees a difference.
    for diff in (["diff"], ["diff", "--server-side", "--field-manager=gitops"]):
        compared = _kubectl_run(platform, namespace, *diff, "-f", str(own.manifest))
        assert (compared.returncode, compared.stdout) == (0, ""), (diff, compared.stdout, compared.stderr)

    # The log is JSON, says what happened, and holds no key, in any form.
    (operator,) = own.operators
    messages = _json_messages(operator)
    assert any("made a new CA and serving certificate" in m for m in messages), messages
    assert any(f"caBundle of ValidatingWebhookConfiguration {own.configuration}" in m for m in messages)
    log = operator.output()
    for key in ("ca.key", "serving.key"):
        pem = base64.b64decode(stored[key]).decode()
        body_lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
        assert stored[key] not in log and all(line not in log for line in body_lines), key


def test_a_restart_keeps_the_ca_so_the_api_server_never_meets_an_unknown_one(
    api: client.ApiClient, namespace: str, platform: stack.Platform, own_certificate: OwnCertificate
) -> None:
    own = own_certificate
    before, bundles = own.stored(api), own.ca_bundles(api)
    own.operators[0].stop()
    restarted = own.start("restarted")
    answers: list[str] = []

    def answered() -> bool:
        answers.append(_through_the_api_server(api, namespace, platform))
        return "denied the request" in answers[-1]

    wait_for("the restarted operator to answer", answered, timeout=60, interval=0.2)
    # While it started: refused connections, never a certificate the API server does not trust.
    for answer in answers[:-1]:
        assert "connection refused" in answer and "x509" not in answer, answer
    assert (own.stored(api), own.ca_bundles(api)) == (before, bundles)  # nothing new, nothing rewritten
    assert any("using the CA and certificate in Secret" in m for m in _json_messages(restarted))
    assert not any("made a new" in m for m in _json_messages(restarted))


def test_replicas_starting_together_agree_on_one_ca_and_what_a_sync_replaces_comes_back(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    own_certificate: OwnCertificate,
    tmp_path: Path,
) -> None:
    own = own_certificate
    own.operators[0].stop()
    # As a fresh install: the chart's Secret and configuration as rendered, nothing of the operator's.
    replaced = _kubectl_run(platform, namespace, "replace", "-f", str(own.manifest))
    assert replaced.returncode == 0, replaced.stderr
    assert "ca.crt" not in own.stored(api) and own.ca_bundles(api) == [None] * WEBHOOKS
    second_port = processes.free_port()
    replicas = [own.start("replica-a"), own.start("replica-b", listen=second_port)]

    def both_serving() -> list[bytes] | None:
        stored = own.stored(api)
        if "ca.crt" not in stored:
            return None
        try:
            ca = base64.b64decode(stored["ca.crt"])
            return [_served_certificate(port, ca, tmp_path)[0] for port in (own.port, second_port)]
        except OSError:  # not listening yet, or still serving a certificate of its own
            return None

    served = wait_for("both replicas to serve the Secret's certificate", both_serving, timeout=60)
    assert served[0] == served[1]
    made = [r for r in replicas if any("made a new CA" in m for m in _json_messages(r))]
    assert len(made) == 1, [r.output()[-2000:] for r in replicas]
    stored = own.stored(api)
    wait_for("the caBundle", lambda: own.ca_bundles(api) == [stored["ca.crt"]] * WEBHOOKS, timeout=30)
    wait_for("the webhook", lambda: "denied the request" in _through_the_api_server(api, namespace, platform))

    # A sync that replaces both objects (Argo CD's Replace=true, kubectl replace): the operators put back the
    # same CA, from memory, rather than a new one the other replica does not serve.
    replaced = _kubectl_run(platform, namespace, "replace", "-f", str(own.manifest))
    assert replaced.returncode == 0, replaced.stderr
    wait_for("the Secret to be filled in again", lambda: own.stored(api) == stored, timeout=30)
    wait_for(
        "the caBundle to be back", lambda: own.ca_bundles(api) == [stored["ca.crt"]] * WEBHOOKS, timeout=30
    )
    assert any("wrote the certificate it serves back" in m for r in replicas for m in _json_messages(r))
    wait_for("the webhook", lambda: "denied the request" in _through_the_api_server(api, namespace, platform))


# -- the certificates themselves (kube/webhookcert.py), at any time ---------------------------------------


def _plan(
    *dns_names: str, ip_addresses: tuple[str, ...] = ("127.0.0.1",), days: int = 3650
) -> webhookcert.Plan:
    given = {"namespace": "ops", "secret": "rel-webhook-tls", "configuration": "rel-ops"}
    given |= {"dnsNames": list(dns_names), "ipAddresses": list(ip_addresses), "validityDays": days}
    return webhookcert.Plan.parse(json.dumps(given))


def _trusted(material: webhookcert.Material, ca_bundle: bytes, tmp_path: Path) -> bool:
    """Whether a client trusting `ca_bundle` accepts `material`'s serving certificate for 127.0.0.1, as the
    API server would: a TLS handshake."""
    served = tmp_path / f"served-{uuid.uuid4().hex[:6]}.pem"
    served.write_bytes(material.key + material.cert)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(served, served)
    cafile = tmp_path / f"bundle-{uuid.uuid4().hex[:6]}.pem"
    cafile.write_bytes(ca_bundle)
    context = ssl.create_default_context(cafile=str(cafile))
    ours, theirs = socket.socketpair()
    with ours, theirs, concurrent.futures.ThreadPoolExecutor(1) as pool:

        def serve() -> None:
            with contextlib.suppress(ssl.SSLError, OSError):
                server.wrap_socket(ours, server_side=True).close()

        handshake = pool.submit(serve)
        try:
            with context.wrap_socket(theirs, server_hostname="127.0.0.1"):
                return True
        except ssl.SSLCertVerificationError:
            return False
        finally:
            theirs.close()
            handshake.result(timeout=10)


def _issued_by(material: webhookcert.Material, ca_pem: bytes) -> bool:
    try:
        x509.load_pem_x509_certificate(material.cert).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca_pem)
        )
    except (ValueError, InvalidSignature):
        return False
    return True


def _cas(material: webhookcert.Material) -> list[bytes]:
    return [
        c.public_bytes(serialization.Encoding.PEM)
        for c in x509.load_pem_x509_certificates(material.ca_bundle)
    ]


def test_a_certificate_is_kept_renewed_from_the_same_ca_and_a_renewed_ca_keeps_the_old_one_trusted(
    tmp_path: Path,
) -> None:
    plan, day = _plan("rel-webhook.ops.svc"), datetime.timedelta(days=1)
    now = datetime.datetime.now(datetime.UTC)
    first, done = webhookcert.provide(None, plan, now)
    assert done == "ca" and len(_cas(first)) == 1 and _trusted(first, first.ca_bundle, tmp_path)
    # Kept as it is while it is good: what restarts and replicas rely on.
    assert webhookcert.provide(first, plan, now + 200 * day) == (first, "nothing")
    # Other names (an upgrade with another url): a new serving certificate from the same CA, so that the
    # caBundle stays as it is.
    renamed, done = webhookcert.provide(first, _plan("rel-webhook.ops.svc", ip_addresses=()), now)
    assert (done, renamed.ca_bundle, renamed.ca_key) == ("serving", first.ca_bundle, first.ca_key)
    assert _issued_by(renamed, first.ca_bundle) and not _trusted(renamed, first.ca_bundle, tmp_path)
    # A serving certificate lives a year at most, renewed from the same CA with a third of it left.
    renewed, done = webhookcert.provide(first, plan, now + 250 * day)
    assert (done, renewed.ca_bundle) == ("serving", first.ca_bundle) and renewed.cert != first.cert
    assert _issued_by(renewed, first.ca_bundle)

    # The CA's turn, with a third of its ten years left: a new one, first in the bundle, the old one after
    # it, so a replica still serving a certificate of the old CA stays trusted until it takes the new one.
    old = webhookcert.provide(None, plan, now - 2440 * day)[0]
    rolled, done = webhookcert.provide(old, plan, now)
    assert done == "ca" and _cas(rolled) == [*_cas(rolled)[:1], *_cas(old)]
    assert _trusted(rolled, rolled.ca_bundle, tmp_path) and not _trusted(rolled, old.ca_bundle, tmp_path)
    assert _issued_by(old, _cas(rolled)[1])
    # Once expired, the old CA leaves the bundle (with the next serving certificate).
    later, done = webhookcert.provide(rolled, plan, now + 1300 * day)
    assert done == "serving" and _cas(later) == _cas(rolled)[:1]
    # Material that is not ours (the CA's key is another CA's) is replaced, and none of it trusted on.
    foreign = dataclasses.replace(first, ca_key=rolled.ca_key)
    fresh, done = webhookcert.provide(foreign, plan, now)
    assert done == "ca" and len(_cas(fresh)) == 1 and not set(_cas(fresh)) & set(_cas(first))
    with pytest.raises(ValueError, match="not a webhook certificate plan"):
        webhookcert.Plan.parse(b'{"namespace": "ops"}')


class _Secrets:
    """The API's Secret, where another replica's write lands just before this one's first."""

    def __init__(self, data: dict[str, str], rival: dict[str, str]) -> None:
        meta = client.V1ObjectMeta(name="rel-webhook-tls", namespace="ops", resource_version="1")
        self.secret = client.V1Secret(metadata=meta, data=dict(data))
        self.rival: dict[str, str] | None = rival
        self.writes = 0

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        assert (name, namespace) == ("rel-webhook-tls", "ops")
        return copy.deepcopy(self.secret)

    def replace_namespaced_secret(self, name: str, namespace: str, body: client.V1Secret) -> None:
        self.writes += 1
        if self.rival is not None:
            self.secret.data = {**self.secret.data, **self.rival}
            self.secret.metadata.resource_version, self.rival = "2", None
            raise client.ApiException(status=409, reason="Conflict")
        assert body.metadata.resource_version == self.secret.metadata.resource_version
        self.secret = body


class _Configurations:
    def __init__(self) -> None:
        webhook = client.V1ValidatingWebhook(
            name="validate.idmbackups.idm-backup.io",
            client_config=client.AdmissionregistrationV1WebhookClientConfig(url="https://127.0.0.1:9443"),
            admission_review_versions=["v1"],
            side_effects="None",
        )
        meta = client.V1ObjectMeta(name="rel-ops", resource_version="7")
        self.configuration = client.V1ValidatingWebhookConfiguration(metadata=meta, webhooks=[webhook])
        self.patches: list[list[dict[str, Any]]] = []

    def read_validating_webhook_configuration(self, name: str) -> client.V1ValidatingWebhookConfiguration:
        assert name == "rel-ops"
        return self.configuration

    def patch_validating_webhook_configuration(self, name: str, body: list[dict[str, Any]]) -> None:
        self.patches.append(body)


def test_a_replica_that_loses_the_race_to_write_the_certificate_takes_the_one_that_won(
    tmp_path: Path,
) -> None:
    plan, now = _plan("rel-webhook.ops.svc"), datetime.datetime.now(datetime.UTC)
    winner = webhookcert.provide(None, plan, now)[0]
    chart_data = {"tls.crt": "", "tls.key": "", "certificate.json": base64.b64encode(b"{}").decode()}
    secrets, configurations = _Secrets(chart_data, rival=winner.secret_data()), _Configurations()
    (tmp_path / "served").mkdir(mode=0o700)
    keeper = webhookcert.CertificateKeeper(secrets, configurations, plan, tmp_path / "served")
    keeper.reconcile(now)
    # Its own write refused (409), it reads again and serves what the other replica wrote, as it is.
    assert secrets.writes == 1 and keeper.material == winner
    assert keeper.served.read_bytes() == winner.key + winner.cert
    assert keeper.served.stat().st_mode & 0o077 == 0
    # An unreadable certificate.json in the Secret does not lose the names asked for before.
    assert keeper.plan == plan
    # The caBundle: every webhook, and only in the configuration as it was read.
    assert configurations.patches == [
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
            {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": winner.ca_bundle_b64()},
        ]
    ]
