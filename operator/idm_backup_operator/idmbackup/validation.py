"""What the CRD schema cannot check, checked when an object is applied (the admission webhook).

The schema and its CEL rules already refuse malformed fields and the option combinations ipa-backup
refuses. What is left needs code or the cluster: cron expressions and time zones, paths that must stay
inside their store, combinations CEL would spell badly, and the objects a spec refers to (Secrets, the
public keys in them, the PVC mounted in the operator, the target pod).

Every problem is one line naming the field, worded as the operator words the same failure at run time,
because the checks reuse the functions the backup itself runs.

References weigh differently by who creates the object. A person's IdmBackup with a missing Secret would
fail seconds later, so it is refused. A schedule only gets warnings: the Secret may be created after the
schedule (GitOps applies in any order). A backup a schedule creates is not checked against them at all:
refused at 3 a.m., it would leave no Failed backup behind to alert on, and warnings would only reach the
operator itself, for ~23 ms of CPU each (benchmarks/webhook.md).

Whoever sets the references must be allowed to read the Secrets they name: the operator reads every
Secret of a namespace, so without this check anyone who may create an IdmBackup could have it use (and
send, e.g. as an LDAP bind password) a Secret they may not read themselves. That check is never relaxed
to a warning, and a Secret the requester may not read is not looked up for them either: whether it exists,
and what is in it, is none of their business.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

from idm_backup_operator.api.spec import (
    BackupSpec,
    LdapTarget,
    PvcStorage,
    S3Storage,
    Target,
    parse_backup_spec,
)
from idm_backup_operator.archive.encryption import KeyMaterialError
from idm_backup_operator.kube import references

# Re-exported: the webhook builds the scope and the requester for the checks here.
from idm_backup_operator.kube.access import ReferenceScope as ReferenceScope
from idm_backup_operator.kube.access import Requester as Requester
from idm_backup_operator.kube.access import may_get_secret
from idm_backup_operator.kube.errors import ApiError
from idm_backup_operator.storage import StorageError
from idm_backup_operator.storage.base import check_key


@dataclasses.dataclass
class Findings:
    """Problems that refuse the object, and warnings kubectl prints without refusing it."""

    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def extend(self, other: Findings) -> None:
        self.errors.extend(other.errors)
        self.warnings.extend(other.warnings)


# What to do with problems of the objects a spec refers to: see the module's docstring.
References = Literal["refuse", "warn", "skip"]


# -- the spec alone -----------------------------------------------------------------------------------

# The CRDs hold the same rules (tests keep them equal); they are repeated here for CRDs installed before
# them, and because a malformed name sent to the API server can read another object instead of failing:
# pods/.. is the namespace, secrets/ the list of Secrets.
MAX_DEADLINE_SECONDS = 7 * 24 * 3600
OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"[0-9]+(\.[0-9]+){3}")
# Plain ldap:// sends the bind password (the Directory Manager's) unencrypted: only to the operator's own
# loopback, which it never leaves. The whole URL is matched, not its parsed host: libldap takes a list of
# URLs separated by spaces or commas, and "ldap://127.0.0.1,ldap://elsewhere" would fall back to the
# second. The CRD's CEL rule on target.ldap uses the same expression (tests keep them equal).
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
LOOPBACK_LDAP_URL = re.compile(rf"ldap://(127(\.{_OCTET}){{3}}|localhost|\[::1\])(:[0-9]{{1,5}})?/?")
# What libldap splits a list of URLs at: "ldaps://ipa ldap://elsewhere" would start with ldaps:// and
# still fall back to plain LDAP. The CRD refuses the same characters.
LDAP_URL_SEPARATOR = re.compile(r"[ \t\n\r\f\v,]")
# Label keys and values as Kubernetes spells them. The selector is sent to the API server as one string
# in which "," and "=" separate terms: a value holding them would add terms of its own.
LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
# Without an endpoint, botocore puts the region in AWS's host name.
REGION = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
# Which S3 endpoints specs may name (comma-separated host names or IPv4 addresses, with ":port" for a port
# other than the scheme's own, "*.example.com" for a domain's hosts); unset, any. Every endpoint is a
# connection the operator makes from inside the cluster on a tenant's behalf: an administrator can keep
# those to the storage the cluster really uses.
ENDPOINTS_ENV = "IDM_BACKUP_S3_ALLOWED_ENDPOINTS"


def allowed_endpoints() -> tuple[str, ...]:
    return tuple(e.strip().lower() for e in os.environ.get(ENDPOINTS_ENV, "").split(",") if e.strip())


def endpoint_allowed(endpoint: str, allowed: tuple[str, ...]) -> bool:
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    default_port = 443 if parts.scheme.lower() == "https" else 80
    port = parts.port or default_port
    for entry in allowed:
        # An entry without a port allows the scheme's own port only: another port of the same host is
        # another service.
        entry_host, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if port != (int(entry_port) if entry_port.isdigit() else default_port):
            continue
        if entry_host == host or (entry_host.startswith("*.") and host.endswith(entry_host[1:])):
            return True
    return False


def object_name_problem(name: str) -> str | None:
    """Why `name` cannot name a pod, Secret or PVC (a DNS-1123 subdomain); None if it can."""
    if not name:
        return "the name is empty"
    if len(name) > 253 or not OBJECT_NAME.fullmatch(name):
        return (
            f"{name!r} is not an object name: at most 253 lowercase letters, digits, '-' and '.', "
            "beginning and ending with a letter or digit"
        )
    return None


def bucket_problem(bucket: str) -> str | None:
    """S3's bucket naming rules, as far as S3-compatible servers share them (not AWS's reserved names)."""
    if not _BUCKET.fullmatch(bucket):
        return (
            f"{bucket!r} is not an S3 bucket name: 3-63 lowercase letters, digits, dots and hyphens, "
            "beginning and ending with a letter or digit"
        )
    if ".." in bucket:
        return f"{bucket!r} is not an S3 bucket name: it has two adjacent dots"
    if _IP_ADDRESS.fullmatch(bucket):
        return f"{bucket!r} is not an S3 bucket name: it looks like an IP address"
    return None


def endpoint_problem(endpoint: str) -> str | None:
    """Whether the S3 client will take the endpoint; its own refusal is an unexplained "Invalid endpoint"."""
    parts = urlsplit(endpoint)
    if parts.scheme.lower() not in ("http", "https"):
        return f"{endpoint!r} is not an http:// or https:// URL"
    if any(char.isspace() for char in endpoint):
        return f"{endpoint!r} contains white space"
    if not parts.hostname:
        return f"{endpoint!r} has no host, e.g. https://s3.example.com"
    try:
        _ = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:
        return f"{endpoint!r} has an invalid port"
    if not (is_valid_endpoint_url(endpoint) or is_valid_ipv6_endpoint_url(endpoint)):
        return f"{endpoint!r} has an invalid host name {parts.hostname!r}"
    if (allowed := allowed_endpoints()) and not endpoint_allowed(endpoint, allowed):
        return (
            f"{endpoint!r} is not an S3 endpoint this operator may use (its administrator allows: "
            f"{', '.join(allowed)})"
        )
    return None


def selector_problems(match_labels: Mapping[str, str], expressions: Sequence[Mapping[str, Any]]) -> list[str]:
    problems = [
        f"matchLabels: {key!r}={value!r} is not a label key and value"
        for key, value in match_labels.items()
        if not (
            LABEL_KEY.fullmatch(key) and len(key) <= 317 and LABEL_VALUE.fullmatch(value) and len(value) <= 63
        )
    ]
    for index, expr in enumerate(expressions):
        values = [str(v) for v in expr.get("values") or ()]
        key = str(expr.get("key", ""))
        bad = [v for v in values if not (LABEL_VALUE.fullmatch(v) and len(v) <= 63)]
        if not LABEL_KEY.fullmatch(key) or len(key) > 317 or bad:
            problems.append(f"matchExpressions[{index}]: {key!r} {values!r} are not a label key and values")
    return problems


def ldap_url_problems(ldap: LdapTarget) -> list[str]:
    """Why the bind password could cross the network unencrypted: empty if it cannot."""
    problems = []
    if LDAP_URL_SEPARATOR.search(ldap.url):
        problems.append(
            f"{ldap.url!r} is not one URL: libldap takes spaces and commas to separate a list of URLs, "
            "and tries each in turn"
        )
    elif not (ldap.url.startswith("ldaps://") or ldap.start_tls or LOOPBACK_LDAP_URL.fullmatch(ldap.url)):
        problems.append(
            f"{ldap.url!r} would send the bind password unencrypted: use ldaps://, or ldap:// with "
            "startTLS: true (plain ldap:// is allowed only to 127.0.0.0/8, localhost or [::1])"
        )
    return problems


# -- the parts of a spec an IdmRestore shares: its target, and its storage ------------------------------
#
# Each takes `at`, the field of the part itself (spec.target, spec.storage, or where a restore has them),
# so that a restore's problems are worded exactly as a backup's.

# One reference to check: its field, the name it looks up (None where not set), whether that name is a
# Secret's, and the lookup itself.
Check = tuple[str, str | None, bool, Callable[[], object]]


def target_names(target: Target, at: str) -> list[tuple[str, str | None]]:
    """The names of the objects a target refers to, under their fields; None where a field is not set."""
    ldap = target.ldap
    return [
        (f"{at}.podName", target.pod_name),
        (f"{at}.ldap.passwordSecretRef.name", ldap.password.name),
        (f"{at}.ldap.caSecretRef.name", None if ldap.ca is None else ldap.ca.name),
    ]


def storage_names(storage: S3Storage | PvcStorage, at: str) -> list[tuple[str, str | None]]:
    if isinstance(storage, PvcStorage):
        return [(f"{at}.pvc.claimName", storage.claim_name)]
    return [
        (f"{at}.s3.credentialsSecretRef.name", storage.credentials_secret),
        (f"{at}.s3.caSecretRef.name", None if storage.ca is None else storage.ca.name),
    ]


def name_problems(names: Sequence[tuple[str, str | None]]) -> list[str]:
    return [
        f"{field}: {problem}"
        for field, name in names
        if name is not None and (problem := object_name_problem(name))
    ]


def target_problems(target: Target, at: str) -> list[str]:
    """A target's problems of its own, names aside (see target_names)."""
    problems = []
    ldap = target.ldap
    if ldap.start_tls and ldap.url.lower().startswith("ldaps://"):
        problems.append(
            f"{at}.ldap.startTLS: an ldaps:// URL is already encrypted; use ldap:// with startTLS, "
            "or ldaps:// without it"
        )
    problems.extend(f"{at}.ldap.url: {problem}" for problem in ldap_url_problems(ldap))
    selector = target.pod_selector
    if selector is not None and not selector.match_labels and not selector.match_expressions:
        problems.append(f"{at}.podSelector: an empty selector matches every pod in the namespace")
    if selector is not None:
        problems.extend(
            f"{at}.podSelector.{problem}"
            for problem in selector_problems(selector.match_labels, selector.match_expressions)
        )
    return problems


