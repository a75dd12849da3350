"""The admission webhook's certificate when the operator makes it itself (the chart's `operator` mode).

The chart renders no key material, so every render is the same and GitOps tools see no drift. It renders
a Secret that says what to make (`certificate.json`: the Service's DNS names, the Secret, the
ValidatingWebhookConfiguration) and the configuration without a `caBundle`. At start-up the operator:

1. reads the Secret; if it already holds a CA and a serving certificate for those names, valid for a
   while yet, it uses them: restarts and replicas keep the same CA, and the API server never sees an
   unknown one. Otherwise it makes what is missing (a serving certificate from the same CA when only the
   names changed or it is due) and writes it back, with the Secret's resourceVersion: when two replicas
   start at once, one write wins and the other takes what the first wrote;
2. serves the webhook with that certificate, from files in a private directory of its own;
3. fills in the `caBundle` of every webhook of its configuration, and only of that one.

It does this again every minute, so a configuration re-applied without the `caBundle`, a Secret emptied by
a sync, another replica's renewal or a chart upgrade that changed the names are taken care of.

A renewed CA is published next to the old one until the old one expires, so replicas still serving a
certificate of the old CA stay trusted. The keys this module writes are the operator's; the chart owns the
others (`certificate.json`, `client-ca.crt`, and the empty `tls.crt` and `tls.key` the Secret's type
requires), and the two never write the same field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client

log = logging.getLogger(__name__)

# What the chart renders into the Secret: what to make, for whom, and where to publish it.
PLAN_KEY = "certificate.json"
# What the operator writes into the same Secret. ca.crt may hold more than one CA (a renewal's old one).
CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"
SERVING_CERT_KEY = "serving.crt"
SERVING_KEY_KEY = "serving.key"
# A certificate is renewed when less than this part of its lifetime is left.
RENEW_WHEN_LEFT = 1 / 3
# The CA lives validityDays; the serving certificate at most a year of that, renewed from the same CA (which
# changes nothing for the API server) long before the CA's turn comes.
SERVING_AT_MOST = datetime.timedelta(days=365)
# Clocks differ: a certificate is valid from a little before it was made.
BACKDATE = datetime.timedelta(hours=1)
CA_NAME = "idm-backup-operator webhook CA"
SERVING_NAME = "idm-backup-operator webhook"
Need = Literal["nothing", "serving", "ca"]
# Writes that lost to another replica's are retried with what it wrote, this many times.
WRITE_ATTEMPTS = 5


class CertificateUnavailable(Exception):
    """The operator cannot get or keep its webhook certificate (the Secret is missing or unreadable)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the chart asks for: a certificate for these names, kept in this Secret, trusted through this
    ValidatingWebhookConfiguration's caBundle."""

    namespace: str
    secret: str
    configuration: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    validity: datetime.timedelta

    @classmethod
    def parse(cls, raw: bytes | str) -> Plan:
        try:
            given = json.loads(raw)
            plan = cls(
                namespace=str(given["namespace"]),
                secret=str(given["secret"]),
                configuration=str(given["configuration"]),
                dns_names=tuple(str(n) for n in given.get("dnsNames") or ()),
                ip_addresses=tuple(str(ipaddress.ip_address(a)) for a in given.get("ipAddresses") or ()),
                validity=datetime.timedelta(days=int(given["validityDays"])),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{PLAN_KEY}: not a webhook certificate plan ({err})") from None
        if not (plan.dns_names or plan.ip_addresses) or plan.validity <= datetime.timedelta(0):
            raise ValueError(f"{PLAN_KEY}: no names to make a certificate for, or no validity")
        return plan

    @classmethod
    def load(cls, cert_dir: Path) -> Plan | None:
        """The plan the chart put into the mounted Secret; None in the other modes, which bring the files."""
        path = cert_dir / PLAN_KEY
        return cls.parse(path.read_bytes()) if path.is_file() else None

    def sans(self) -> set[x509.GeneralName]:
        names: set[x509.GeneralName] = {x509.DNSName(n) for n in self.dns_names}
        names |= {x509.IPAddress(ipaddress.ip_address(a)) for a in self.ip_addresses}
        return names

    def where(self) -> str:
        return f"Secret {self.namespace}/{self.secret}"


@dataclasses.dataclass(frozen=True)
class Material:
    """PEM: the CAs the API server is to trust (the current one first), its key, the serving pair. The keys
    stay out of its repr, so that no log line or traceback shows them."""

    ca_bundle: bytes
    ca_key: bytes = dataclasses.field(repr=False)
    cert: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_secret(cls, data: dict[str, str] | None) -> Material | None:
        data = data or {}
        try:
            parts = [
                base64.b64decode(data[k])
                for k in (CA_CERT_KEY, CA_KEY_KEY, SERVING_CERT_KEY, SERVING_KEY_KEY)
            ]
        except (KeyError, binascii.Error):
            return None
        return cls(*parts) if all(parts) else None

    def secret_data(self) -> dict[str, str]:
        pairs = zip(
            (CA_CERT_KEY, CA_KEY_KEY, SERVING_CERT_KEY, SERVING_KEY_KEY),
            (self.ca_bundle, self.ca_key, self.cert, self.key),
            strict=True,
        )
        return {k: base64.b64encode(v).decode() for k, v in pairs}

    def ca_bundle_b64(self) -> str:
        return base64.b64encode(self.ca_bundle).decode()


# -- the certificates themselves: pure functions of the plan, the time and what there is -----------------


@dataclasses.dataclass(frozen=True)
class _Parsed:
    cas: list[x509.Certificate]
    ca_key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def of(cls, material: Material | None) -> _Parsed | None:
        """The material's certificates and keys; None if any of it is not what this module writes."""
        if material is None:
            return None
        try:
            cas = x509.load_pem_x509_certificates(material.ca_bundle)
            ca_key = serialization.load_pem_private_key(material.ca_key, password=None)
            cert = x509.load_pem_x509_certificate(material.cert)
            key = serialization.load_pem_private_key(material.key, password=None)
        except (ValueError, TypeError):
            return None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(
            key, ec.EllipticCurvePrivateKey
        ):
            return None
        return cls(cas, ca_key, cert, key)

    @property
    def ca(self) -> x509.Certificate:
        return self.cas[0]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _due(cert: x509.Certificate, now: datetime.datetime) -> bool:
    """Expired, not yet valid, or with less than RENEW_WHEN_LEFT of its lifetime left."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return not start <= now < end - (end - start) * RENEW_WHEN_LEFT


def _holds_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return bool(cert.public_key() == key.public_key())


def _issue_ca(plan: Plan, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + plan.validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_serving(
    plan: Plan, now: datetime.datetime, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    ca_key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVING_NAME)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        # Never beyond its CA: the chain would not verify.
        .not_valid_after(min(now + min(plan.validity, SERVING_AT_MOST), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sorted(plan.sans(), key=str)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _names(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def assess(material: Material | None, plan: Plan, now: datetime.datetime) -> Need:
    """What `material` needs for `plan` at `now`: "nothing", "serving" (a new serving certificate from the
    same CA: the names changed, or it is due) or "ca" (a new CA, and a serving certificate from it)."""
    parsed = _Parsed.of(material)
    if parsed is None or not _holds_key(parsed.ca, parsed.ca_key) or _due(parsed.ca, now):
        return "ca"
    cert = parsed.cert
    if (
        not _signed_by(cert, parsed.ca)
        or not _holds_key(cert, parsed.key)
        or _names(cert) != plan.sans()
        or _due(cert, now)
    ):
        return "serving"
    return "nothing"


def provide(material: Material | None, plan: Plan, now: datetime.datetime) -> tuple[Material, Need]:
    """Material that needs nothing for `plan` at `now`, and what was done to `material` to get it."""
    need = assess(material, plan, now)
    parsed = _Parsed.of(material)
    if need == "nothing" and material is not None:
        return material, need
    if need == "serving" and parsed is not None:
        cert, key = _issue_serving(plan, now, parsed.ca, parsed.ca_key)
        bundle = _bundle(parsed.ca, parsed.cas[1:], now)
        return Material(bundle, _pem_key(parsed.ca_key), _pem(cert), _pem_key(key)), need
    ca, ca_key = _issue_ca(plan, now)
    cert, key = _issue_serving(plan, now, ca, ca_key)
    # The previous CAs stay trusted until they expire, if they were ours (the key matches the first):
    # replicas may still serve a certificate one of them signed.
    ours = parsed is not None and _holds_key(parsed.ca, parsed.ca_key)
    bundle = _bundle(ca, parsed.cas if parsed is not None and ours else [], now)
    return Material(bundle, _pem_key(ca_key), _pem(cert), _pem_key(key)), "ca"


def _bundle(current: x509.Certificate, older: list[x509.Certificate], now: datetime.datetime) -> bytes:
    """The caBundle: the current CA first, then the older ones not yet expired."""
    return _pem(current) + b"".join(_pem(old) for old in older if old.not_valid_after_utc > now)


# -- the Secret, the files kopf serves, the configuration -----------------------------------------------


class CertificateKeeper:
    """Keeps the webhook's certificate in the Secret, in the served files and in the configuration."""

    def __init__(
        self,
        core: client.CoreV1Api,
        admission: client.AdmissionregistrationV1Api,
        plan: Plan,
        directory: Path | None = None,
    ) -> None:
        self.core, self.admission, self.plan = core, admission, plan
        # Private: the serving key is written here. The pod's /tmp is an emptyDir.
        self.directory = directory or Path(tempfile.mkdtemp(prefix="idm-backup-webhook-"))
        self.material: Material | None = None

    @property
    def served(self) -> Path:
        """The key and the certificate in one file: kopf's certfile and pkeyfile both (ssl takes each
        from it), so that a renewal, one rename, never shows kopf the new key with the old certificate."""
        return self.directory / "serving.pem"

    def reconcile(self, now: datetime.datetime | None = None) -> None:
        """Take or make the certificate, serve it, and publish its CA. Raises CertificateUnavailable when
        there is no certificate to serve; a configuration that cannot be patched is only logged."""
        self.material = self._stored(now)
        self._write_files(self.material)
        self._publish(self.material)

    def _stored(self, now: datetime.datetime | None) -> Material:
        for _ in range(WRITE_ATTEMPTS):
            secret = self._read_secret()
            data: dict[str, str] = dict(secret.data or {})
            if PLAN_KEY in data:
                # A chart upgrade may have changed the names: the Secret says what is wanted now.
                try:
                    self.plan = Plan.parse(base64.b64decode(data[PLAN_KEY]))
                except (ValueError, binascii.Error) as err:
                    log.warning("%s: %s; keeping the names asked for before", self.plan.where(), err)
            stored = Material.from_secret(data)
            # Emptied by someone (a sync that replaced the Secret): what this process serves, if it still
            # fits, goes back rather than a new CA the API server does not know yet.
            candidate = stored
            if assess(stored, self.plan, _now(now)) == "ca" and self.material is not None:
                candidate = self.material
            material, done = provide(candidate, self.plan, _now(now))
            if material == stored:
                if self.material is None:
                    log.info("webhook certificate: using the CA and certificate in %s", self.plan.where())
                return material
            secret.data = {**data, **material.secret_data()}
            try:
                self.core.replace_namespaced_secret(self.plan.secret, self.plan.namespace, secret)
            except client.ApiException as err:
                if err.status == 409:  # another replica wrote first: take what it wrote
                    continue
                where = self.plan.where()
                raise CertificateUnavailable(
                    f"cannot write the webhook certificate into {where}: {err.status} {err.reason}"
                ) from None
            what = {
                "ca": "made a new CA and serving certificate",
                "serving": "made a new serving certificate from the same CA",
                "nothing": "wrote the certificate it serves back",
            }[done]
            names = ", ".join((*self.plan.dns_names, *self.plan.ip_addresses))
            log.info("webhook certificate: %s for %s into %s", what, names, self.plan.where())
            return material
        raise CertificateUnavailable(f"{self.plan.where()} keeps changing: gave up writing the certificate")

    def _read_secret(self) -> Any:
        try:
            return self.core.read_namespaced_secret(self.plan.secret, self.plan.namespace)
        except client.ApiException as err:
            hint = {
                404: " (the chart creates it with the release)",
                403: " (RBAC: get and update on this Secret, by name)",
            }.get(err.status, "")
            raise CertificateUnavailable(
                f"cannot read the webhook certificate's {self.plan.where()}: {err.status} {err.reason}{hint}"
            ) from None

    def _write_files(self, material: Material) -> None:
        content = material.key + material.cert
        if self.served.is_file() and self.served.read_bytes() == content:
            return
        fd, temporary = tempfile.mkstemp(dir=self.directory)  # readable by this user only
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        os.replace(temporary, self.served)

    def _publish(self, material: Material) -> None:
        """The configuration's caBundle, in every webhook: a JSON patch that applies only to the version
        read (resourceVersion), and names nothing else."""
        bundle = material.ca_bundle_b64()
        name = self.plan.configuration
        try:
            configuration = self.admission.read_validating_webhook_configuration(name)
            patch: list[dict[str, Any]] = [
                {
                    "op": "test",
                    "path": "/metadata/resourceVersion",
                    "value": configuration.metadata.resource_version,
                }
            ]
            for i, webhook in enumerate(configuration.webhooks or []):
                if webhook.client_config.ca_bundle != bundle:
                    patch.append(
                        {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
                    )
            if len(patch) > 1:
                self.admission.patch_validating_webhook_configuration(name, patch)
                log.info(
                    "webhook certificate: the CA is now the caBundle of ValidatingWebhookConfiguration %s",
                    name,
                )
        except client.ApiException as err:
            # The webhook is served; the next round tries again (a configuration applied after the operator
            # started, a conflicting write).
            hint = {
                404: " (not there yet?)",
                403: " (RBAC: get and patch on this configuration, by name)",
            }.get(err.status, "")
            log.warning(
                "cannot put the webhook CA into ValidatingWebhookConfiguration %s: %s %s%s",
                name,
                err.status,
                err.reason,
                hint,
            )


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now or datetime.datetime.now(datetime.UTC)
