"""The validating admission webhook, called by the real API server over HTTPS on 127.0.0.1.

The operator runs as a local process with --webhook-port and a serving certificate for 127.0.0.1 from the
platform's CA. The Helm chart's ValidatingWebhookConfiguration, rendered for the test's namespace and
that URL, points the API server at it. Objects are created as users create them, with the API client and
with kubectl, whose output is what a person sees.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from testbed import freeipa_pod, pki, processes, stack
from testbed.deploy import OperatorProcess
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
    # The chart's own configuration, pointed at this operator: namespace mode limits it to the test's
    # namespace, and the CA is the platform's, which signed the serving certificate.
    ca_bundle = base64.b64encode((pki_dir / "ca.crt").read_bytes()).decode()
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
    with pytest.raises(client.ApiException):
        get_backup(api, namespace, "broken")
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
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, SCHEDULES, "nightly", {"metadata": {"annotations": {"team": "idm"}}}
    )


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
