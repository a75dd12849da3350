"""The local platform as one unit: a real Kubernetes control plane, the test node, S3 and LDAP.

Everything listens on 127.0.0.1 only. `up()` is idempotent and reuses whatever already runs, so a warm
start is quick and the test suite can share a platform a developer started by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3

from testbed import pki, processes
from testbed.ldap_server import DirectoryServer

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "testbed" / "build.sh"
IMAGES = REPO / "testbed" / "images"

API_PORT = 6443
ETCD_PORT = 2379
NODE_PORT = 10250
S3_PORT = 7070
LDAP_PORT = 3389
NODE_NAME = "testbed-node"
S3_ACCESS_KEY = "testbed-access-key"
S3_SECRET_KEY = "testbed-secret-key-0123456789"
S3_BUCKET = "idm-backups"
# Addresses the API server assigns to Services. Nothing ever connects to them: tests reach every service
# on 127.0.0.1.
SERVICE_CIDR = "10.96.0.0/16"

STOP_ORDER = ["fakenode", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "versitygw"]


@dataclass(frozen=True)
class Platform:
    """What a test or the demo needs to talk to the platform."""

    state_dir: str
    kubeconfig: str
    api_server: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    ldap_uri: str
    ldap_bind_dn: str
    ldap_password: str
    ldap_suffix: str
    volumes_dir: str

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig}


def state_dir() -> Path:
    return Path(os.environ.get("IDM_TESTBED_DIR", REPO / ".testbed"))


def versions() -> dict[str, str]:
    """testbed/versions.env: the pinned versions of what build.sh builds."""
    lines = (REPO / "testbed" / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def build(target: str) -> Path:
    """Run build.sh for a target (a no-op once cached); the cache's bin directory."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT), target], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def helm_binary() -> Path:
    """helm, built from the Go module proxy; not part of the platform, only the chart's tools use it."""
    path = build("helm") / f"helm-{versions()['HELM_VERSION']}" / "helm"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _own(bin_dir: Path, name: str) -> Path:
    # This repository's own Go programs are keyed by a hash of their sources: build.sh names the current
    # build's directory in <cache>/<name>.path.
    return Path((bin_dir.parent / f"{name}.path").read_text().strip()) / name


def own_binary(name: str) -> Path:
    """testbed/<name> (fakenode, argocd-lua), built if its sources changed."""
    return _own(build(name), name)


def binaries() -> dict[str, Path]:
    """Build (or find in the cache) every Go binary and say where each one is."""
    bin_dir = build("all")
    pinned = versions()
    k8s = bin_dir / f"kubernetes-{pinned['K8S_VERSION']}"
    return {
        "kube-apiserver": k8s / "kube-apiserver",
        "kube-controller-manager": k8s / "kube-controller-manager",
        "kube-scheduler": k8s / "kube-scheduler",
        "kubectl": k8s / "kubectl",
        "etcd": bin_dir / f"etcd-{pinned['ETCD_VERSION']}" / "etcd",
        "versitygw": bin_dir / f"versitygw-{pinned['VERSITYGW_VERSION']}" / "versitygw",
        "fakenode": _own(bin_dir, "fakenode"),
    }


def _write_kubeconfig(path: Path, pki_dir: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "testbed",
                "clusters": [
                    {
                        "name": "testbed",
                        "cluster": {
                            "server": f"https://127.0.0.1:{API_PORT}",
                            "certificate-authority": str(pki_dir / "ca.crt"),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "admin",
                        "user": {
                            "client-certificate": str(pki_dir / "admin.crt"),
                            "client-key": str(pki_dir / "admin.key"),
                        },
                    }
                ],
                "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "admin"}}],
            },
            indent=2,
        )
    )


def _api_ready(pki_dir: Path, path: str = "/readyz") -> bool:
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{API_PORT}{path}", context=ctx, timeout=2) as resp:
        return bool(resp.status == 200)


def _etcd_dir() -> Path:
    # etcd on /dev/shm with fsync off: a test cluster loses nothing that matters on power loss, and
    # disk syncs would dominate start-up and every write.
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else state_dir()
    return base / f"idm-testbed-etcd-{hashlib.sha256(str(state_dir()).encode()).hexdigest()[:12]}"