def storage_problems(storage: S3Storage | PvcStorage, at: str) -> list[str]:
    """A storage's problems of its own, names aside (see storage_names)."""
    problems = []
    if isinstance(storage, PvcStorage):
        paths = [(f"{at}.pvc.subPath", storage.sub_path)]
    else:
        paths = [(f"{at}.s3.prefix", storage.prefix)]
        if problem := bucket_problem(storage.bucket):
            problems.append(f"{at}.s3.bucket: {problem}")
        if storage.endpoint is not None and (problem := endpoint_problem(storage.endpoint)):
            problems.append(f"{at}.s3.endpoint: {problem}")
        if not (REGION.fullmatch(storage.region) and len(storage.region) <= 63):
            problems.append(
                f"{at}.s3.region: {storage.region!r} is not a region name (letters, digits, '-', '_', '.')"
            )
        if storage.kms_key_id and storage.server_side_encryption != "aws:kms":
            problems.append(f"{at}.s3.kmsKeyID: only used with serverSideEncryption aws:kms")
    for field, value in paths:
        try:
            check_key(value, prefix=True)
        except StorageError as err:
            problems.append(f"{field}: {err}")
    return problems


def target_secret_refs(target: Target, at: str) -> list[tuple[str, str]]:
    """The Secrets a target's LDAP connection reads, under their fields."""
    ldap = target.ldap
    refs = [(f"{at}.ldap.passwordSecretRef", ldap.password.name)]
    if ldap.ca is not None:
        refs.append((f"{at}.ldap.caSecretRef", ldap.ca.name))
    return refs


