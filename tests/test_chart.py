"""The Helm chart (charts/idm-backup-operator): it lints and renders, its RBAC is least-privilege, and the
real operator takes a backup with nothing but the permissions the chart grants.

The chart's Deployment runs with replicaCount=0 here: the test node would run the container's command on
the host, not the image. The operator runs instead as a local process (testbed.deploy.OperatorProcess)
authenticated as the chart's ServiceAccount, with a token from the TokenRequest API. CRDs are owned by
the session's `crds` fixture, so releases are installed after it; `helm install` then finds them present
and skips them (checked), and never changes or deletes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import (
    GROUP,
    PLURAL,
    VERSION,
    backup_spec,
    create_backup,
    get_backup,
    s3_keys,
    s3_storage,
    wait_finished,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "idm-backup-operator"
# helm's built-in default for `template` is Kubernetes v1.20 (helm built from source carries no version
# ldflags); the chart requires >=1.30, so rendering names the platform's version.
KUBE_VERSION = "v1.36.3"

# What the operator needs in a namespace it serves, derived from the code (see docs/install.md).
NAMESPACED_RULES = {
    ("idm-backup.io", "idmbackups"): {"get", "list", "watch", "patch", "create", "delete"},
    ("idm-backup.io", "idmbackupschedules"): {"get", "list", "watch", "patch"},
    ("idm-backup.io", "idmbackups/status"): {"patch"},
    ("idm-backup.io", "idmbackupschedules/status"): {"patch"},
    ("", "pods"): {"get", "list"},
    # The exec websocket (a GET) needs get, and since Kubernetes 1.35 create too: with either alone the
    # API server refuses it (tried on the platform's 1.36).
    ("", "pods/exec"): {"get", "create"},
    ("", "secrets"): {"get"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update", "delete"},
    ("", "events"): {"create"},
}
CRD_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACE_DISCOVERY = {("", "namespaces"): {"list", "watch"}}
METRICS_ARGS = ["--metrics-port", "9090", "--metrics-address", "0.0.0.0"]

# (verb, resource) the ServiceAccount must be refused in a namespace it serves.
DENIED_IN_SERVED_NAMESPACE = [
    ("create", "secrets"),
    ("update", "secrets"),
    ("patch", "secrets"),
    ("delete", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "pods"),
    ("delete", "pods"),
    ("patch", "pods"),
    ("watch", "pods"),
    ("get", "pods/log"),
    ("create", "pods/attach"),
    ("create", "pods/portforward"),
    ("create", "pods/eviction"),
    ("create", "idmbackupschedules.idm-backup.io"),
    ("delete", "idmbackupschedules.idm-backup.io"),
    ("update", "idmbackups.idm-backup.io"),
    ("list", "leases.coordination.k8s.io"),
    ("get", "deployments.apps"),
    ("list", "deployments.apps"),
    ("create", "deployments.apps"),
    ("patch", "deployments.apps"),
    ("delete", "deployments.apps"),
    ("get", "configmaps"),
    ("list", "configmaps"),
    ("create", "configmaps"),
    ("delete", "configmaps"),
    ("create", "serviceaccounts/token"),
    ("create", "persistentvolumeclaims"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("delete", "events"),
]
DENIED_CLUSTER_WIDE = [
    ("get", "nodes"),
    ("list", "nodes"),
    ("get", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("update", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "namespaces"),
    ("create", "namespaces"),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("impersonate", "users"),
    ("impersonate", "serviceaccounts"),
]


def kubectl_resource(group: str, resource: str) -> str:
    """("idm-backup.io", "idmbackups/status") -> "idmbackups.idm-backup.io/status", as can_i() takes it."""
    name, _, subresource = resource.partition("/")
    qualified = f"{name}.{group}" if group else name
    return f"{qualified}/{subresource}" if subresource else qualified


# (verb, resource[/subresource]) the ServiceAccount needs in a namespace it serves.
ALLOWED_IN_SERVED_NAMESPACE = [
    (verb, kubectl_resource(group, resource))
    for (group, resource), verbs in NAMESPACED_RULES.items()
    for verb in sorted(verbs)
]


# --- helm and kubectl ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """helm built from the Go module proxy by testbed/build.sh (a no-op once cached)."""
    out = subprocess.run(
        ["bash", str(REPO / "testbed" / "build.sh"), "helm"], check=True, stdout=subprocess.PIPE, text=True
    )
    bin_dir = Path(out.stdout.strip().splitlines()[-1])
    versions = dict(
        line.split("=", 1)
        for line in (REPO / "testbed" / "versions.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    path = bin_dir / f"helm-{versions['HELM_VERSION']}" / "helm"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def helm(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [str(helm_bin), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}")
        return proc.stdout if check else f"rc={proc.returncode}\n{proc.stdout}"

    return run


def _docs(rendered: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered) if d]


def render(helm: Callable[..., str], *args: str, namespace: str = "ops") -> list[dict[str, Any]]:
    out = helm("template", "rel", str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION, *args)
    # helm reports the crds/ symlink on stderr (merged here): keep only the YAML documents.
    return _docs("\n".join(line for line in out.splitlines() if not line.startswith("walk.go:")))


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def assert_no_wildcards(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], (doc["metadata"]["name"], rule)
                    assert not any("*" in v for v in rule[field]), (doc["metadata"]["name"], rule)
            granted = rules_of(doc)
            assert granted.get(("", "secrets"), {"get"}) == {"get"}, "secrets: read by name only"
            assert granted.get(("", "pods/exec"), set()) <= {"get", "create"}, "pods/exec: only exec"


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


# --- static: lint and render ------------------------------------------------------------------------


def test_chart_lints_and_packages_with_the_crds_from_the_top_level_directory(
    helm: Callable[..., str], tmp_path: Path
) -> None:
    assert (CHART / "crds").is_symlink() and (CHART / "crds").resolve() == REPO / "crds"
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), "--set", "rbac.scope=namespace", "--set", "watchNamespaces={a,b}")
    helm("lint", "--strict", str(CHART), "--set", "logFormat=json", "--set", "storage.pvcMounts={backups}")
    # A packaged chart carries the CRDs as regular files: the symlink is resolved.
    helm("package", str(CHART), "-d", str(tmp_path))
    with tarfile.open(tmp_path / "idm-backup-operator-0.1.0.tgz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for crd in sorted((REPO / "crds").glob("*.yaml")):
            member = members[f"idm-backup-operator/crds/{crd.name}"]
            assert member.isfile()
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == crd.read_bytes()


def test_rendered_crds_are_the_top_level_crds(helm: Callable[..., str]) -> None:
    docs = render(helm, "--include-crds")
    rendered = {d["metadata"]["name"]: d for d in of_kind(docs, "CustomResourceDefinition")}
    expected = {
        (crd := yaml.safe_load(path.read_text()))["metadata"]["name"]: crd
        for path in sorted((REPO / "crds").glob("*.yaml"))
    }
    assert rendered == expected


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "replicaCount=2"],
        ["--set", "rbac.scope=everything"],
        ["--set", "webhook.enabled=true"],
        ["--set", "logFormat=xml"],
        ["--set", "watchNamespaces={Not_A_Namespace}"],
        ["--set", "storage.pvcMounts={Bad/Claim}"],
        ["--set", "unknownKey=1"],
    ],
    ids=["replicas", "scope", "webhook", "log-format", "namespace-name", "claim-name", "unknown-key"],
)
def test_values_schema_refuses_bad_values(helm: Callable[..., str], bad: list[str]) -> None:
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, *bad, check=False)
    assert not out.startswith("rc=0"), out
    assert "values don't meet the specifications of the schema" in out, out


def test_cluster_mode_renders_one_cluster_role_with_exactly_the_needed_rules(
    helm: Callable[..., str],
) -> None:
    docs = render(helm)
    assert_no_wildcards(docs)
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    (role,) = of_kind(docs, "ClusterRole")
    assert rules_of(role) == {**NAMESPACED_RULES, **CRD_DISCOVERY}
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-idm-backup-operator", "namespace": "ops"}
    ]
    (deploy,) = of_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    # No --namespace: all namespaces.
    assert container["args"] == ["run", "--liveness", "http://0.0.0.0:8080/healthz", *METRICS_ARGS]
    # Not rendered by default: the ServiceMonitor (needs the Prometheus Operator).
    assert not of_kind(docs, "ServiceMonitor")


def test_namespace_mode_renders_a_role_per_watched_namespace_and_only_read_only_discovery(
    helm: Callable[..., str],
) -> None:
    docs = render(
        helm, "--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,identity-staging}"
    )
    assert_no_wildcards(docs)
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["identity", "identity-staging"]
    for role in roles:
        assert rules_of(role) == NAMESPACED_RULES
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["identity", "identity-staging"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "ops"
    # Cluster-wide: only kopf's read-only discovery, nothing inside any namespace.
    (discovery,) = of_kind(docs, "ClusterRole")
    assert rules_of(discovery) == {**CRD_DISCOVERY, **NAMESPACE_DISCOVERY}
    (deploy,) = of_kind(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [
        "run",
        "--liveness",
        "http://0.0.0.0:8080/healthz",
        "--namespace",
        "identity",
        "--namespace",
        "identity-staging",
        *METRICS_ARGS,
    ]
    # Without discovery, namespace mode has no cluster-scoped object at all.
    docs = render(helm, "--set", "rbac.scope=namespace", "--set", "rbac.clusterDiscovery=false")
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    assert [r["metadata"]["namespace"] for r in of_kind(docs, "Role")] == ["ops"]  # default: release ns


def test_deployment_is_one_hardened_non_root_pod(helm: Callable[..., str]) -> None:
    docs = render(
        helm,
        "--set",
        "logFormat=json",
        "--set",
        "storage.pvcMounts={backups,archive.claim}",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    )
    (deploy,) = of_kind(docs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "rel-idm-backup-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    (container,) = pod["containers"]
    assert container["image"] == "idm-backup-operator:0.1.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["args"][-2:] == ["--log-format", "json"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TMPDIR"] == "/tmp" and env["IDM_BACKUP_PVC_ROOT"] == "/var/lib/idm-backup-operator/pvc"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for claim in ("backups", "archive.claim"):
        volume = volumes[mounts[f"/var/lib/idm-backup-operator/pvc/{claim}"]]
        assert volume["persistentVolumeClaim"] == {"claimName": claim}
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # Metrics off: the operator is told not to listen, and nothing points at the port.
    docs = render(helm, "--set", "metrics.enabled=false")
    (deploy,) = of_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["args"][-2:] == ["--metrics-port", "0"]
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert not of_kind(docs, "Service") and not of_kind(docs, "ServiceMonitor")


def test_the_operators_command_line_accepts_the_rendered_arguments(
    helm: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from idm_backup_operator import cli

    seen: list[Any] = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(args) or 0)
    docs = render(
        helm,
        "--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,staging}",
        "--set", "logFormat=json", "--set", "verbose=true", "--set", "extraArgs={--standalone}",
    )  # fmt: skip
    (deploy,) = of_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    # The image's ENTRYPOINT is the console script; the chart's args replace its CMD.
    assert cli.main(container["args"]) == 0
    (args,) = seen
    assert args.command == "run" and args.namespace == ["identity", "staging"]
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert (args.metrics_port, args.metrics_address) == (9090, "0.0.0.0")
    assert args.log_format == "json" and args.verbose and args.peering is None


def test_the_image_and_the_chart_agree(helm: Callable[..., str]) -> None:
    """Docker cannot run here: what can be checked statically is that the image fits the chart."""
    dockerfile = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'idm-backup-operator = "idm_backup_operator.cli:main"' in pyproject
    assert 'ENTRYPOINT ["idm-backup-operator"]' in dockerfile and 'CMD ["run"]' in dockerfile
    assert "USER 65532:65532" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1 :][:2] == ["!pyproject.toml", "!operator/"]
    (deploy,) = of_kind(render(helm), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 65532
    assert deploy["metadata"]["labels"]["app.kubernetes.io/version"] == "0.1.0"
    assert 'version = "0.1.0"' in pyproject  # the chart's appVersion is the package's version


# --- on the platform: install, RBAC as the API server sees it, and a real backup --------------------


class Release:
    def __init__(self, helm: Callable[..., str], name: str, namespace: str, kubeconfig: str) -> None:
        self.helm, self.name, self.namespace, self.kubeconfig = helm, name, namespace, kubeconfig
        self.service_account = f"{name}-idm-backup-operator"
        self.install_output = ""

    def install(self, *args: str) -> None:
        self.install_output = self.helm(
            "install", self.name, str(CHART), "-n", self.namespace, "--kubeconfig", self.kubeconfig,
            # The Deployment's pod cannot run here (see the module docstring); the operator runs locally.
            "--set", "replicaCount=0", "--debug", *args,
        )  # fmt: skip

    def uninstall(self) -> None:
        self.helm("uninstall", self.name, "-n", self.namespace, "--kubeconfig", self.kubeconfig, check=False)

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@pytest.fixture
def release(
    helm: Callable[..., str], platform: stack.Platform, crds: None, namespace: str
) -> Iterator[Release]:
    rel = Release(helm, f"r{uuid.uuid4().hex[:6]}", namespace, platform.kubeconfig)
    yield rel
    rel.uninstall()


@pytest.fixture(scope="session")
def kubectl(platform: stack.Platform) -> Path:
    return stack.binaries()["kubectl"]


def can_i(
    kubectl: Path, platform: stack.Platform, rel: Release, verb: str, resource: str, ns: str | None
) -> bool:
    # The ServiceAccount's groups too, so grants to every authenticated user count as they would.
    # kubectl reads "pods/exec" as the pod named "exec": a subresource goes into --subresource.
    resource, _, subresource = resource.partition("/")
    argv = [
        str(kubectl), "--kubeconfig", platform.kubeconfig, "auth", "can-i", verb, resource,
        f"--subresource={subresource}",
        f"--as={rel.user}", "--as-group=system:serviceaccounts",
        f"--as-group=system:serviceaccounts:{rel.namespace}", "--as-group=system:authenticated",
    ]  # fmt: skip
    argv += ["-n", ns] if ns else ["--all-namespaces"]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.stdout.strip() in ("yes", "no"), (argv, out.stdout, out.stderr)
    return out.stdout.strip() == "yes"


def check_grants(
    kubectl: Path,
    platform: stack.Platform,
    rel: Release,
    *,
    allowed: list[tuple[str, str, str | None]],
    denied: list[tuple[str, str, str | None]],
) -> None:
    # The authorizer's cache may lag the new bindings a moment.
    wait_for("RBAC to take effect", lambda: can_i(kubectl, platform, rel, *allowed[0]), timeout=15)
    wrong_yes = [d for d in denied if can_i(kubectl, platform, rel, *d)]
    wrong_no = [a for a in allowed if not can_i(kubectl, platform, rel, *a)]
    assert (wrong_yes, wrong_no) == ([], []), "granted but not needed / needed but not granted"


def test_namespace_mode_grants_what_the_operator_needs_where_it_watches_and_nothing_else(
    release: Release, kubectl: Path, platform: stack.Platform, namespace: str
) -> None:
    release.install("--skip-crds", "--set", "rbac.scope=namespace")
    allowed = [(verb, resource, namespace) for verb, resource in ALLOWED_IN_SERVED_NAMESPACE]
    allowed += [("list", "customresourcedefinitions.apiextensions.k8s.io", None)]
    allowed += [("watch", "customresourcedefinitions.apiextensions.k8s.io", None)]
    allowed += [("list", "namespaces", None), ("watch", "namespaces", None)]
    denied = [(verb, resource, namespace) for verb, resource in DENIED_IN_SERVED_NAMESPACE]
    denied += [(verb, resource, None) for verb, resource in DENIED_CLUSTER_WIDE]
    # Nothing in a namespace it does not watch, and nothing across all namespaces.
    for elsewhere in ("default", "kube-system"):
        denied += [
            ("create", "pods/exec", elsewhere),
            ("get", "secrets", elsewhere),
            ("get", "pods", elsewhere),
            ("list", "idmbackups.idm-backup.io", elsewhere),
            ("create", "leases.coordination.k8s.io", elsewhere),
            ("create", "events", elsewhere),
        ]
    denied += [("get", "secrets", None), ("list", "pods", None), ("list", "idmbackups.idm-backup.io", None)]
    check_grants(kubectl, platform, release, allowed=allowed, denied=denied)


def test_cluster_mode_install_finds_the_crds_present_and_grants_all_namespaces(
    release: Release, kubectl: Path, platform: stack.Platform, namespace: str
) -> None:
    # No --skip-crds: helm reads crds/ through the symlink, finds both CRDs present and leaves them alone.
    release.install("--set", "rbac.scope=cluster")
    for name in ("idmbackups.idm-backup.io", "idmbackupschedules.idm-backup.io"):
        assert f"CRD {name} is already present. Skipping." in release.install_output
    allowed = [(verb, resource, None) for verb, resource in ALLOWED_IN_SERVED_NAMESPACE]
    allowed += [(verb, resource, "default") for verb, resource in ALLOWED_IN_SERVED_NAMESPACE]
    allowed += [("list", "customresourcedefinitions.apiextensions.k8s.io", None)]
    denied = [(verb, resource, namespace) for verb, resource in DENIED_IN_SERVED_NAMESPACE]
    denied += [(verb, resource, None) for verb, resource in DENIED_CLUSTER_WIDE]
    denied += [("list", "namespaces", None)]  # kopf lists namespaces only when not cluster-wide
    check_grants(kubectl, platform, release, allowed=allowed, denied=denied)


def service_account_kubeconfig(
    api: client.ApiClient, platform: stack.Platform, rel: Release, path: Path, expiration_seconds: int = 3600
) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount, with a TokenRequest token."""
    core = client.CoreV1Api(api)
    token = core.create_namespaced_service_account_token(
        rel.service_account, rel.namespace, {"spec": {"expirationSeconds": expiration_seconds}}
    ).status.token
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "operator",
                "clusters": [
                    {
                        "name": "testbed",
                        "cluster": {
                            "server": platform.api_server,
                            "certificate-authority": str(Path(platform.state_dir) / "pki" / "ca.crt"),
                        },
                    }
                ],
                # kubernetes 36 sends a kubeconfig token correctly only from users[].user.token.
                "users": [{"name": rel.service_account, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "operator",
                        "context": {
                            "cluster": "testbed",
                            "user": rel.service_account,
                            "namespace": rel.namespace,
                        },
                    }
                ],
            }
        )
    )
    path.chmod(0o600)
    return path


