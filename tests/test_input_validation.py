"""Input refused when it is applied, not when the backup runs (issue 12).

The CRD schema refuses what it can express; the webhook's pure checks (validation.spec_problems, run again
when a backup starts) refuse the same for CRDs installed before those rules, and retention policies that
get past both make the schedule say so instead of failing its loop.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from idm_backup_operator.api.spec import parse_backup_spec
from idm_backup_operator.idmbackup import validation
from idm_backup_operator.idmbackupschedule import reconcile
from idm_backup_operator.idmbackupschedule import spec as schedule_spec
from idm_backup_operator.kube import references
from idm_backup_operator.kube.backups import IdmBackups
from idm_backup_operator.storage import S3Config, S3Store
from testbed import freeipa_pod, stack
from testbed.deploy import REPO
from tests.helpers import GROUP, PLURAL, SCHEDULES, VERSION, backup_spec, s3_storage, wait_for

VALID_SPEC: dict[str, Any] = {
    "target": {
        "podName": "ipa-hidden",
        "ldap": {"url": "ldaps://ipa-hidden.example.test", "passwordSecretRef": {"name": "dm-password"}},
    },
    "encryption": {"publicKeysSecretRef": {"name": "backup-public-key"}},
    "storage": {
        "s3": {
            "bucket": "idm-backups",
            "endpoint": "https://s3.example.test",
            "credentialsSecretRef": {"name": "s3-credentials"},
        }
    },
}


def with_value(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `spec` with the dotted `path` set to `value`."""
    changed = copy.deepcopy(spec)
    *parents, last = path.split(".")
    level = changed
    for name in parents:
        level = level.setdefault(name, {})
    level[last] = value
    return changed


# -- the pure checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bucket", "problem"),
    [
        ("Idm-Backups", "3-63 lowercase letters, digits, dots and hyphens"),
        ("idm_backups", "3-63 lowercase letters, digits, dots and hyphens"),
        ("-idm-backups", "beginning and ending with a letter or digit"),
        ("idm-backups.", "beginning and ending with a letter or digit"),
        ("ab", "3-63 lowercase letters"),
        ("a" * 64, "3-63 lowercase letters"),
        ("idm..backups", "two adjacent dots"),
        ("192.168.5.4", "looks like an IP address"),
    ],
)
def test_a_bucket_name_breaking_s3_rules_is_a_problem(bucket: str, problem: str) -> None:
    found = validation.bucket_problem(bucket)
    assert found is not None and found.startswith(f"{bucket!r} is not an S3 bucket name") and problem in found


@pytest.mark.parametrize("bucket", ["idm-backups", "a1b", "idm.backups.2026", "192.168.5.4.backups"])
def test_a_valid_bucket_name_is_no_problem(bucket: str) -> None:
    assert validation.bucket_problem(bucket) is None


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("http://", "has no host, e.g. https://s3.example.com"),
        ("https://:9000", "has no host, e.g. https://s3.example.com"),
        ("http://s3 .example.test", "contains white space"),
        ("https://s3.example.test/a b", "contains white space"),
        ("s3.example.test", "is not an http:// or https:// URL"),
        ("ftp://s3.example.test", "is not an http:// or https:// URL"),
        ("http://s3.example.test:99999", "has an invalid port"),
        ("http://s3_host.example.test", "has an invalid host name 's3_host.example.test'"),
    ],
)
def test_an_endpoint_the_s3_client_refuses_is_a_problem(endpoint: str, problem: str) -> None:
    assert validation.endpoint_problem(endpoint) == f"{endpoint!r} {problem}"


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:7070",
        "https://s3.example.test",
        "https://s3.example.test:8443/",
        "http://[::1]:9000",
    ],
)
def test_an_endpoint_the_s3_client_takes_is_no_problem(endpoint: str) -> None:
    assert validation.endpoint_problem(endpoint) is None
    S3Store(S3Config(bucket="idm-backups", endpoint_url=endpoint))  # botocore's own check passes too


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "the name is empty"),
        ("..", "'..' is not an object name"),
        ("IPA-hidden", "'IPA-hidden' is not an object name"),
        ("a/b", "'a/b' is not an object name"),
        ("a" * 254, "is not an object name: at most 253"),
    ],
)
def test_a_malformed_object_name_is_a_problem(name: str, problem: str) -> None:
    found = validation.object_name_problem(name)
    assert found is not None and problem in found


