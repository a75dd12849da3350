"""Certificates for the local control plane, made with openssl.

One CA signs everything: the API server's serving certificate, the admin client (system:masters), the API
server's client certificate towards the node, the node's serving certificate, and the serving
certificate of an operator's admission webhook on 127.0.0.1. Tests never verify
anything against a public root, so a single throwaway CA keeps the wiring easy to follow.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

API_SERVER_NAMES = [
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _san(names: list[str]) -> str:
    return ",".join(f"IP:{n}" if n[0].isdigit() else f"DNS:{n}" for n in names)


def _issue(pki: Path, name: str, subject: str, names: list[str] | None, usage: str) -> None:
    if (pki / f"{name}.crt").exists():
        return
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    ext = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE"]
    if names:
        ext.append(f"subjectAltName={_san(names)}")
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=pki,
    )


def ensure_pki(pki: Path) -> None:
    """Create whatever is missing; existing material is kept so a warm restart changes nothing."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=idm-testbed-ca",
            cwd=pki,
        )
    _issue(pki, "apiserver", "/CN=kube-apiserver", API_SERVER_NAMES, "serverAuth")
    _issue(pki, "admin", "/O=system:masters/CN=testbed-admin", None, "clientAuth")
    _issue(
        pki,
        "apiserver-kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        None,
        "clientAuth",
    )
    _issue(pki, "kubelet", "/CN=system:node:testbed-node", ["127.0.0.1", "localhost"], "serverAuth")
    # An operator run on the host serves its admission webhook on loopback; the API server calls it there.
    _issue(pki, "webhook", "/CN=idm-backup-operator-webhook", ["127.0.0.1"], "serverAuth")
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def webhook_cert_dir(pki: Path, dest: Path) -> Path:
    """dest, holding the webhook's serving certificate as the operator's --webhook-cert-dir wants it."""
    ensure_pki(pki)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki / "webhook.crt", dest / "tls.crt")
    shutil.copy(pki / "webhook.key", dest / "tls.key")
    return dest