def _start_control_plane(bins: dict[str, Path], run: Path, pki_dir: Path, kubeconfig: Path) -> None:
    p = pki_dir
    processes.start(
        run,
        "etcd",
        [
            str(bins["etcd"]),
            "--data-dir",
            str(_etcd_dir()),
            "--unsafe-no-fsync",
            "--listen-client-urls",
            f"http://127.0.0.1:{ETCD_PORT}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{ETCD_PORT}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{ETCD_PORT + 1}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{ETCD_PORT + 1}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{ETCD_PORT + 1}",
            "--log-level",
            "warn",
        ],
    )
    processes.start(
        run,
        "kube-apiserver",
        [
            str(bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={API_PORT}",
            f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={p / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--enable-priority-and-fairness=false",
            "--v=1",
        ],
    )
    processes.wait_until("kube-apiserver", lambda: _api_ready(pki_dir), 90, run / "kube-apiserver.log")
    processes.start(
        run,
        "kube-controller-manager",
        [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10257",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p / 'sa.key'}",
            f"--root-ca-file={p / 'ca.crt'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}",
            f"--cluster-signing-key-file={p / 'ca.key'}",
            "--controllers=*",
            "--v=1",
        ],
    )
    processes.start(
        run,
        "kube-scheduler",
        [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            "--v=1",
        ],
    )


def _kubectl(bins: dict[str, Path], kubeconfig: Path, *args: str) -> str:
    return subprocess.run(
        [str(bins["kubectl"]), f"--kubeconfig={kubeconfig}", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _start_node(bins: dict[str, Path], run: Path, pki_dir: Path, kubeconfig: Path, volumes: Path) -> None:
    processes.start(
        run,
        "fakenode",
        [
            str(bins["fakenode"]),
            f"--kubeconfig={kubeconfig}",
            f"--node-name={NODE_NAME}",
            "--address=127.0.0.1",
            f"--port={NODE_PORT}",
            f"--state-dir={volumes.parent}",
            f"--tls-cert-file={pki_dir / 'kubelet.crt'}",
            f"--tls-private-key-file={pki_dir / 'kubelet.key'}",
            f"--client-ca-file={pki_dir / 'ca.crt'}",
            f"--image-root={IMAGES}",
        ],
    )

    def node_ready() -> bool:
        out = _kubectl(
            bins,
            kubeconfig,
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        )
        return out == "True"

    processes.wait_until("test node", node_ready, 30, run / "fakenode.log")
    # Pods need the namespace's default ServiceAccount, which the controller-manager creates a moment
    # after start: waiting here keeps the first test from racing it.
    processes.wait_until(
        "default service account",
        lambda: bool(_kubectl(bins, kubeconfig, "get", "sa", "default", "-o", "name")),
        60,
        run / "kube-controller-manager.log",
    )


def _start_s3(bins: dict[str, Path], run: Path, data: Path) -> None:
    processes.start(
        run,
        "versitygw",
        [
            str(bins["versitygw"]),
            "--access",
            S3_ACCESS_KEY,
            "--secret",
            S3_SECRET_KEY,
            "--port",
            f"127.0.0.1:{S3_PORT}",
            "posix",
            str(data),
        ],
    )

    def s3_answers() -> bool:
        # An S3 error document means the server is up and refuses anonymous access.
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/", timeout=2)
        return True

    processes.wait_until("versitygw", s3_answers, 30, run / "versitygw.log")
    # Through the S3 API rather than mkdir: versitygw keeps a bucket's owner and ACL in extended attributes.
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{S3_PORT}",
        region_name="us-east-1",
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )
    if S3_BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=S3_BUCKET)


def up() -> Platform:
    base = state_dir()
    run, pki_dir = base / "run", base / "pki"
    volumes, s3_data = base / "node" / "volumes", base / "s3"
    for d in (run, volumes, s3_data):
        d.mkdir(parents=True, exist_ok=True)
    bins = binaries()
    if not (pki_dir / "ca.crt").exists():
        # A new state directory (a fresh clone where an old one was) must not meet the old cluster's
        # etcd data, which outlives it in /dev/shm and was written under another CA and signing key.
        shutil.rmtree(_etcd_dir(), ignore_errors=True)
    pki.ensure_pki(pki_dir)
    kubeconfig = base / "kubeconfig"
    _write_kubeconfig(kubeconfig, pki_dir)
    ldap = directory()
    ldap.start()
    ldap.load_topology()
    _start_s3(bins, run, s3_data)
    _start_control_plane(bins, run, pki_dir, kubeconfig)
    _start_node(bins, run, pki_dir, kubeconfig, volumes)
    platform = Platform(
        state_dir=str(base),
        kubeconfig=str(kubeconfig),
        api_server=f"https://127.0.0.1:{API_PORT}",
        s3_endpoint=f"http://127.0.0.1:{S3_PORT}",
        s3_access_key=S3_ACCESS_KEY,
        s3_secret_key=S3_SECRET_KEY,
        s3_bucket=S3_BUCKET,
        ldap_uri=ldap.uri,
        ldap_bind_dn=ldap.bind_dn,
        ldap_password=ldap.password,
        ldap_suffix=ldap.suffix,
        volumes_dir=str(volumes),
    )
    (base / "platform.json").write_text(json.dumps(asdict(platform), indent=2))
    return platform


def directory() -> DirectoryServer:
    """The platform's 389 Directory Server, for tests that change its data."""
    return DirectoryServer(state_dir() / "ldap", port=LDAP_PORT)


def is_up() -> bool:
    run = state_dir() / "run"
    return all(processes.running_pid(run, name) for name in STOP_ORDER)


def down(purge: bool = False) -> None:
    base = state_dir()
    run = base / "run"
    for name in STOP_ORDER:
        processes.stop(run, name)
    directory().stop()
    if purge:
        shutil.rmtree(_etcd_dir(), ignore_errors=True)
        subprocess.run(
            ["umount", "-R", "-l", *map(str, base.glob("node/pods/*/root"))], check=False, capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)