def storage_secret_refs(storage: S3Storage | PvcStorage, at: str) -> list[tuple[str, str]]:
    """The Secrets a storage is opened with, under their fields (a PVC needs none)."""
    refs = []
    if not isinstance(storage, PvcStorage):
        if storage.credentials_secret is not None:
            refs.append((f"{at}.s3.credentialsSecretRef", storage.credentials_secret))
        if storage.ca is not None:
            refs.append((f"{at}.s3.caSecretRef", storage.ca.name))
    return refs


def access_problems(
    refs: Sequence[tuple[str, str]],
    where: ReferenceScope,
    requester: Requester,
    *,
    user: str = "backup",
) -> tuple[list[str], set[str]]:
    """Each Secret of `refs` the requester may not `get`, named under its field; and the names of those
    Secrets, which are then not looked up for them. When the API server cannot answer, the Secret counts
    as not readable: a check that did not run must not let a Secret through. `user` is what would use the
    Secret on the requester's behalf: a backup, or a restore."""
    problems: list[str] = []
    withheld: set[str] = set()
    verdicts: dict[str, str | None] = {}  # one review per Secret, however many fields name it
    for field, name in refs:
        # A malformed name is already a problem of the spec; asking about it would answer about another.
        if object_name_problem(name) is not None:
            continue
        if name not in verdicts:
            try:
                allowed = may_get_secret(where, requester, name)
            except ApiError as err:
                verdicts[name] = (
                    f"could not check whether {requester.username} may read Secret {where.namespace}/{name} "
                    f"({err.status} {err.reason})"
                )
            else:
                verdicts[name] = (
                    None
                    if allowed
                    else f"{requester.username} may not read Secret {where.namespace}/{name}, so no {user} "
                    "they create may use it (RBAC: get on secrets)"
                )
        if (verdict := verdicts[name]) is not None:
            problems.append(f"{field}: {verdict}")
            withheld.add(name)
    return problems, withheld