def test_the_spec_checks_name_every_malformed_field() -> None:
    spec = with_value(VALID_SPEC, "target.podName", "..")
    spec = with_value(spec, "target.ldap.passwordSecretRef.name", "")
    spec = with_value(spec, "target.ldap.caSecretRef.name", "CA")
    spec = with_value(spec, "encryption.publicKeysSecretRef.name", "")
    spec = with_value(spec, "storage.s3.credentialsSecretRef.name", "")
    spec = with_value(spec, "storage.s3.caSecretRef.name", "s3/ca")
    spec = with_value(spec, "storage.s3.bucket", "Idm..Backups")
    spec = with_value(spec, "storage.s3.endpoint", "http://")
    spec = with_value(spec, "activeDeadlineSeconds", 2**62)
    problems = validation.spec_problems(parse_backup_spec(spec))
    assert [p.split(":", 1)[0] for p in problems] == [
        "spec.target.podName",
        "spec.target.ldap.passwordSecretRef.name",
        "spec.target.ldap.caSecretRef.name",
        "spec.encryption.publicKeysSecretRef.name",
        "spec.storage.s3.credentialsSecretRef.name",
        "spec.storage.s3.caSecretRef.name",
        "spec.activeDeadlineSeconds",
        "spec.storage.s3.bucket",
        "spec.storage.s3.endpoint",
    ]
    assert "spec.target.ldap.passwordSecretRef.name: the name is empty" in problems
    assert f"spec.activeDeadlineSeconds: {2**62} is more than the maximum, 604800 (7 days)" in problems
    assert validation.spec_problems(parse_backup_spec(VALID_SPEC)) == []


def test_a_pvc_claim_name_must_not_leave_the_operators_mount_directory() -> None:
    spec = with_value(VALID_SPEC, "storage", {"pvc": {"claimName": ".."}})
    assert validation.spec_problems(parse_backup_spec(spec)) == [
        "spec.storage.pvc.claimName: '..' is not an object name: at most 253 lowercase letters, digits, "
        "'-' and '.', beginning and ending with a letter or digit"
    ]