def test_the_operator_takes_and_deletes_a_backup_with_only_the_charts_rbac(
    release: Release,
    api: client.ApiClient,
    platform: stack.Platform,
    namespace: str,
    freeipa: Callable[..., str],
    secrets: None,
    s3: Any,
    tmp_path: Path,
) -> None:
    release.install("--skip-crds", "--set", "rbac.scope=namespace")
    kubeconfig = service_account_kubeconfig(api, platform, release, tmp_path / "operator.kubeconfig")
    freeipa()
    pvc_root = tmp_path / "pvc"
    pvc_root.mkdir()
    operator = OperatorProcess(namespace, str(kubeconfig), pvc_root, tmp_path / "operator.log")
    operator.start()
    try:
        prefix = f"chart/{namespace}"
        spec = backup_spec(platform, s3_storage(platform, prefix), type="Data", deletionPolicy="Delete")
        create_backup(api, namespace, "with-chart-rbac", spec)
        obj = wait_finished(api, namespace, "with-chart-rbac", operator)
        assert obj["status"]["phase"] == "Succeeded", (obj["status"], operator.output()[-3000:])
        keys = s3_keys(s3, platform.s3_bucket, prefix)
        assert len(keys) == 3 and keys[-1].endswith("/manifest.json"), keys
        # deletionPolicy Delete: kopf's finalizer (a patch) is in place; deleting removes the stored files.
        assert obj["metadata"].get("finalizers"), obj["metadata"]
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "with-chart-rbac"
        )

        def gone() -> bool:
            try:
                get_backup(api, namespace, "with-chart-rbac")
            except client.ApiException as err:
                return err.status == 404
            return False

        wait_for("the IdmBackup and its finalizer to go", gone, timeout=60)
        assert s3_keys(s3, platform.s3_bucket, prefix) == []
        log = operator.output()
        # Neither kopf nor the operator ran into a missing permission anywhere.
        for sign in ("Forbidden", "forbidden", "Not enough permissions", "(403)"):
            assert sign not in log, next(line for line in log.splitlines() if sign in line)
    finally:
        operator.stop()