def target_checks(target: Target, at: str, where: ReferenceScope) -> list[Check]:
    """The target pod (exists, one, ready, has the container) and its LDAP Secrets with their keys."""
    core, namespace = where.core, where.namespace
    ldap = target.ldap
    checks: list[Check] = [
        (at, target.pod_name, False, lambda: references.find_target_pod(core, namespace, target)),
        (
            f"{at}.ldap.passwordSecretRef",
            ldap.password.name,
            True,
            lambda: references.read_secret_key(core, namespace, ldap.password),
        ),
    ]
    if (ca := ldap.ca) is not None:
        checks.append(
            (f"{at}.ldap.caSecretRef", ca.name, True, lambda: references.read_secret_key(core, namespace, ca))
        )
    return checks


def storage_checks(storage: S3Storage | PvcStorage, at: str, where: ReferenceScope) -> list[Check]:
    """The PVC mounted in the operator, or the S3 credentials (or the operator's own, if allowed) and CA."""
    core, namespace = where.core, where.namespace
    if isinstance(storage, PvcStorage):
        return [
            (
                f"{at}.pvc.claimName",
                storage.claim_name,
                False,
                lambda: references.pvc_mount(storage, where.pvc_root, namespace),
            )
        ]
    checks: list[Check] = [
        (
            f"{at}.s3.credentialsSecretRef",
            storage.credentials_secret,
            True,
            lambda: references.s3_credentials(core, namespace, storage, ambient=where.ambient_s3_credentials),
        )
    ]
    if (s3_ca := storage.ca) is not None:
        checks.append(
            (
                f"{at}.s3.caSecretRef",
                s3_ca.name,
                True,
                lambda: references.read_secret_key(core, namespace, s3_ca),
            )
        )
    return checks


def check_problems(checks: Sequence[Check], withheld: set[str]) -> list[str]:
    """Each check run, but not on a malformed name (already a problem of the spec, and the lookup would
    read something else) nor on a Secret withheld from the requester."""
    problems = []
    for field, name, secret, check in checks:
        if name is not None and (object_name_problem(name) or (secret and name in withheld)):
            continue
        try:
            check()
        except (references.ResolveError, KeyMaterialError) as err:
            problems.append(f"{field}: {err}")
        except ApiError as err:
            problems.append(f"{field}: could not be checked ({err.status} {err.reason})")
    return problems