@pytest.mark.parametrize(
    ("max_age", "message"),
    [
        ("0d", "maxAge must be positive, got 0d"),
        ("000h", "maxAge must be positive, got 0d"),
        ("5m", "maxAge '5m' is not a number followed by h, d or w, e.g. 90d"),
        ("99999999999d", "maxAge '99999999999d' is too long"),
    ],
)
def test_a_retention_policy_the_crd_refuses_is_a_value_error(max_age: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        schedule_spec.retention_policy({"retention": {"maxAge": max_age}})
    assert str(caught.value) == message


class RecordingReporter:
    """The schedule's status as the operator would write it."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.conditions: dict[str, tuple[bool, str, str]] = {}

    def update(self, **status: Any) -> None:
        self.status.update(status)

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.conditions[type_] = (status, reason, message)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class NoBackups:
    """The API as a schedule without backups sees it: listing works, nothing else may be called."""

    def list_namespaced_custom_object(self, *_: Any, **__: Any) -> dict[str, Any]:
        return {"items": []}


def test_a_schedule_pass_with_a_zero_max_age_reports_it_and_deletes_nothing() -> None:
    """Without the webhook and with a CRD from before the maxAge rule, "0d" used to make every pass raise."""
    schedule = {
        "metadata": {"namespace": "ns", "name": "s", "uid": "u", "creationTimestamp": "2026-03-01T10:00:00Z"},
        "spec": {"schedule": "0 3 * * *", "template": {"spec": VALID_SPEC}, "retention": {"maxAge": "0d"}},
        "status": {},
    }
    now = datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC)
    custom: Any = NoBackups()
    tick = reconcile.take_tick(IdmBackups(custom), schedule, now)
    report = RecordingReporter()
    services: Any = None  # only retention would use them
    next_pass = reconcile.record(services, IdmBackups(custom), schedule, report, now, tick)
    assert report.conditions["Ready"] == (
        False,
        "InvalidRetention",
        "spec.retention: maxAge must be positive, got 0d; nothing is deleted; next backup at "
        "2026-03-02T03:00:00Z",
    )
    assert report.status["nextScheduleTime"] == "2026-03-02T03:00:00Z"
    assert next_pass == datetime.datetime(2026, 3, 2, 3, tzinfo=datetime.UTC)


def test_a_starting_deadline_too_long_for_a_timedelta_is_taken_as_the_longest_one() -> None:
    schedule = {
        "metadata": {"namespace": "ns", "name": "s", "uid": "u", "creationTimestamp": "2026-03-01T10:00:00Z"},
        "spec": {"schedule": "0 3 * * *", "template": {"spec": VALID_SPEC}, "startingDeadlineSeconds": 2**62},
        "status": {},
    }
    custom: Any = NoBackups()
    tick = reconcile.take_tick(
        IdmBackups(custom), schedule, datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC)
    )
    assert isinstance(tick, reconcile.Tick) and not tick.created
    crd = yaml.safe_load((REPO / "crds" / "idm-backup.io_idmbackupschedules.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert (
        spec["properties"]["startingDeadlineSeconds"]["maximum"]
        == schedule_spec.MAX_STARTING_DEADLINE_SECONDS
    )


def test_a_valid_max_age_is_parsed() -> None:
    policy = schedule_spec.retention_policy({"retention": {"maxAge": "036h"}})
    assert policy.max_age is not None and policy.max_age.total_seconds() == 36 * 3600


# -- the real API server: the CRD schema ------------------------------------------------------------------

SCHEMA_REFUSALS = [
    ("storage.s3.bucket", "Idm-Backups", "an S3 bucket name has only lowercase letters"),
    ("storage.s3.bucket", "idm..backups", "an S3 bucket name has no two dots in a row"),
    ("storage.s3.bucket", "192.168.5.4", "an S3 bucket name does not look like an IP address"),
    ("storage.s3.endpoint", "http://", "should match"),
    ("storage.s3.endpoint", "http://s3 .example.test", "should match"),
    ("storage.s3.endpoint", "https://:9000", "endpoint must be an http:// or https:// URL with a host"),
    ("activeDeadlineSeconds", 10 * 365 * 86400, "should be less than or equal to 604800"),
    ("activeDeadlineSeconds", 2**62, "should be less than or equal to 604800"),
    ("target.podName", "..", "should match"),
    ("target.ldap.passwordSecretRef.name", "", "should be at least 1 chars long"),
    ("target.ldap.caSecretRef.name", "", "should be at least 1 chars long"),
    ("encryption.publicKeysSecretRef.name", "", "should be at least 1 chars long"),
    ("storage.s3.credentialsSecretRef.name", "", "should be at least 1 chars long"),
    ("storage.s3.caSecretRef.name", "", "should be at least 1 chars long"),
    ("encryption.publicKeysSecretRef.name", "Keys", "should match"),
]


def dry_run_create(
    api: client.ApiClient, namespace: str, plural: str, kind: str, spec: dict[str, Any]
) -> Any:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": "probe"}, "spec": spec}
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, body, dry_run="All"
    )


def refusal(create: Callable[[], Any]) -> str:
    """The API server's refusal of `create`, once it serves the CRDs of this checkout (a replaced CRD's
    schema takes effect a moment after the replace)."""

    def refused() -> str | None:
        try:
            create()
        except client.ApiException as err:
            assert err.status == 422, (err.status, err.body)
            return err.body or ""
        return None

    message: str = wait_for("the API server to refuse the object", refused, timeout=15)
    return message


@pytest.mark.platform
@pytest.mark.parametrize("kind", ["IdmBackup", "IdmBackupSchedule"])
@pytest.mark.parametrize(("path", "value", "message"), SCHEMA_REFUSALS)
def test_the_api_server_refuses_malformed_fields_of_a_backup_and_of_a_schedules_template(
    api: client.ApiClient, namespace: str, crds: None, kind: str, path: str, value: Any, message: str
) -> None:
    valid = with_value(VALID_SPEC, "target.ldap.caSecretRef", {"name": "ldap-ca"})
    valid = with_value(valid, "storage.s3.caSecretRef", {"name": "s3-ca"})

    def create(spec: dict[str, Any]) -> Any:
        if kind == "IdmBackup":
            return dry_run_create(api, namespace, PLURAL, kind, spec)
        schedule = {"schedule": "0 3 * * *", "template": {"spec": spec}}
        return dry_run_create(api, namespace, SCHEDULES, kind, schedule)

    field = f"spec.{path}" if kind == "IdmBackup" else f"spec.template.spec.{path}"
    body = refusal(lambda: create(with_value(valid, path, value)))
    assert f"{field}: Invalid value" in body and message in body
    create(valid)  # the same spec with a valid value is admitted: the refusal was for this field


@pytest.mark.platform
@pytest.mark.parametrize("max_age", ["0d", "00h", "0w"])
def test_the_api_server_refuses_a_zero_max_age(
    api: client.ApiClient, namespace: str, crds: None, max_age: str
) -> None:
    spec = {"schedule": "0 3 * * *", "template": {"spec": VALID_SPEC}, "retention": {"maxAge": max_age}}
    body = refusal(lambda: dry_run_create(api, namespace, SCHEDULES, "IdmBackupSchedule", spec))
    assert "spec.retention.maxAge: Invalid value" in body
    spec["retention"]["maxAge"] = "07d"
    dry_run_create(api, namespace, SCHEDULES, "IdmBackupSchedule", spec)


# -- the real API server: what the webhook and the operator read ------------------------------------------


@pytest.mark.platform
def test_malformed_names_are_refused_by_the_webhook_checks_without_reading_other_objects(
    api: client.ApiClient, namespace: str, platform: stack.Platform, tmp_path: Path
) -> None:
    """With CRDs older than the name rules, the webhook saw podName ".." and read the namespace (the URL
    .../pods/.. is normalized to it) as a pod: "Invalid value for `containers`, must not be `None`"."""
    spec = backup_spec(platform, s3_storage(platform, "names"), target={"podName": ".."})
    spec["encryption"]["publicKeysSecretRef"]["name"] = ""
    spec["storage"]["s3"]["credentialsSecretRef"]["name"] = ""
    where = validation.ReferenceScope(
        client.CoreV1Api(api), namespace, tmp_path, ambient_s3_credentials=False
    )
    findings = validation.backup_findings(spec, where)
    assert findings.errors[:3] == [
        "spec.target.podName: '..' is not an object name: at most 253 lowercase letters, digits, '-' and "
        "'.', beginning and ending with a letter or digit",
        "spec.encryption.publicKeysSecretRef.name: the name is empty",
        "spec.storage.s3.credentialsSecretRef.name: the name is empty",
    ]
    # The lookups of those three are left out; the password Secret, well named, is looked up.
    assert findings.errors[3:] == [
        f"spec.target.ldap.passwordSecretRef: Secret {namespace}/{freeipa_pod.DM_PASSWORD_SECRET} not found"
    ]


@pytest.mark.platform
def test_reading_a_secret_with_an_empty_name_says_the_name_is_empty(
    api: client.ApiClient, namespace: str, platform: stack.Platform
) -> None:
    """It used to GET .../secrets/, the namespace's list of Secrets: "Secret ns/ has no keys at all"."""
    spec = parse_backup_spec(with_value(VALID_SPEC, "encryption.publicKeysSecretRef.name", ""))
    with pytest.raises(references.ResolveError) as caught:
        references.load_public_keys(client.CoreV1Api(api), namespace, spec.encryption)
    assert str(caught.value) == f"the Secret name is empty: name a Secret in namespace {namespace}"


# -- the LDAP bind password never crosses the network in clear text ------------------------------------

LDAP_URLS = [
    # (url, startTLS, the problem, or None)
    ("ldaps://ipa-hidden.example.test", False, None),
    ("ldap://ipa-hidden.example.test", True, None),
    ("ldap://127.0.0.1:3389", False, None),
    ("ldap://127.255.0.9/", False, None),
    ("ldap://localhost", False, None),
    ("ldap://[::1]:389", False, None),
    ("ldap://ipa-hidden.example.test", False, "would send the bind password unencrypted"),
    ("ldap://10.0.0.5:389", False, "would send the bind password unencrypted"),
    ("ldap://127.0.0.1.attacker.example", False, "would send the bind password unencrypted"),
    ("ldap://localhost.attacker.example", False, "would send the bind password unencrypted"),
    ("ldap://127.0.0.256", False, "would send the bind password unencrypted"),
    ("ldap://[::2]", False, "would send the bind password unencrypted"),
    ("ldap://127.0.0.1/dc=example,dc=test", False, "is not one URL"),
    ("ldap://127.0.0.1:1 ldap://attacker.example", False, "is not one URL"),
    ("ldaps://ipa-hidden.example.test ldap://attacker.example", False, "is not one URL"),
    ("ldaps://ipa-hidden.example.test,ldap://attacker.example", False, "is not one URL"),
]