# -- an IdmBackup's spec ----------------------------------------------------------------------------------


def spec_problems(spec: BackupSpec, at: str = "spec") -> list[str]:
    """Also run when a backup starts: without the webhook, this is the earliest point left."""
    problems = name_problems(
        [
            *target_names(spec.target, f"{at}.target"),
            (f"{at}.encryption.publicKeysSecretRef.name", spec.encryption.public_keys_secret),
            *storage_names(spec.storage, f"{at}.storage"),
        ]
    )
    if spec.deadline_seconds > MAX_DEADLINE_SECONDS:
        problems.append(
            f"{at}.activeDeadlineSeconds: {spec.deadline_seconds} is more than the maximum, "
            f"{MAX_DEADLINE_SECONDS} (7 days)"
        )
    problems.extend(target_problems(spec.target, f"{at}.target"))
    if not spec.encryption.enabled and spec.encryption.recipients:
        problems.append(
            f"{at}.encryption.recipients: set, but encryption.mode is None (nothing is encrypted)"
        )
    problems.extend(storage_problems(spec.storage, f"{at}.storage"))
    return problems


def _secret_refs(spec: BackupSpec, at: str) -> list[tuple[str, str]]:
    """The Secrets a backup of this spec reads, under their fields: those its requester must be able to
    read. A public-keys Secret with encryption off is never read, so it needs no permission."""
    refs = target_secret_refs(spec.target, f"{at}.target")
    if spec.encryption.enabled and spec.encryption.public_keys_secret is not None:
        refs.append((f"{at}.encryption.publicKeysSecretRef", spec.encryption.public_keys_secret))
    refs.extend(storage_secret_refs(spec.storage, f"{at}.storage"))
    return refs


def secret_access_problems(
    spec: BackupSpec, at: str, where: ReferenceScope, requester: Requester
) -> tuple[list[str], set[str]]:
    """Each Secret of the spec the requester may not `get` (see access_problems)."""
    return access_problems(_secret_refs(spec, at), where, requester)


def _reference_problems(spec: BackupSpec, at: str, where: ReferenceScope, withheld: set[str]) -> list[str]:
    checks = target_checks(spec.target, f"{at}.target", where)
    if spec.encryption.enabled:
        checks.append(
            (
                f"{at}.encryption",
                spec.encryption.public_keys_secret,
                True,
                lambda: references.load_public_keys(where.core, where.namespace, spec.encryption),
            )
        )
    checks.extend(storage_checks(spec.storage, f"{at}.storage", where))
    return check_problems(checks, withheld)


def backup_findings(
    raw: Mapping[str, Any],
    where: ReferenceScope,
    *,
    at: str = "spec",
    references: References = "refuse",
    requester: Requester | None = None,
) -> Findings:
    """The problems of an IdmBackup spec (or a schedule's template, at="spec.template.spec").

    With a requester, every Secret the spec names must be readable by them (refused otherwise, whatever
    `references` says); without one (the operator's own requests), that is not asked."""
    try:
        spec = parse_backup_spec(raw)
    except ValueError as err:
        return Findings(errors=[f"{at}: {err}"])
    findings = Findings(errors=spec_problems(spec, at))
    withheld: set[str] = set()
    if requester is not None:
        denied, withheld = secret_access_problems(spec, at, where, requester)
        findings.errors.extend(denied)
    if references == "skip":
        return findings
    problems = _reference_problems(spec, at, where, withheld)
    if references == "refuse":
        findings.errors.extend(problems)
    else:
        findings.warnings.extend(
            f"{problem} (the backup will fail until this is fixed)" for problem in problems
        )
    return findings


def refusal(kind: str, name: str, findings: Findings) -> str:
    """One message for everything wrong, so a single kubectl apply shows all there is to fix."""
    count = len(findings.errors)
    problems = "; ".join(findings.errors)
    return f"{kind} {name} refused ({count} problem{'s' if count > 1 else ''}): {problems}"