@pytest.mark.parametrize(("url", "start_tls", "problem"), LDAP_URLS)
def test_plain_ldap_is_a_problem_unless_it_stays_on_loopback(
    url: str, start_tls: bool, problem: str | None
) -> None:
    spec = with_value(with_value(VALID_SPEC, "target.ldap.url", url), "target.ldap.startTLS", start_tls)
    found = validation.spec_problems(parse_backup_spec(spec))
    if problem is None:
        assert found == []
    else:
        assert (
            len(found) == 1 and found[0].startswith(f"spec.target.ldap.url: {url!r} ") and problem in found[0]
        )


def test_plain_ldap_is_refused_in_words_that_say_what_to_do() -> None:
    spec = with_value(VALID_SPEC, "target.ldap.url", "ldap://ipa-hidden.example.test")
    assert validation.spec_problems(parse_backup_spec(spec)) == [
        "spec.target.ldap.url: 'ldap://ipa-hidden.example.test' would send the bind password unencrypted: "
        "use ldaps://, or ldap:// with startTLS: true (plain ldap:// is allowed only to 127.0.0.0/8, "
        "localhost or [::1])"
    ]


def test_the_crds_ldap_rules_use_the_operators_expressions() -> None:
    crd = yaml.safe_load((REPO / "crds" / "idm-backup.io_idmbackups.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    separators, cleartext = spec["properties"]["target"]["properties"]["ldap"]["x-kubernetes-validations"]
    assert separators["rule"] == f'!self.url.matches(r"{validation.LDAP_URL_SEPARATOR.pattern}")'
    assert f'self.url.matches(r"^{validation.LOOPBACK_LDAP_URL.pattern}$")' in cleartext["rule"]
    assert separators["fieldPath"] == cleartext["fieldPath"] == ".url"


@pytest.mark.platform
@pytest.mark.parametrize("kind", ["IdmBackup", "IdmBackupSchedule"])
def test_the_api_server_refuses_exactly_the_ldap_urls_the_operator_refuses(
    api: client.ApiClient, namespace: str, crds: None, kind: str
) -> None:
    """The CRD's CEL rules and validation.spec_problems (for CRDs older than them) must draw the same line."""
    field = "spec.target.ldap.url" if kind == "IdmBackup" else "spec.template.spec.target.ldap.url"

    def create(spec: dict[str, Any]) -> Any:
        if kind == "IdmBackup":
            return dry_run_create(api, namespace, PLURAL, kind, spec)
        return dry_run_create(
            api, namespace, SCHEDULES, kind, {"schedule": "0 3 * * *", "template": {"spec": spec}}
        )

    for url, start_tls, problem in LDAP_URLS:
        spec = with_value(with_value(VALID_SPEC, "target.ldap.url", url), "target.ldap.startTLS", start_tls)
        if problem is None:
            create(spec)
            continue
        body = refusal(lambda spec=spec: create(spec))  # type: ignore[misc]
        assert f"{field}: Invalid value" in body, (url, body)
        expected = "url must be one LDAP URL" if problem == "is not one URL" else "plain ldap:// would send"
        assert expected in body, (url, body)


# -- whoever names a Secret must be allowed to read it ------------------------------------------------------


@pytest.mark.platform
def test_a_secret_counts_as_unreadable_when_the_api_server_cannot_say(
    api: client.ApiClient, namespace: str, platform: stack.Platform, tmp_path: Path
) -> None:
    """An operator that may not create SubjectAccessReviews (an RBAC rule missing) must refuse, not let
    the Secrets through unchecked, nor look them up for the requester."""
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "no-reviews"}})
    token = core.create_namespaced_service_account_token(
        "no-reviews", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    cfg = client.Configuration()
    cfg.host = platform.api_server
    cfg.ssl_ca_cert = str(Path(platform.state_dir) / "pki" / "ca.crt")
    cfg.api_key = {"BearerToken": token}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    where = validation.ReferenceScope(
        core, namespace, tmp_path, ambient_s3_credentials=False,
        authorization=client.AuthorizationV1Api(client.ApiClient(cfg)),
    )  # fmt: skip
    spec = backup_spec(platform, s3_storage(platform, "sar"))
    findings = validation.backup_findings(spec, where, requester=validation.Requester("alice"))
    secrets = [
        ("spec.target.ldap.passwordSecretRef", freeipa_pod.DM_PASSWORD_SECRET),
        ("spec.encryption.publicKeysSecretRef", "backup-public-key"),
        ("spec.storage.s3.credentialsSecretRef", "s3-credentials"),
    ]
    assert findings.errors == [
        f"{field}: could not check whether alice may read Secret {namespace}/{name} (403 Forbidden)"
        for field, name in secrets
    ] + [f"spec.target: target pod {namespace}/ipa-hidden not found"]


def test_a_selector_with_characters_that_would_add_selector_terms_is_a_problem() -> None:
    # "app=ipa,tier" as a value would be sent as the selector "app=ipa,tier": a second term.
    selector = {
        "matchLabels": {"app": "ipa,tier"},
        "matchExpressions": [
            {"key": "role in (x),other", "operator": "Exists"},
            {"key": "zone", "operator": "In", "values": ["a", "b)"]},
        ],
    }
    spec = with_value(VALID_SPEC, "target", {"podSelector": selector, "ldap": VALID_SPEC["target"]["ldap"]})
    assert validation.spec_problems(parse_backup_spec(spec)) == [
        "spec.target.podSelector.matchLabels: 'app'='ipa,tier' is not a label key and value",
        "spec.target.podSelector.matchExpressions[0]: 'role in (x),other' [] are not a label key and values",
        "spec.target.podSelector.matchExpressions[1]: 'zone' ['a', 'b)'] are not a label key and values",
    ]
    fine = with_value(
        spec,
        "target.podSelector",
        {
            "matchLabels": {"app.kubernetes.io/name": "freeipa", "role": ""},
            "matchExpressions": [{"key": "example.com/tier", "operator": "NotIn", "values": ["a-1", "b.2"]}],
        },
    )
    assert validation.spec_problems(parse_backup_spec(fine)) == []


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1", "default", "garage_1"])
def test_a_region_name_is_no_problem(region: str) -> None:
    assert (
        validation.spec_problems(parse_backup_spec(with_value(VALID_SPEC, "storage.s3.region", region))) == []
    )


@pytest.mark.parametrize("region", ["attacker.example/x", "us east", "-x", "a" * 64, "eu#1"])
def test_a_region_that_would_change_aws_host_names_is_a_problem(region: str) -> None:
    problems = validation.spec_problems(
        parse_backup_spec(with_value(VALID_SPEC, "storage.s3.region", region))
    )
    assert problems == [
        f"spec.storage.s3.region: {region!r} is not a region name (letters, digits, '-', '_', '.')"
    ]


def test_an_administrator_can_keep_s3_endpoints_to_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(validation.ENDPOINTS_ENV, "s3.example.test, *.storage.example.test, 127.0.0.1:7070")
    allowed = [
        "https://s3.example.test",
        "https://S3.Example.Test:443/",
        "https://eu.storage.example.test",
        "http://127.0.0.1:7070",
    ]
    refused = [
        "https://s3.example.test:8443",  # another port of an allowed host
        "https://storage.example.test",  # the wildcard's own domain is not one of its hosts
        "https://kubernetes.default.svc",
        "http://127.0.0.1:7071",
        "http://169.254.169.254",
    ]
    assert [validation.endpoint_problem(e) for e in allowed] == [None] * len(allowed)
    for endpoint in refused:
        assert validation.endpoint_problem(endpoint) == (
            f"{endpoint!r} is not an S3 endpoint this operator may use (its administrator allows: "
            "s3.example.test, *.storage.example.test, 127.0.0.1:7070)"
        )
    # At run time too: the handler runs the same spec checks before anything else.
    spec = with_value(VALID_SPEC, "storage.s3.endpoint", "http://169.254.169.254")
    assert [p.split(":", 1)[0] for p in validation.spec_problems(parse_backup_spec(spec))] == [
        "spec.storage.s3.endpoint"
    ]
    monkeypatch.delenv(validation.ENDPOINTS_ENV)
    assert validation.endpoint_problem("http://169.254.169.254") is None
