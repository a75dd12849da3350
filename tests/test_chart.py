"""The Helm chart (charts/idm-backup-operator): it lints and renders, its RBAC is least-privilege, and the
real operator takes a backup with nothing but the permissions the chart grants.

The chart's Deployment runs with replicaCount=0 here: the test node would run the container's command on
the host, not the image. The operator runs instead as a local process (testbed.deploy.OperatorProcess)
authenticated as the chart's ServiceAccount, with a token from the TokenRequest API. CRDs are owned by
the session's `crds` fixture, so releases are installed after it; `helm install` then finds them present
and skips them (checked), and never changes or deletes them. kopf's peering CRDs (crds/kopf/) are not
the project's API and not in that fixture: the first release installed without --skip-crds creates them,
and they stay, as they would in a cluster.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from testbed import processes, stack
from testbed.deploy import REPO, OperatorProcess
from tests.helpers import (
    CHART,
    GROUP,
    KUBE_VERSION,
    PLURAL,
    VERSION,
    backup_spec,
    create_backup,
    create_schedule,
    of_kind,
    render,
    s3_keys,
    s3_storage,
    token_kubeconfig,
    wait_deleted,
    wait_finished,
    wait_for,
)

# What the operator needs in a namespace it serves, derived from the code (see docs/install.md).
NAMESPACED_RULES = {
    ("idm-backup.io", "idmbackups"): {"get", "list", "watch", "patch", "create", "delete"},
    ("idm-backup.io", "idmbackupschedules"): {"get", "list", "watch", "patch"},
    # Restores are the users': the operator follows them, and never creates or deletes one.
    ("idm-backup.io", "idmrestores"): {"get", "list", "watch", "patch"},
    ("idm-backup.io", "idmbackups/status"): {"patch"},
    ("idm-backup.io", "idmbackupschedules/status"): {"patch"},
    ("idm-backup.io", "idmrestores/status"): {"patch"},
    ("", "pods"): {"get", "list"},
    # The exec websocket (a GET) needs get, and since Kubernetes 1.35 create too: with either alone the
    # API server refuses it (tried on the platform's 1.36).
    ("", "pods/exec"): {"get", "create"},
    ("", "secrets"): {"get"},
    ("", "events"): {"create"},
}
# The servers' locks, in the release namespace only (whatever the scope): locking.TargetLock reads,
# creates, replaces and deletes a Lease by name, lists them for a schedule's Paused condition, and never
# watches.
LOCK_RULES = {("coordination.k8s.io", "leases"): {"get", "list", "create", "update", "delete"}}
LEASES = "leases.coordination.k8s.io"
# Where Lease rights would reach the cluster's own: the control plane's leader election, the nodes'
# heartbeats.
SYSTEM_LEASE_NAMESPACES = ("kube-system", "kube-node-lease")
CRD_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACE_DISCOVERY = {("", "namespaces"): {"list", "watch"}}
METRICS_ARGS = ["--metrics-port", "9090", "--metrics-address", "0.0.0.0"]
PEERING = "idm-backup-operator"  # peering.name's default
# On by default: the webhook, where the chart mounts its certificate.
WEBHOOK_ARGS = [
    "--webhook-port", "9443", "--webhook-address", "0.0.0.0",
    "--webhook-cert-dir", "/etc/idm-backup-operator/webhook-tls",
]  # fmt: skip


def peering_rules(resource: str, name: str = PEERING) -> dict[tuple[str, str], set[str]]:
    """kopf's peering, read from its code (kopf 1.45): it lists and watches the peering objects of its
    scope and merge-patches its keep-alive into the one named by --peering; it never gets one by name."""
    return {("kopf.dev", resource): {"list", "watch"}, ("kopf.dev", f"{resource}[{name}]"): {"patch"}}


def set_json(values: dict[str, Any]) -> list[str]:
    """--set-json for each top-level key of `values` (helm takes key=JSON, not a whole document)."""
    return [arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


# Every optional object of the chart at once: the monitoring objects and their values.
EVERYTHING_ON = [
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "metrics.grafanaDashboard.enabled=true",
]  # fmt: skip


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
    ("create", "idmrestores.idm-backup.io"),
    ("delete", "idmrestores.idm-backup.io"),
    ("deletecollection", "idmrestores.idm-backup.io"),
    ("update", "idmrestores.idm-backup.io"),
    ("update", "idmrestores.idm-backup.io/status"),
    # The release namespace is served too here, and the locks there are listed (leases_denied covers
    # the other namespaces).
    ("watch", LEASES),
    ("patch", LEASES),
    ("deletecollection", LEASES),
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
# ... and in the release namespace, for the locks.
ALLOWED_FOR_LOCKS = [(verb, LEASES) for verb in sorted(LOCK_RULES[("coordination.k8s.io", "leases")])]


# The webhook (on by default) asks whether the requesting user may read a Secret, and who it is itself:
# a ClusterRole of its own, rendered only with the webhook.
WEBHOOK_RULES = {
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
    ("authentication.k8s.io", "selfsubjectreviews"): {"create"},
}
# In operator certificate mode (the default) the operator also fills in the caBundle of its own
# configuration, and keeps its certificate in its own Secret: each by name.
OWN_CONFIGURATION_RULES = {
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations[rel-idm-backup-operator-ops]"): {
        "get",
        "patch",
    },
}
OWN_SECRET_RULES = {("", "secrets[rel-idm-backup-operator-webhook-tls]"): {"get", "update"}}


def operators(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """ClusterRoles or ClusterRoleBindings other than the webhook's reviews and the users' roles
    aggregated to view/edit/admin (rbac.aggregateToDefaultRoles), which have no binding of their own."""
    return [
        d
        for d in of_kind(docs, kind)
        if not d["metadata"]["name"].endswith("-webhook")
        and not any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in d["metadata"]["labels"])
    ]


def leases_denied(*namespaces: str | None) -> list[tuple[str, str, str | None]]:
    """Every verb on Leases, refused in each namespace (None: across all of them)."""
    verbs = ("get", "list", "watch", "create", "update", "patch", "delete")
    return [(verb, LEASES, ns) for ns in namespaces for verb in verbs]


# --- helm and kubectl ------------------------------------------------------------------------------


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """{(group, resource): verbs}; a rule narrowed to resourceNames counts as (group, "resource[name]")."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    key = (group, f"{resource}[{name}]" if name else resource)
                    granted.setdefault(key, set()).update(rule["verbs"])
    return granted


def lock_role_name(release: str = "rel") -> str:
    return f"{release}-idm-backup-operator-locks"


def webhook_role_name(release: str = "rel") -> str:
    """The Role (and RoleBinding) of the webhook's certificate Secret, in operator certificate mode."""
    return f"{release}-idm-backup-operator-webhook"


def served_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Roles of the namespaces the operator serves (namespace mode): all but the locks' Role and the
    webhook certificate's."""
    return [
        r
        for r in of_kind(docs, "Role")
        if r["metadata"]["name"] not in (lock_role_name(), webhook_role_name())
    ]


def assert_lock_role_in_release_namespace_only(docs: list[dict[str, Any]], namespace: str = "ops") -> None:
    """The only Lease rights the chart grants: one Role in the release namespace, bound to the operator's
    ServiceAccount; no other Role or ClusterRole mentions Leases."""
    (role,) = [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == lock_role_name()]
    assert role["metadata"]["namespace"] == namespace
    assert rules_of(role) == LOCK_RULES
    (binding,) = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["name"] == lock_role_name()]
    assert binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": lock_role_name(),
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-idm-backup-operator", "namespace": namespace}
    ]
    for other in [*served_roles(docs), *of_kind(docs, "ClusterRole")]:
        assert not any("leases" in rule["resources"] for rule in other["rules"]), other["metadata"]["name"]


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


# --- static: lint and render ------------------------------------------------------------------------


def test_chart_lints_and_packages_with_the_crds_from_the_top_level_directory(
    helm: Callable[..., str], tmp_path: Path
) -> None:
    assert (CHART / "crds").is_symlink() and (CHART / "crds").resolve() == REPO / "crds"
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), "--set", "rbac.scope=namespace", "--set", "watchNamespaces={a,b}")
    helm("lint", "--strict", str(CHART), "--set", "logFormat=json", "--set", "storage.pvcMounts={backups}")
    helm(
        "lint", "--strict", str(CHART), "--set", "replicaCount=2", "--set", "peering.enabled=true",
        "--set", "webhook.enabled=true", "--set", "rbac.scope=namespace",
    )  # fmt: skip
    helm("lint", "--strict", str(CHART), *EVERYTHING_ON)
    # The replica guard is in the schema: lint catches it, not only an install.
    out = helm("lint", "--strict", str(CHART), "--set", "replicaCount=2", check=False)
    assert not out.startswith("rc=0") and "replicaCount" in out, out
    # A packaged chart carries the CRDs as regular files: the symlink is resolved.
    helm("package", str(CHART), "-d", str(tmp_path))
    with tarfile.open(tmp_path / "idm-backup-operator-0.1.0.tgz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for crd in sorted((REPO / "crds").rglob("*.yaml")):
            member = members[f"idm-backup-operator/crds/{crd.relative_to(REPO / 'crds')}"]
            assert member.isfile()
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == crd.read_bytes()


def test_rendered_crds_are_the_top_level_crds(helm: Callable[..., str]) -> None:
    docs = render(helm, "--include-crds")
    rendered = {d["metadata"]["name"]: d for d in of_kind(docs, "CustomResourceDefinition")}
    expected = {
        (crd := yaml.safe_load(path.read_text()))["metadata"]["name"]: crd
        for path in sorted((REPO / "crds").rglob("*.yaml"))
    }
    assert rendered == expected
    # crds/kopf/: kopf's own peering CRDs, status free-form (kopf keeps its peers there), no subresource
    # (kopf patches status through the object itself).
    for name, scope in (("kopfpeerings.kopf.dev", "Namespaced"), ("clusterkopfpeerings.kopf.dev", "Cluster")):
        crd = rendered[name]
        assert crd["spec"]["group"] == "kopf.dev" and crd["spec"]["scope"] == scope
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1" and "subresources" not in version
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    # Nothing of kopf's in crds/*.yaml, the project's API (tests/test_crds.py, testbed's install_crds).
    assert all(p.name.startswith("idm-backup.io_") for p in (REPO / "crds").glob("*.yaml"))


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "replicaCount=-1"],
        ["--set", "rbac.scope=everything"],
        ["--set", "webhook.certificate.mode=vault"],
        ["--set", "webhook.failurePolicy=Sometimes"],
        ["--set", "webhook.timeoutSeconds=31"],
        ["--set", "webhook.url=http://127.0.0.1:9443"],
        ["--set", "peering.name=Not_A_Name"],
        ["--set", "logFormat=xml"],
        ["--set", "watchNamespaces={Not_A_Namespace}"],
        ["--set", "storage.pvcMounts={Bad/Claim}"],
        ["--set-json", 'storage.pvcMounts=[{"claimName": "backups", "namespaces": []}]'],
        ["--set-json", 'storage.pvcMounts=[{"claimName": "backups", "namespaces": ["Not_A_Namespace"]}]'],
        ["--set-json", 'storage.pvcMounts=[{"claimName": "backups", "namespace": "identity"}]'],
        ["--set-json", 'storage.pvcMounts=[{"namespaces": ["identity"]}]'],
        ["--set", "s3.allowedEndpoints={https://s3.example.com}"],
        ["--set-json", 's3.allowedEndpoints=["s3.example.com,elsewhere"]'],
        ["--set", "unknownKey=1"],
        ["--set", "replicaCount=2", "--set", "peering.enabled=false"],
        ["--set", "metrics.serviceMonitor.honorLabels=maybe"],
        ["--set", "metrics.prometheusRule.disabled={IdmBackupWhatever}"],
        ["--set", "metrics.prometheusRule.runbookBaseURL=https://example.com/readme#anchor"],
        ["--set", "metrics.prometheusRule.failureWindow=one-day"],
        ["--set", "metrics.prometheusRule.backupMaxAgeHours=0"],
        ["--set", "metrics.grafanaDashboard.namespace=Not_A_Namespace"],
        ["--set", "rbac.aggregateToDefaultRoles=sometimes"],
        ["--set", "tests.timeoutSeconds=0"],
    ],
    ids=[
        "replicas", "scope", "webhook-certificate-mode", "webhook-failure-policy", "webhook-timeout",
        "webhook-url-not-https", "peering-name", "log-format", "namespace-name", "claim-name",
        "claim-for-no-namespace", "claim-namespace-name", "claim-unknown-key", "claim-without-name",
        "endpoint-as-url", "endpoint-with-comma", "unknown-key",
        "replicas-without-peering", "honor-labels", "unknown-alert", "runbook-with-anchor", "failure-window",
        "max-age", "dashboard-namespace", "aggregated-roles", "test-timeout",
    ],
)  # fmt: skip
def test_values_schema_refuses_bad_values(helm: Callable[..., str], bad: list[str]) -> None:
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, *bad, check=False)
    assert not out.startswith("rc=0"), out
    assert "values don't meet the specifications of the schema" in out, out


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_the_webhook_may_ask_who_may_read_a_secret_and_nothing_more(
    helm: Callable[..., str], scope: str
) -> None:
    docs = render(helm, "--set", f"rbac.scope={scope}")
    (role,) = [r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-webhook")]
    assert rules_of(role) == {**WEBHOOK_RULES, **OWN_CONFIGURATION_RULES}
    # The certificate's Secret: a Role in the release namespace, whatever the scope.
    (own,) = [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == webhook_role_name()]
    assert own["metadata"]["namespace"] == "ops" and rules_of(own) == OWN_SECRET_RULES
    (own_binding,) = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["name"] == webhook_role_name()]
    assert own_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": webhook_role_name(),
    }
    assert own_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-idm-backup-operator", "namespace": "ops"}
    ]
    # The other certificate modes need neither.
    for mode in (
        ["helm"],
        ["certManager"],
        ["secret", "webhook.certificate.secretName=tls", "webhook.certificate.caBundle=Q0E="],
    ):
        given = [a for value in [f"webhook.certificate.mode={mode[0]}", *mode[1:]] for a in ("--set", value)]
        other = render(helm, "--set", f"rbac.scope={scope}", *given)
        (role,) = [r for r in of_kind(other, "ClusterRole") if r["metadata"]["name"].endswith("-webhook")]
        assert rules_of(role) == WEBHOOK_RULES
        assert not [r for r in of_kind(other, "Role") if r["metadata"]["name"] == webhook_role_name()]
    (binding,) = [
        b for b in of_kind(docs, "ClusterRoleBinding") if b["metadata"]["name"].endswith("-webhook")
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "rel-idm-backup-operator-ops-webhook"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-idm-backup-operator", "namespace": "ops"}
    ]
    without = render(helm, "--set", f"rbac.scope={scope}", "--set", "webhook.enabled=false")
    assert not [r for r in of_kind(without, "ClusterRole") if r["metadata"]["name"].endswith("-webhook")]


def test_cluster_mode_renders_one_cluster_role_with_exactly_the_needed_rules(
    helm: Callable[..., str],
) -> None:
    docs = render(helm)
    assert_no_wildcards(docs)
    # Namespaced: only the locks' Role, in the release namespace.
    assert not served_roles(docs)
    assert_lock_role_in_release_namespace_only(docs)
    (role,) = operators(docs, "ClusterRole")
    assert rules_of(role) == {**NAMESPACED_RULES, **CRD_DISCOVERY}
    (binding,) = operators(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-idm-backup-operator", "namespace": "ops"}
    ]
    (deploy,) = of_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    # No --namespace: all namespaces.
    assert container["args"] == [
        "run",
        "--liveness",
        "http://0.0.0.0:8080/healthz",
        *METRICS_ARGS,
        *WEBHOOK_ARGS,
    ]
    # Not rendered by default: the ServiceMonitor (needs the Prometheus Operator).
    assert not of_kind(docs, "ServiceMonitor")


# What drills.enabled adds: a schedule's drill IdmRestores, and each drill's scratch pod, claim and policy.
DRILL_RULES = {
    ("idm-backup.io", "idmrestores"): {"create", "delete"},
    ("", "pods"): {"create", "delete"},
    ("", "persistentvolumeclaims"): {"create", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"create", "delete"},
}


def test_drills_are_off_by_default_and_enabling_them_grants_exactly_what_they_create(
    helm: Callable[..., str],
) -> None:
    def deployment_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
        (deploy,) = of_kind(docs, "Deployment")
        return {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}

    off = render(helm)
    assert "IDM_BACKUP_ENABLE_DRILLS" not in deployment_env(off)
    on = render(helm, "--set", "drills.enabled=true")
    assert deployment_env(on)["IDM_BACKUP_ENABLE_DRILLS"] == "true"
    (role,) = operators(on, "ClusterRole")
    expected = {**NAMESPACED_RULES, **CRD_DISCOVERY}
    for key, verbs in DRILL_RULES.items():
        expected[key] = expected.get(key, set()) | verbs
    assert rules_of(role) == expected
    assert_no_wildcards(on)


def test_namespace_mode_renders_a_role_per_watched_namespace_and_only_read_only_discovery(
    helm: Callable[..., str],
) -> None:
    docs = render(
        helm, "--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,identity-staging}"
    )
    assert_no_wildcards(docs)
    roles = served_roles(docs)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["identity", "identity-staging"]
    for role in roles:
        assert rules_of(role) == NAMESPACED_RULES
    # The locks stay in the release namespace, which is not one of those served here.
    assert_lock_role_in_release_namespace_only(docs)
    bindings = [
        b
        for b in of_kind(docs, "RoleBinding")
        if b["metadata"]["name"] not in (lock_role_name(), webhook_role_name())
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["identity", "identity-staging"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "ops"
    # Cluster-wide: only kopf's read-only discovery, nothing inside any namespace.
    (discovery,) = operators(docs, "ClusterRole")
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
        *WEBHOOK_ARGS,
    ]
    # Without discovery, namespace mode has no cluster-scoped object for the operator; without the users'
    # aggregated roles (and the webhook's reviews) none at all.
    docs = render(helm, "--set", "rbac.scope=namespace", "--set", "rbac.clusterDiscovery=false")
    assert not operators(docs, "ClusterRole") and not operators(docs, "ClusterRoleBinding")
    bare = render(
        helm, "--set", "rbac.scope=namespace", "--set", "rbac.clusterDiscovery=false",
        "--set", "rbac.aggregateToDefaultRoles=false", "--set", "webhook.enabled=false",
    )  # fmt: skip
    assert not [d for d in bare if "namespace" not in d["metadata"]], [d["kind"] for d in bare]
    assert [r["metadata"]["namespace"] for r in served_roles(docs)] == ["ops"]  # default: release ns
    assert_lock_role_in_release_namespace_only(docs)


def test_deployment_is_one_hardened_non_root_pod(helm: Callable[..., str]) -> None:
    # The webhook's port, Service and volume have tests of their own.
    docs = render(
        helm,
        "--set",
        "webhook.enabled=false",
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
    # The pod's own namespace, where the locks go and the chart grants Lease rights.
    (pod_namespace,) = [e for e in container["env"] if e["name"] == "POD_NAMESPACE"]
    assert pod_namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
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
    docs = render(helm, "--set", "metrics.enabled=false", "--set", "webhook.enabled=false")
    (deploy,) = of_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["args"][-2:] == ["--metrics-port", "0"]
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert not of_kind(docs, "Service") and not of_kind(docs, "ServiceMonitor")


def test_the_operators_command_line_accepts_the_rendered_arguments(
    helm: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from idm_backup_operator import cli
    from idm_backup_operator.kube import locking

    seen: list[Any] = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(args) or 0)
    docs = render(
        helm,
        "--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,staging}",
        "--set", "logFormat=json", "--set", "verbose=true", "--set", "extraArgs={--standalone}",
        "--set", "webhook.enabled=false",
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
    assert args.webhook_port == 0 and not args.s3_ambient_credentials
    # The locks go to the pod's namespace, the release's (from the downward API), not to the first
    # watched one: the only namespace where the chart grants Lease rights.
    assert args.lock_namespace is None
    (pod_namespace,) = [e for e in container["env"] if e["name"] == "POD_NAMESPACE"]
    assert pod_namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    monkeypatch.delenv(locking.LOCK_NAMESPACE_ENV, raising=False)
    monkeypatch.setenv("POD_NAMESPACE", "ops")  # what the kubelet sets for a release in ops
    assert locking.resolve_namespace(args.lock_namespace, args.namespace) == ("ops", "POD_NAMESPACE")
    # Peering and the webhook: --peering, and the webhook where the chart mounts its certificate.
    docs = render(
        helm, "--set", "peering.enabled=true", "--set", "replicaCount=2", "--set", "webhook.enabled=true",
        "--set", "s3.ambientCredentials=true",
    )  # fmt: skip
    (deploy,) = of_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert cli.main(container["args"]) == 0
    args = seen[-1]
    assert args.peering == PEERING and not args.standalone and args.namespace is None
    assert args.s3_ambient_credentials
    assert (args.webhook_port, args.webhook_address) == (9443, "0.0.0.0")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    assert args.webhook_cert_dir == mount["mountPath"]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (deploy,) = of_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_the_s3_endpoint_allow_list_reaches_the_operator_as_it_reads_it(
    helm: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from idm_backup_operator.idmbackup import validation

    assert validation.ENDPOINTS_ENV not in operator_env(render(helm))  # by default, any endpoint
    env = operator_env(
        render(
            helm,
            *set_json(
                {"s3": {"allowedEndpoints": ["s3.example.com", "MinIO.storage.svc:9000", "*.corp.test"]}}
            ),
        )
    )
    monkeypatch.setenv(validation.ENDPOINTS_ENV, env[validation.ENDPOINTS_ENV])
    assert validation.allowed_endpoints() == ("s3.example.com", "minio.storage.svc:9000", "*.corp.test")
    for allowed in ("https://s3.example.com", "http://minio.storage.svc:9000", "https://rgw.corp.test"):
        assert validation.endpoint_problem(allowed) is None, allowed
    for refused in (
        "https://s3.example.com:9000",
        "http://minio.storage.svc",
        "https://corp.test",
        "https://x.test",
    ):
        assert validation.endpoint_problem(refused) == (
            f"{refused!r} is not an S3 endpoint this operator may use (its administrator allows: "
            "s3.example.com, minio.storage.svc:9000, *.corp.test)"
        )


def test_pvc_mounts_may_give_a_claim_to_some_namespaces_only(
    helm: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from idm_backup_operator.kube import references

    docs = render(
        helm,
        *set_json({"storage": {"pvcMounts": [
            "shared",
            {"claimName": "identity.backups", "namespaces": ["identity", "identity-staging"]},
            {"claimName": "open"},
        ]}}),
    )  # fmt: skip
    (deploy,) = of_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for claim in ("shared", "identity.backups", "open"):
        volume = volumes[mounts[f"/var/lib/idm-backup-operator/pvc/{claim}"]]
        assert volume["persistentVolumeClaim"] == {"claimName": claim}
    env = operator_env(docs)
    monkeypatch.setenv(references.PVC_NAMESPACES_ENV, env[references.PVC_NAMESPACES_ENV])
    assert references.claim_namespaces() == {"identity.backups": ("identity", "identity-staging")}
    # Names only: every claim open to every namespace, as before the mapping existed.
    env = operator_env(render(helm, "--set", "storage.pvcMounts={shared,open}"))
    assert references.PVC_NAMESPACES_ENV not in env


def test_more_than_one_replica_is_refused_without_peering(helm: Callable[..., str]) -> None:
    # By the values schema first (so helm lint reports it) ...
    out = helm(
        "template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "replicaCount=2", check=False
    )
    assert not out.startswith("rc=0"), out
    assert "values don't meet the specifications of the schema" in out and "replicaCount" in out, out
    assert "maximum" in out, out
    # ... and by the templates, with the reason, where the schema is skipped.
    out = helm(
        "template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "replicaCount=2",
        "--skip-schema-validation", check=False,
    )  # fmt: skip
    assert not out.startswith("rc=0"), out
    assert (
        "replicaCount=2 needs peering.enabled=true: standalone kopf operators do not know of each other, "
        "and every replica would run every backup"
    ) in out, out
    # With peering, any number; 0 and 1 stay allowed without it.
    assert len(render(helm, "--set", "replicaCount=3", "--set", "peering.enabled=true")) > 0
    for replicas in ("0", "1"):
        (deploy,) = of_kind(render(helm, "--set", f"replicaCount={replicas}"), "Deployment")
        assert deploy["spec"]["replicas"] == int(replicas)


def test_cluster_mode_peering_renders_a_cluster_kopf_peering_its_rbac_and_several_replicas(
    helm: Callable[..., str],
) -> None:
    docs = render(helm, "--set", "peering.enabled=true", "--set", "replicaCount=3")
    assert_no_wildcards(docs)
    (peering,) = of_kind(docs, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1" and peering["metadata"]["name"] == PEERING
    assert "namespace" not in peering["metadata"]
    assert not of_kind(docs, "KopfPeering")
    (role,) = operators(docs, "ClusterRole")
    assert rules_of(role) == {**NAMESPACED_RULES, **CRD_DISCOVERY, **peering_rules("clusterkopfpeerings")}
    assert_lock_role_in_release_namespace_only(docs)
    (deploy,) = of_kind(docs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 3
    # Peering lets old and new pods overlap: a new one is up before an old one goes.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"] == [
        "run", "--liveness", "http://0.0.0.0:8080/healthz", *METRICS_ARGS,
        "--peering", PEERING, *WEBHOOK_ARGS,
    ]  # fmt: skip
    # kopf's identity in the peering object is the pod's name.
    (pod_id,) = [e for e in container["env"] if e["name"] == "POD_ID"]
    assert pod_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (budget,) = of_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    # One replica with peering: no budget (it would block every drain).
    docs = render(helm, "--set", "peering.enabled=true", "--set", "peering.name=ops.peers")
    assert not of_kind(docs, "PodDisruptionBudget")
    (peering,) = of_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "ops.peers"
    (role,) = operators(docs, "ClusterRole")
    assert rules_of(role) == {
        **NAMESPACED_RULES,
        **CRD_DISCOVERY,
        **peering_rules("clusterkopfpeerings", "ops.peers"),
    }


def test_namespace_mode_peering_renders_a_kopf_peering_and_its_rules_in_each_watched_namespace(
    helm: Callable[..., str],
) -> None:
    docs = render(
        helm, "--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,identity-staging}",
        "--set", "peering.enabled=true", "--set", "replicaCount=2",
    )  # fmt: skip
    assert_no_wildcards(docs)
    peerings = of_kind(docs, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("identity", PEERING),
        ("identity-staging", PEERING),
    ]
    assert all(p["apiVersion"] == "kopf.dev/v1" for p in peerings)
    assert not of_kind(docs, "ClusterKopfPeering")
    for role in served_roles(docs):
        assert rules_of(role) == {**NAMESPACED_RULES, **peering_rules("kopfpeerings")}
    assert_lock_role_in_release_namespace_only(docs)
    # Cluster-wide still only discovery: no peering object is cluster-scoped in this mode.
    (discovery,) = operators(docs, "ClusterRole")
    assert rules_of(discovery) == {**CRD_DISCOVERY, **NAMESPACE_DISCOVERY}
    (deploy,) = of_kind(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--peering") + 1] == PEERING
    assert args.count("--namespace") == 2


def tls_handshake(tmp_path: Path, cert: bytes, key: bytes, ca: bytes, server_name: str) -> dict[str, Any]:
    """Serve cert/key over a local socket pair and connect as the API server does: verify the chain
    against ca and the certificate against server_name. Returns the certificate the client saw."""
    for name, pem in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)):
        (tmp_path / name).write_bytes(pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    server_sock, client_sock = socket.socketpair()
    with concurrent.futures.ThreadPoolExecutor(1) as pool, server_sock, client_sock:

        def serve() -> None:
            # When the client refuses the certificate, the client's error says why.
            with contextlib.suppress(ssl.SSLError, OSError):
                server_ctx.wrap_socket(server_sock, server_side=True).close()

        served = pool.submit(serve)
        try:
            with client_ctx.wrap_socket(client_sock, server_hostname=server_name) as tls:
                peer = tls.getpeercert()
        finally:
            client_sock.close()
            served.result(timeout=10)
    assert peer is not None
    return peer


def webhook_parts(
    docs: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the ValidatingWebhookConfiguration, the Deployment's pod spec, its container)."""
    (config,) = of_kind(docs, "ValidatingWebhookConfiguration")
    (deploy,) = of_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return config, pod, container


# What each webhook reviews: an IdmRestore's spec cannot change (CEL), so only its creation.
WEBHOOK_OPERATIONS = {
    "idmbackups": ["CREATE", "UPDATE"],
    "idmbackupschedules": ["CREATE", "UPDATE"],
    "idmrestores": ["CREATE"],
}


# Only creates and spec changes reach the webhook: see test_admission's test with no webhook answering.
SPEC_CHANGES_ONLY = [
    {
        "name": "spec-changes-only",
        "expression": "request.operation != 'UPDATE' || "
        "(!has(object.metadata.deletionTimestamp) && object.spec != oldObject.spec)",
    }
]


def expected_webhooks(client_config: Callable[[str], dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": f"validate.{plural}.idm-backup.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "matchPolicy": "Equivalent",
            "matchConditions": SPEC_CHANGES_ONLY,
            "clientConfig": client_config(f"/validate-{plural[:-1]}"),
            "rules": [
                {
                    "apiGroups": ["idm-backup.io"],
                    "apiVersions": ["v1alpha1"],
                    "operations": operations,
                    "resources": [plural],
                    "scope": "Namespaced",
                }
            ],
            **extra,
        }
        for plural, operations in WEBHOOK_OPERATIONS.items()
    ]


def test_webhook_helm_certificate_is_served_through_the_service_and_verified_by_the_ca_bundle(
    helm: Callable[..., str], tmp_path: Path
) -> None:
    docs = render(helm, "--set", "webhook.enabled=true", "--set", "webhook.certificate.mode=helm")
    config, pod, container = webhook_parts(docs)
    (secret,) = of_kind(docs, "Secret")
    assert secret["metadata"]["name"] == "rel-idm-backup-operator-webhook-tls"
    assert secret["type"] == "kubernetes.io/tls"
    ca_bundle = config["webhooks"][0]["clientConfig"]["caBundle"]
    assert ca_bundle == secret["data"]["ca.crt"]

    def service(path: str) -> dict[str, Any]:
        return {
            "service": {
                "name": "rel-idm-backup-operator-webhook",
                "namespace": "ops",
                "path": path,
                "port": 443,
            },
            "caBundle": ca_bundle,
        }

    assert config["metadata"]["name"] == "rel-idm-backup-operator-ops"
    assert "annotations" not in config["metadata"]
    # Cluster mode: every namespace, so no namespaceSelector.
    assert config["webhooks"] == expected_webhooks(service)
    (webhook_service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-webhook")]
    assert webhook_service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}
    ]
    (deploy,) = of_kind(docs, "Deployment")
    assert webhook_service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    # The pod: the port, the arguments, the Secret mounted where --webhook-cert-dir points, readiness.
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    assert container["args"][-6:] == [
        "--webhook-port", "9443", "--webhook-address", "0.0.0.0",
        "--webhook-cert-dir", "/etc/idm-backup-operator/webhook-tls",
    ]  # fmt: skip
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    assert mount == {
        "name": "webhook-tls",
        "mountPath": "/etc/idm-backup-operator/webhook-tls",
        "readOnly": True,
    }
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    assert volume == {"name": "webhook-tls", "secret": {"secretName": "rel-idm-backup-operator-webhook-tls"}}
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    (role,) = operators(docs, "ClusterRole")
    assert rules_of(role) == {**NAMESPACED_RULES, **CRD_DISCOVERY}
    assert not [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == webhook_role_name()]
    # What the API server does: dial <service>.<namespace>.svc and verify against the caBundle. The key
    # is the certificate's, too (the handshake needs both).
    cert, key, ca = (base64.b64decode(secret["data"][k]) for k in ("tls.crt", "tls.key", "ca.crt"))
    assert base64.b64decode(ca_bundle) == ca
    peer = tls_handshake(tmp_path, cert, key, ca, "rel-idm-backup-operator-webhook.ops.svc")
    assert ("DNS", "rel-idm-backup-operator-webhook.ops.svc") in peer["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        tls_handshake(tmp_path, cert, key, ca, "rel-idm-backup-operator-webhook.elsewhere.svc")
    # helm template cannot look the Secret up: each render is a new CA (install and upgrade reuse it,
    # see test_webhook_certificate_survives_an_upgrade).
    (again,) = of_kind(render(helm, "--set", "webhook.certificate.mode=helm"), "Secret")
    assert again["data"]["ca.crt"] != secret["data"]["ca.crt"]


def test_webhook_in_namespace_mode_reviews_only_the_watched_namespaces(helm: Callable[..., str]) -> None:
    docs = render(
        helm, "--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,identity-staging}",
        "--set", "webhook.enabled=true", "--set", "webhook.failurePolicy=Ignore",
        "--set", "webhook.timeoutSeconds=5", "--set", "webhook.port=8443",
    )  # fmt: skip
    config, _, container = webhook_parts(docs)
    selector = {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "In",
                "values": ["identity", "identity-staging"],
            }
        ]
    }
    for webhook in config["webhooks"]:
        assert webhook["namespaceSelector"] == selector
        assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == ("Ignore", 5)
        assert webhook["clientConfig"]["service"]["port"] == 443
    assert container["args"][container["args"].index("--webhook-port") + 1] == "8443"
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in container["ports"]
    for role in served_roles(docs):
        assert rules_of(role) == NAMESPACED_RULES


def test_webhook_url_calls_the_operator_there_with_a_certificate_for_its_host(
    helm: Callable[..., str], tmp_path: Path
) -> None:
    helm_mode = ["--set", "webhook.certificate.mode=helm"]
    docs = render(helm, *helm_mode, "--set", "webhook.url=https://127.0.0.1:9443/")
    config, _, _ = webhook_parts(docs)
    (secret,) = of_kind(docs, "Secret")
    ca_bundle = secret["data"]["ca.crt"]

    def url(path: str) -> dict[str, Any]:
        return {"url": f"https://127.0.0.1:9443{path}", "caBundle": ca_bundle}

    assert config["webhooks"] == expected_webhooks(url)
    # No Service to call: only the metrics one.
    assert [s["metadata"]["name"] for s in of_kind(docs, "Service")] == ["rel-idm-backup-operator-metrics"]
    cert, key, ca = (base64.b64decode(secret["data"][k]) for k in ("tls.crt", "tls.key", "ca.crt"))
    peer = tls_handshake(tmp_path, cert, key, ca, "127.0.0.1")
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    # A host name goes into the DNS names.
    docs = render(helm, *helm_mode, "--set", "webhook.url=https://dev.example.test:8443")
    (secret,) = of_kind(docs, "Secret")
    cert, key, ca = (base64.b64decode(secret["data"][k]) for k in ("tls.crt", "tls.key", "ca.crt"))
    assert ("DNS", "dev.example.test") in tls_handshake(tmp_path, cert, key, ca, "dev.example.test")[
        "subjectAltName"
    ]


def test_webhook_cert_manager_mode_renders_an_issuer_a_certificate_and_the_injection_annotation(
    helm: Callable[..., str],
) -> None:
    docs = render(helm, "--set", "webhook.enabled=true", "--set", "webhook.certificate.mode=certManager")
    config, pod, _ = webhook_parts(docs)
    assert not of_kind(docs, "Secret")  # cert-manager writes it
    (issuer,) = of_kind(docs, "Issuer")
    assert issuer["apiVersion"] == "cert-manager.io/v1" and issuer["spec"] == {"selfSigned": {}}
    (certificate,) = of_kind(docs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["metadata"]["namespace"] == "ops"
    assert certificate["spec"] == {
        "secretName": "rel-idm-backup-operator-webhook-tls",
        "dnsNames": [
            "rel-idm-backup-operator-webhook",
            "rel-idm-backup-operator-webhook.ops",
            "rel-idm-backup-operator-webhook.ops.svc",
        ],
        "issuerRef": {"group": "cert-manager.io", "kind": "Issuer", "name": issuer["metadata"]["name"]},
    }
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"ops/{certificate['metadata']['name']}"
    }

    def service(path: str) -> dict[str, Any]:  # no caBundle: cert-manager's CA injector fills it in
        return {
            "service": {
                "name": "rel-idm-backup-operator-webhook",
                "namespace": "ops",
                "path": path,
                "port": 443,
            }
        }

    assert config["webhooks"] == expected_webhooks(service)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    # With a url, its host is in the certificate too.
    docs = render(
        helm, "--set", "webhook.enabled=true", "--set", "webhook.certificate.mode=certManager",
        "--set", "webhook.url=https://127.0.0.1:9443",
    )  # fmt: skip
    (certificate,) = of_kind(docs, "Certificate")
    assert certificate["spec"]["ipAddresses"] == ["127.0.0.1"]


def test_webhook_secret_mode_uses_the_given_secret_and_ca_bundle(helm: Callable[..., str]) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    for given, expected in ((pem, base64.b64encode(pem.strip().encode()).decode()), ("TUlJQg==", "TUlJQg==")):
        docs = render(
            helm, "--set", "webhook.enabled=true", "--set", "webhook.certificate.mode=secret",
            "--set", "webhook.certificate.secretName=my-webhook-tls",
            "--set", f"webhook.certificate.caBundle={given}",
        )  # fmt: skip
        config, pod, _ = webhook_parts(docs)
        assert (
            not of_kind(docs, "Secret") and not of_kind(docs, "Certificate") and not of_kind(docs, "Issuer")
        )
        assert {w["clientConfig"]["caBundle"] for w in config["webhooks"]} == {expected}
        (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
        assert volume["secret"]["secretName"] == "my-webhook-tls"
    for missing, message in (
        (["--set", "webhook.certificate.caBundle=TUlJQg=="], "webhook.certificate.secretName is required"),
        (
            ["--set", "webhook.certificate.secretName=my-webhook-tls"],
            "webhook.certificate.caBundle is required",
        ),
    ):
        out = helm(
            "template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "webhook.enabled=true",
            "--set", "webhook.certificate.mode=secret", *missing, check=False,
        )  # fmt: skip
        assert not out.startswith("rc=0") and message in out, out


def test_webhook_operator_mode_renders_what_to_make_and_no_key_material_or_ca_bundle(
    helm: Callable[..., str],
) -> None:
    """The default: the operator makes the certificate (kube/webhookcert.py). The chart's Secret says what
    to make and where the operator keeps it; the configuration has no caBundle until the operator fills it
    in."""
    docs = render(helm)
    config, pod, container = webhook_parts(docs)
    (secret,) = of_kind(docs, "Secret")
    assert secret["metadata"]["name"] == "rel-idm-backup-operator-webhook-tls"
    assert secret["metadata"]["namespace"] == "ops"
    # The type of helm mode's Secret (a Secret's type cannot change), with the two keys it requires empty.
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "certificate.json"}
    assert secret["data"]["tls.crt"] == secret["data"]["tls.key"] == ""
    plan = json.loads(base64.b64decode(secret["data"]["certificate.json"]))
    assert plan == {
        "namespace": "ops",
        "secret": "rel-idm-backup-operator-webhook-tls",
        "configuration": config["metadata"]["name"],
        "dnsNames": [
            "rel-idm-backup-operator-webhook",
            "rel-idm-backup-operator-webhook.ops",
            "rel-idm-backup-operator-webhook.ops.svc",
        ],
        "ipAddresses": [],
        "validityDays": 3650,
    }
    assert config["metadata"]["name"] == "rel-idm-backup-operator-ops"
    assert "annotations" not in config["metadata"]

    def service(path: str) -> dict[str, Any]:  # no caBundle: the operator fills it in
        return {
            "service": {
                "name": "rel-idm-backup-operator-webhook",
                "namespace": "ops",
                "path": path,
                "port": 443,
            }
        }

    assert config["webhooks"] == expected_webhooks(service)
    # Mounted where --webhook-cert-dir points, as in the other modes: certificate.json is how the operator
    # knows the mode.
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    assert volume == {"name": "webhook-tls", "secret": {"secretName": secret["metadata"]["name"]}}
    assert container["args"][-6:] == WEBHOOK_ARGS
    # No key, no certificate, no CA anywhere in the chart's output.
    rendered = json.dumps(docs)
    assert "BEGIN" not in rendered and "caBundle" not in rendered
    # A url's host is a name of the certificate too; the client CA goes into the Secret, as in helm mode.
    client_ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    docs = render(
        helm,
        "--set",
        "webhook.url=https://127.0.0.1:9443",
        "--set",
        f"webhook.clientAuth.caBundle={client_ca}",
    )
    (secret,) = of_kind(docs, "Secret")
    assert json.loads(base64.b64decode(secret["data"]["certificate.json"]))["ipAddresses"] == ["127.0.0.1"]
    assert base64.b64decode(secret["data"]["client-ca.crt"]).decode() == f"{client_ca}\n"
    out = helm(
        "template", "rel", str(CHART), "--kube-version", KUBE_VERSION,
        "--set", "webhook.certificate.mode=certManager", "--set", "webhook.clientAuth.caBundle=Q0E=",
        check=False,
    )  # fmt: skip
    assert not out.startswith("rc=0") and "with webhook.certificate.mode=operator or helm only" in out, out


def test_webhook_disabled_renders_nothing_of_it(helm: Callable[..., str]) -> None:
    docs = render(helm, "--set", "webhook.enabled=false")
    assert not of_kind(docs, "ValidatingWebhookConfiguration") and not of_kind(docs, "Secret")
    (deploy,) = of_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert not any(a.startswith("--webhook") for a in container["args"])
    assert "readinessProbe" not in container
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


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


# --- monitoring, user roles, helm test, chart metadata ------------------------------------------------


def test_service_monitor_keeps_the_series_namespace_and_takes_relabelings(helm: Callable[..., str]) -> None:
    (monitor,) = of_kind(render(helm, "--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    # Every series carries the IdmBackup's namespace: honorLabels keeps it rather than exported_namespace.
    assert endpoint == {
        "port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s", "honorLabels": True,
    }  # fmt: skip
    relabel = [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]
    drop = [{"sourceLabels": ["__name__"], "regex": "idm_backup_duration_seconds_bucket", "action": "drop"}]
    values = {"metrics": {"serviceMonitor": {
        "enabled": True, "honorLabels": False, "relabelings": relabel, "metricRelabelings": drop,
    }}}  # fmt: skip
    (monitor,) = of_kind(render(helm, *set_json(values)), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is False
    assert endpoint["relabelings"] == relabel and endpoint["metricRelabelings"] == drop


def test_prometheus_rule_is_optional_and_carries_its_labels_and_extra_rules(helm: Callable[..., str]) -> None:
    assert not of_kind(render(helm, "--set", "metrics.serviceMonitor.enabled=true"), "PrometheusRule")
    extra = {"alert": "IdmBackupWeeklyTooOld", "expr": "vector(1)", "labels": {"severity": "critical"}}
    values = {"metrics": {"prometheusRule": {
        "enabled": True, "labels": {"release": "prometheus"}, "extraRules": [extra],
        "disabled": ["IdmBackupQueued", "IdmBackupOperatorDown"],
    }}}  # fmt: skip
    (rule,) = of_kind(render(helm, *set_json(values)), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "ops" and rule["metadata"]["labels"]["release"] == "prometheus"
    (group,) = rule["spec"]["groups"]
    assert [r["alert"] for r in group["rules"]] == [
        "IdmBackupFailed", "IdmBackupTooOld", "IdmBackupNeverSucceeded", "IdmBackupRepeatedFailures",
        "IdmBackupServicesDown", "IdmBackupStorageUnavailable", "IdmBackupDrillFailed",
        "IdmBackupWeeklyTooOld",
    ]  # fmt: skip
    assert group["rules"][-1] == extra
    (failed,) = [r for r in group["rules"] if r["alert"] == "IdmBackupFailed"]
    assert failed["annotations"]["runbook_url"] == (
        "https://github.com/idm-backup/idm-backup-operator#alert-idmbackupfailed"
    )
    # Prometheus' templates reach Prometheus, not Helm.
    assert "{{ $labels.namespace }}" in failed["annotations"]["description"]


def test_grafana_dashboard_is_a_configmap_for_the_sidecar(helm: Callable[..., str]) -> None:
    assert not of_kind(render(helm), "ConfigMap")
    (config_map,) = of_kind(render(helm, "--set", "metrics.grafanaDashboard.enabled=true"), "ConfigMap")
    assert config_map["metadata"]["name"] == "rel-idm-backup-operator-dashboard"
    assert config_map["metadata"]["namespace"] == "ops"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = config_map["data"]
    assert name == "idm-backup-operator.json"
    dashboard = json.loads(config_map["data"][name])
    assert dashboard == json.loads((CHART / "dashboards" / "idm-backup-operator.json").read_text())
    assert dashboard["uid"] == "idm-backup-operator" and dashboard["title"] == "IdM backups"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace", "schedule"}
    titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
    assert {
        "Last backup failed",
        "Schedules and hand-made backups",
        "Backup duration (p50, p95 over a day)",
    } <= titles
    # Every query reads the data source variable; every panel has a place on the grid.
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and target["expr"]
    values = {"metrics": {"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring", "label": "grafana_dashboard_idm", "labelValue": "yes",
        "annotations": {"grafana_folder": "Backups"},
    }}}  # fmt: skip
    (config_map,) = of_kind(render(helm, *set_json(values)), "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard_idm"] == "yes"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Backups"}


AGGREGATED_KINDS = ("idmbackups", "idmbackupschedules", "idmrestores")
AGGREGATED_VIEW = {
    ("idm-backup.io", resource): {"get", "list", "watch"}
    for plural in AGGREGATED_KINDS
    for resource in (plural, f"{plural}/status")
}
AGGREGATED_EDIT = {
    **AGGREGATED_VIEW,
    **{
        ("idm-backup.io", resource): {
            "get", "list", "watch", "create", "update", "patch", "delete", "deletecollection",
        }
        for resource in AGGREGATED_KINDS
    },
}  # fmt: skip


def aggregated_roles(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        r["metadata"]["name"]: r
        for r in of_kind(docs, "ClusterRole")
        if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in r["metadata"]["labels"])
    }


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_aggregated_roles_add_every_kind_to_view_edit_and_admin(helm: Callable[..., str], scope: str) -> None:
    roles = aggregated_roles(render(helm, "--set", f"rbac.scope={scope}"))
    assert set(roles) == {"rel-idm-backup-operator-ops-view", "rel-idm-backup-operator-ops-edit"}
    view, edit = roles["rel-idm-backup-operator-ops-view"], roles["rel-idm-backup-operator-ops-edit"]
    assert rules_of(view) == AGGREGATED_VIEW and rules_of(edit) == AGGREGATED_EDIT
    aggregate = {k: v for k, v in view["metadata"]["labels"].items() if k.startswith("rbac.")}
    assert aggregate == {"rbac.authorization.k8s.io/aggregate-to-view": "true"}
    aggregate = {k: v for k, v in edit["metadata"]["labels"].items() if k.startswith("rbac.")}
    assert aggregate == {
        "rbac.authorization.k8s.io/aggregate-to-edit": "true",
        "rbac.authorization.k8s.io/aggregate-to-admin": "true",
    }
    # Nothing about Secrets, pods or the operator's status writes goes to users.
    assert all(group == "idm-backup.io" for group, _ in rules_of(edit))
    assert not aggregated_roles(render(helm, "--set", "rbac.aggregateToDefaultRoles=false"))
    assert not aggregated_roles(render(helm, "--set", "rbac.create=false"))


def test_helm_test_pod_fetches_the_metrics_through_the_service(helm: Callable[..., str]) -> None:
    docs = render(helm)
    (pod,) = of_kind(docs, "Pod")
    assert pod["metadata"]["name"] == "rel-idm-backup-operator-test-metrics"
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = service["spec"]["ports"][0]["port"]
    assert env == {
        "METRICS_URL": f"http://{service['metadata']['name']}.ops.svc:{port}/metrics",
        "TIMEOUT_SECONDS": "60",
    }
    (deploy,) = of_kind(docs, "Deployment")
    operator_pod = deploy["spec"]["template"]["spec"]
    (operator_container,) = operator_pod["containers"]
    assert container["image"] == operator_container["image"]
    assert container["command"] == ["python", "-c"]
    assert pod["spec"]["securityContext"] == operator_pod["securityContext"]
    assert container["securityContext"] == operator_container["securityContext"]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["automountServiceAccountToken"] is False
    assert not of_kind(render(helm, "--set", "tests.enabled=false"), "Pod")
    assert not of_kind(render(helm, "--set", "metrics.enabled=false"), "Pod")


def test_chart_metadata_readme_and_license(helm: Callable[..., str]) -> None:
    def show(what: str) -> str:  # helm reports the crds/ symlink on stderr, merged here
        out = helm("show", what, str(CHART)).splitlines(keepends=True)
        return "".join(line for line in out if not line.startswith("walk.go:"))

    chart = yaml.safe_load(show("chart"))
    assert chart["home"] == "https://github.com/idm-backup/idm-backup-operator"
    assert chart["sources"] == [chart["home"]]
    media, _, data = chart["icon"].partition(";base64,")
    assert media == "data:image/svg+xml" and base64.b64decode(data).startswith(b"<svg ")
    annotations = chart["annotations"]
    assert annotations["artifacthub.io/license"] == "Apache-2.0"
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
    links = yaml.safe_load(annotations["artifacthub.io/links"])
    assert {link["name"] for link in links} >= {"Documentation", "Changelog", "Alerts and runbooks"}
    assert all(link["url"].startswith(chart["home"]) for link in links)
    changes = yaml.safe_load(annotations["artifacthub.io/changes"])
    assert changes and all(
        c["kind"] in ("added", "changed", "fixed", "removed") and c["description"] for c in changes
    )
    crds = yaml.safe_load(annotations["artifacthub.io/crds"])
    assert {(c["kind"], c["version"]) for c in crds} == {
        ("IdmBackup", "v1alpha1"),
        ("IdmBackupSchedule", "v1alpha1"),
        ("IdmRestore", "v1alpha1"),
    }
    assert {c["name"] for c in crds} == {
        yaml.safe_load(p.read_text())["metadata"]["name"] for p in (REPO / "crds").glob("*.yaml")
    }
    (example,) = yaml.safe_load(annotations["artifacthub.io/crdsExamples"])
    assert example["kind"] == "IdmBackupSchedule" and example["spec"]["template"]["spec"]["target"]
    # `helm show readme` prints the chart's README.
    readme = show("readme")
    assert readme.strip() == (CHART / "README.md").read_text().strip()
    assert "## Install" in readme and "helm test" in readme
    # The changelog the docs' release notes point to, with this chart version in it.
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {chart['version']}" in changelog and "## Unreleased" in changelog
    assert "[CHANGELOG.md](../CHANGELOG.md)" in (REPO / "docs" / "install.md").read_text()


def webhook_certificate_paths(docs: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    """Where the helm-mode webhook certificate shows: the Secret's data and each webhook's caBundle."""
    paths: set[tuple[str, ...]] = set()
    for doc in docs:
        name = (doc["kind"], doc["metadata"]["name"])
        if doc["kind"] == "Secret" and doc["type"] == "kubernetes.io/tls":
            paths |= {(*name, "data", key) for key in ("tls.crt", "tls.key", "ca.crt")}
        if doc["kind"] == "ValidatingWebhookConfiguration":
            paths |= {
                (*name, "webhooks", str(i), "clientConfig", "caBundle") for i in range(len(doc["webhooks"]))
            }
    return paths


def differing_paths(a: Any, b: Any, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {p for k in a for p in differing_paths(a[k], b[k], (*path, str(k)))}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {
            p
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for p in differing_paths(x, y, (*path, str(i)))
        }
    return set() if a == b else {path}


def test_two_renders_with_defaults_are_identical(helm: Callable[..., str]) -> None:
    """Issue 11: no permanent drift in Argo CD or Flux. With the default (operator) certificate mode, two
    `helm template` runs print the same bytes; with everything optional on, with namespace mode and a url,
    and with the given certificate of secret mode, too."""
    base = ["template", "rel", str(CHART), "-n", "ops", "--kube-version", KUBE_VERSION]
    for args in (
        [],
        EVERYTHING_ON,
        ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,staging}"],
        ["--set", "webhook.url=https://127.0.0.1:9443", "--set", "webhook.clientAuth.caBundle=Q0E="],
        ["--set", "webhook.certificate.mode=secret", "--set", "webhook.certificate.secretName=tls",
         "--set", "webhook.certificate.caBundle=Q0E="],
    ):  # fmt: skip
        first, second = helm(*base, *args), helm(*base, *args)
        assert "kind: ValidatingWebhookConfiguration" in first
        assert first == second, args


def test_helm_certificate_mode_still_differs_only_in_the_webhook_certificate(
    helm: Callable[..., str],
) -> None:
    """helm mode generates a CA and a serving certificate per render (install and upgrade reuse the one in
    the cluster; `helm template` cannot look it up): the 12 lines that differ, and nothing else."""
    for args in ([], EVERYTHING_ON):
        first, second = (render(helm, "--set", "webhook.certificate.mode=helm", *args) for _ in range(2))
        assert [(d["kind"], d["metadata"]["name"]) for d in first] == [
            (d["kind"], d["metadata"]["name"]) for d in second
        ]
        differing = {
            (d["kind"], d["metadata"]["name"], *p)
            for d, e in zip(first, second, strict=True)
            for p in differing_paths(d, e)
        }
        assert differing == webhook_certificate_paths(first)
        assert len(differing) == 6  # tls.crt, tls.key, ca.crt and three caBundles: 12 lines of a diff


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
            # Nor can the webhook's Service reach it; tests that install the webhook enable it again.
            "--set", "replicaCount=0", "--set", "webhook.enabled=false", "--debug", *args,
        )  # fmt: skip

    def upgrade(self, *args: str) -> None:
        self.helm(
            "upgrade", self.name, str(CHART), "-n", self.namespace, "--kubeconfig", self.kubeconfig,
            "--reuse-values", *args,
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


@pytest.fixture
def other_namespace(api: client.ApiClient, namespace: str) -> Iterator[str]:
    """A second namespace of the test's own: another one to serve, or a release namespace apart from
    the served one (where the operator's own objects go); deleted afterwards."""
    name = f"{namespace[:50]}-b"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": {"idm-backup.io/test": "true"}}})
    yield name
    core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture(scope="session")
def kubectl(platform: stack.Platform) -> Path:
    return stack.binaries()["kubectl"]


def can_i(
    kubectl: Path,
    platform: stack.Platform,
    rel: Release,
    verb: str,
    resource: str,
    ns: str | None,
    name: str | None = None,
) -> bool:
    # The ServiceAccount's groups too, so grants to every authenticated user count as they would.
    # kubectl reads "pods/exec" as the pod named "exec": a subresource goes into --subresource, and an
    # object's name after the resource's.
    resource, _, subresource = resource.partition("/")
    argv = [
        str(kubectl), "--kubeconfig", platform.kubeconfig, "auth", "can-i", verb,
        f"{resource}/{name}" if name else resource,
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
    release: Release, kubectl: Path, platform: stack.Platform, namespace: str, other_namespace: str
) -> None:
    # Two served namespaces: the release's own, and another.
    release.install(
        "--skip-crds", "--set", "rbac.scope=namespace",
        "--set", f"watchNamespaces={{{namespace},{other_namespace}}}",
    )  # fmt: skip
    served = (namespace, other_namespace)
    allowed: list[tuple[str, str, str | None]]
    denied: list[tuple[str, str, str | None]]
    allowed = [(verb, resource, ns) for ns in served for verb, resource in ALLOWED_IN_SERVED_NAMESPACE]
    allowed += [(verb, resource, namespace) for verb, resource in ALLOWED_FOR_LOCKS]
    allowed += [("list", "customresourcedefinitions.apiextensions.k8s.io", None)]
    allowed += [("watch", "customresourcedefinitions.apiextensions.k8s.io", None)]
    allowed += [("list", "namespaces", None), ("watch", "namespaces", None)]
    denied = [(verb, resource, ns) for ns in served for verb, resource in DENIED_IN_SERVED_NAMESPACE]
    denied += [(verb, resource, None) for verb, resource in DENIED_CLUSTER_WIDE]
    # Nothing in a namespace it does not watch, and nothing across all namespaces.
    for elsewhere in ("default", "kube-system"):
        denied += [
            ("create", "pods/exec", elsewhere),
            ("get", "secrets", elsewhere),
            ("get", "pods", elsewhere),
            ("list", "idmbackups.idm-backup.io", elsewhere),
            ("list", "idmrestores.idm-backup.io", elsewhere),
            ("patch", "idmrestores.idm-backup.io/status", elsewhere),
            ("create", "events", elsewhere),
        ]
    denied += [("get", "secrets", None), ("list", "pods", None), ("list", "idmbackups.idm-backup.io", None)]
    denied += [("list", "idmrestores.idm-backup.io", None)]
    # Leases in the release namespace only: not in the other served namespace, not in the cluster's own.
    denied += leases_denied(other_namespace, "default", *SYSTEM_LEASE_NAMESPACES, None)
    check_grants(kubectl, platform, release, allowed=allowed, denied=denied)


def test_cluster_mode_install_finds_the_crds_present_and_grants_all_namespaces(
    release: Release, kubectl: Path, platform: stack.Platform, namespace: str
) -> None:
    # No --skip-crds: helm reads crds/ through the symlink, finds the CRDs present and leaves them alone.
    release.install("--set", "rbac.scope=cluster")
    for name in ("idmbackups.idm-backup.io", "idmbackupschedules.idm-backup.io", "idmrestores.idm-backup.io"):
        assert f"CRD {name} is already present. Skipping." in release.install_output
    allowed: list[tuple[str, str, str | None]]
    denied: list[tuple[str, str, str | None]]
    allowed = [(verb, resource, None) for verb, resource in ALLOWED_IN_SERVED_NAMESPACE]
    allowed += [(verb, resource, "default") for verb, resource in ALLOWED_IN_SERVED_NAMESPACE]
    allowed += [(verb, resource, namespace) for verb, resource in ALLOWED_FOR_LOCKS]
    allowed += [("list", "customresourcedefinitions.apiextensions.k8s.io", None)]
    denied = [(verb, resource, namespace) for verb, resource in DENIED_IN_SERVED_NAMESPACE]
    denied += [(verb, resource, None) for verb, resource in DENIED_CLUSTER_WIDE]
    denied += [("list", "namespaces", None)]  # kopf lists namespaces only when not cluster-wide
    # Every namespace is served, but Leases only in the release namespace: no leader election's or
    # node's Lease can be read, taken over or deleted.
    denied += leases_denied("default", *SYSTEM_LEASE_NAMESPACES, None)
    check_grants(kubectl, platform, release, allowed=allowed, denied=denied)


def service_account_kubeconfig(
    api: client.ApiClient, platform: stack.Platform, rel: Release, path: Path, expiration_seconds: int = 3600
) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount, with a TokenRequest token."""
    core = client.CoreV1Api(api)
    token = core.create_namespaced_service_account_token(
        rel.service_account, rel.namespace, {"spec": {"expirationSeconds": expiration_seconds}}
    ).status.token
    return token_kubeconfig(platform, rel.service_account, token, path, namespace=rel.namespace)


@pytest.fixture
def ops_release(
    helm: Callable[..., str], platform: stack.Platform, crds: None, other_namespace: str
) -> Iterator[Release]:
    """A release in a namespace of its own, as in idm-backup-system, apart from the one it serves."""
    rel = Release(helm, f"r{uuid.uuid4().hex[:6]}", other_namespace, platform.kubeconfig)
    yield rel
    rel.uninstall()


def test_the_operator_takes_and_deletes_a_backup_with_only_the_charts_rbac(
    ops_release: Release,
    api: client.ApiClient,
    platform: stack.Platform,
    namespace: str,
    freeipa: Callable[..., str],
    secrets: None,
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from idm_backup_operator.idmbackup import validation

    release = ops_release
    s3_host = platform.s3_endpoint.removeprefix("http://")
    release.install(
        "--skip-crds", "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{namespace}}}",
        "--set", f"s3.allowedEndpoints={{{s3_host}}}",
    )  # fmt: skip
    kubeconfig = service_account_kubeconfig(api, platform, release, tmp_path / "operator.kubeconfig")
    freeipa()
    pvc_root = tmp_path / "pvc"
    pvc_root.mkdir()
    # As the chart's pod has it from the downward API: the locks go to the release namespace, the only
    # one where the chart grants Lease rights, not to the served one.
    monkeypatch.setenv("POD_NAMESPACE", release.namespace)
    # The installed Deployment's allow-list, as the pod would have it: the backup's endpoint must pass it.
    deployment = client.AppsV1Api(api).read_namespaced_deployment(release.service_account, release.namespace)
    (container,) = deployment.spec.template.spec.containers
    (allowed,) = [e.value for e in container.env if e.name == validation.ENDPOINTS_ENV]
    assert allowed == s3_host
    monkeypatch.setenv(validation.ENDPOINTS_ENV, allowed)
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
        wait_deleted(api, namespace, "with-chart-rbac")
        assert s3_keys(s3, platform.s3_bucket, prefix) == []
        log = operator.output()
        # Neither kopf nor the operator ran into a missing permission anywhere.
        for sign in ("Forbidden", "forbidden", "Not enough permissions", "(403)"):
            assert sign not in log, next(line for line in log.splitlines() if sign in line)
        assert f"locks (Leases) go to namespace {release.namespace} (from POD_NAMESPACE)" in log
        coordination = client.CoordinationV1Api(api)
        assert coordination.list_namespaced_lease(release.namespace).items == []  # released
    finally:
        operator.stop()


# --- on the platform: peering and the webhook ---------------------------------------------------------


def crd_present(api: client.ApiClient, name: str) -> bool:
    try:
        client.ApiextensionsV1Api(api).read_custom_resource_definition(name)
    except client.ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def test_namespace_mode_peering_install_creates_the_kopf_peering_and_grants_exactly_kopfs_peering_verbs(
    release: Release, kubectl: Path, platform: stack.Platform, namespace: str, api: client.ApiClient
) -> None:
    # No --skip-crds: helm creates kopf's peering CRDs from crds/kopf/ unless an earlier release did.
    release.install("--set", "rbac.scope=namespace", "--set", "peering.enabled=true")
    assert crd_present(api, "kopfpeerings.kopf.dev") and crd_present(api, "clusterkopfpeerings.kopf.dev")
    peering = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings", PEERING
    )
    assert peering["metadata"]["labels"]["app.kubernetes.io/instance"] == release.name
    resource = "kopfpeerings.kopf.dev"
    allowed: list[tuple[str, str, str | None]] = [
        ("list", resource, namespace),
        ("watch", resource, namespace),
    ]
    denied: list[tuple[str, str, str | None]] = [
        (verb, resource, namespace) for verb in ("get", "create", "update", "patch", "delete")
    ]
    denied += [("list", resource, "default"), ("list", resource, None)]
    denied += [(verb, "clusterkopfpeerings.kopf.dev", None) for verb in ("list", "watch", "patch")]
    check_grants(kubectl, platform, release, allowed=allowed, denied=denied)
    # patch only the peering object kopf was told to use (--peering), and only in its namespace.
    assert can_i(kubectl, platform, release, "patch", resource, namespace, name=PEERING)
    assert not can_i(kubectl, platform, release, "patch", resource, namespace, name="another")
    assert not can_i(kubectl, platform, release, "get", resource, namespace, name=PEERING)
    assert not can_i(kubectl, platform, release, "patch", resource, "default", name=PEERING)


def test_cluster_mode_peering_install_creates_the_cluster_kopf_peering_and_grants_patch_on_it_only(
    release: Release, kubectl: Path, platform: stack.Platform, api: client.ApiClient
) -> None:
    # Cluster-scoped, and other sessions may run this test at the same time: a name of its own.
    name = f"test-{uuid.uuid4().hex[:8]}"
    release.install(
        "--set", "rbac.scope=cluster", "--set", "peering.enabled=true", "--set", f"peering.name={name}"
    )
    peering = client.CustomObjectsApi(api).get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", name
    )
    assert peering["metadata"]["labels"]["app.kubernetes.io/instance"] == release.name
    resource = "clusterkopfpeerings.kopf.dev"
    allowed: list[tuple[str, str, str | None]] = [("list", resource, None), ("watch", resource, None)]
    denied: list[tuple[str, str, str | None]] = [
        (verb, resource, None) for verb in ("get", "create", "update", "patch", "delete")
    ]
    check_grants(kubectl, platform, release, allowed=allowed, denied=denied)
    assert can_i(kubectl, platform, release, "patch", resource, None, name=name)
    assert not can_i(kubectl, platform, release, "patch", resource, None, name="another")
    assert not can_i(kubectl, platform, release, "get", resource, None, name=name)


def test_webhook_certificate_survives_an_upgrade_and_is_renewed_for_new_names(
    release: Release, kubectl: Path, platform: stack.Platform, namespace: str, api: client.ApiClient
) -> None:
    # Namespace mode: the configuration reviews only this test's namespace, and Ignore lets a request
    # through while no operator answers (replicaCount 0): other tests on the platform never meet it.
    release.install(
        "--skip-crds", "--set", "rbac.scope=namespace", "--set", "webhook.enabled=true",
        "--set", "webhook.failurePolicy=Ignore", "--set", "webhook.certificate.mode=helm",
    )  # fmt: skip
    core, admission = client.CoreV1Api(api), client.AdmissionregistrationV1Api(api)
    fullname = f"{release.name}-idm-backup-operator"

    def installed() -> tuple[dict[str, str], client.V1ValidatingWebhookConfiguration]:
        secret = core.read_namespaced_secret(f"{fullname}-webhook-tls", namespace)
        assert secret.type == "kubernetes.io/tls"
        config = admission.read_validating_webhook_configuration(f"{fullname}-{namespace}")
        assert {w.client_config.ca_bundle for w in config.webhooks} == {secret.data["ca.crt"]}
        return secret.data, config

    data, config = installed()
    assert [w.name for w in config.webhooks] == [
        "validate.idmbackups.idm-backup.io",
        "validate.idmbackupschedules.idm-backup.io",
        "validate.idmrestores.idm-backup.io",
    ]
    for webhook in config.webhooks:
        assert webhook.client_config.service.name == f"{fullname}-webhook"
        assert webhook.namespace_selector.match_expressions[0].values == [namespace]
    # The webhook needs nothing more than the operator: the PVC storage it checks is the operator's own
    # mount, never a claim in the resource's namespace.
    check_grants(
        kubectl,
        platform,
        release,
        allowed=[("get", "secrets", namespace)],
        denied=[("get", "persistentvolumeclaims", namespace)],
    )  # fmt: skip
    # helm looks the Secret up on upgrade and keeps it: the caBundle does not change under the pods.
    release.upgrade()
    assert installed()[0] == data
    # Other names (a url): a certificate for them, and the caBundle follows.
    release.upgrade("--set", "webhook.url=https://127.0.0.1:9443")
    renewed, config = installed()
    assert renewed["ca.crt"] != data["ca.crt"] and renewed["tls.crt"] != data["tls.crt"]
    assert [w.client_config.url for w in config.webhooks] == [
        "https://127.0.0.1:9443/validate-idmbackup",
        "https://127.0.0.1:9443/validate-idmbackupschedule",
        "https://127.0.0.1:9443/validate-idmrestore",
    ]
    release.upgrade()
    assert installed()[0] == renewed


def test_webhook_operator_mode_runs_with_only_the_charts_rbac_and_keeps_its_certificate_through_upgrades(
    release: Release,
    kubectl: Path,
    platform: stack.Platform,
    namespace: str,
    api: client.ApiClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From helm certificate mode (the default before) to operator mode is an ordinary upgrade: the Secret
    keeps its type. The operator, as the chart's ServiceAccount with the Secret as its certificate
    directory (as the pod mounts it), makes its certificate and the API server calls it; later upgrades
    leave what it wrote alone."""
    port = processes.free_port()
    release.install(
        "--skip-crds", "--set", "rbac.scope=namespace", "--set", "webhook.enabled=true",
        "--set", "webhook.certificate.mode=helm", "--set", f"webhook.url=https://127.0.0.1:{port}",
    )  # fmt: skip
    core, admission = client.CoreV1Api(api), client.AdmissionregistrationV1Api(api)
    fullname = f"{release.name}-idm-backup-operator"
    secret_name, configuration = f"{fullname}-webhook-tls", f"{fullname}-{namespace}"

    def ca_bundles() -> list[str | None]:
        webhooks = admission.read_validating_webhook_configuration(configuration).webhooks
        return [w.client_config.ca_bundle for w in webhooks]

    release.upgrade("--set", "webhook.certificate.mode=operator")
    secret = core.read_namespaced_secret(secret_name, namespace)
    assert secret.type == "kubernetes.io/tls"
    assert set(secret.data) == {"tls.crt", "tls.key", "certificate.json"}  # helm mode's keys are gone
    assert ca_bundles() == [None] * len(WEBHOOK_OPERATIONS)
    cert_dir = tmp_path / "webhook-tls"
    cert_dir.mkdir()
    for key, value in secret.data.items():
        (cert_dir / key).write_bytes(base64.b64decode(value))
    kubeconfig = service_account_kubeconfig(api, platform, release, tmp_path / "operator.kubeconfig")
    monkeypatch.setenv("POD_NAMESPACE", namespace)
    (tmp_path / "pvc").mkdir()
    webhook_args = ["--webhook-port", str(port), "--webhook-address", "127.0.0.1", "--webhook-cert-dir"]
    operator = OperatorProcess(
        namespace,
        str(kubeconfig),
        tmp_path / "pvc",
        tmp_path / "operator.log",
        args=[*webhook_args, str(cert_dir)],
    )
    operator.start()

    def refused_by_the_webhook() -> bool:
        spec = backup_spec(
            platform, s3_storage(platform, "chart/own"), type="Data", target={"podName": "nowhere"}
        )
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IdmBackup",
            "metadata": {"name": "probe"},
            "spec": spec,
        }
        try:
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
            )
        except client.ApiException as err:
            return "denied the request" in (err.body or "")
        return False

    try:
        wait_for(
            "the webhook to answer through the API server", refused_by_the_webhook, timeout=60, interval=0.5
        )
        stored = core.read_namespaced_secret(secret_name, namespace).data
        assert set(stored) == {
            "tls.crt",
            "tls.key",
            "certificate.json",
            "ca.crt",
            "ca.key",
            "serving.crt",
            "serving.key",
        }
        assert ca_bundles() == [stored["ca.crt"]] * len(WEBHOOK_OPERATIONS)
        log = operator.output()
        for sign in ("Forbidden", "forbidden", "Not enough permissions", "(403)"):
            assert sign not in log, next(line for line in log.splitlines() if sign in line)
        # What that took, by name, and nothing around it.
        assert can_i(kubectl, platform, release, "update", "secrets", namespace, name=secret_name)
        for verb, ns, name in (
            ("update", namespace, "another"), ("delete", namespace, secret_name), ("create", namespace, None),
            ("get", "default", secret_name), ("update", "default", secret_name),
        ):  # fmt: skip
            assert not can_i(kubectl, platform, release, verb, "secrets", ns, name=name), (verb, ns, name)
        webhooks = "validatingwebhookconfigurations.admissionregistration.k8s.io"
        for verb in ("get", "patch"):
            assert can_i(kubectl, platform, release, verb, webhooks, None, name=configuration)
        for verb, name in (
            ("patch", "another"), ("get", "another"), ("update", configuration), ("delete", configuration),
            ("create", None), ("list", None),
        ):  # fmt: skip
            assert not can_i(kubectl, platform, release, verb, webhooks, None, name=name), (verb, name)
        # helm's three-way merge: what the chart never rendered stays as the operator wrote it.
        release.upgrade()
        assert core.read_namespaced_secret(secret_name, namespace).data == stored
        assert ca_bundles() == [stored["ca.crt"]] * len(WEBHOOK_OPERATIONS)
        assert refused_by_the_webhook()
    finally:
        operator.stop()


def kopf_paused(operator: OperatorProcess) -> bool:
    """Whether kopf holds the operator paused: with --peering it starts so, until it has seen its peers."""
    log = operator.output()
    return log.count("Resuming operations after the pause") <= log.count("Pausing operations in favour of")


def test_two_peered_operators_take_each_backup_once_and_the_standby_takes_over(
    release: Release,
    api: client.ApiClient,
    platform: stack.Platform,
    namespace: str,
    freeipa: Callable[..., str],
    secrets: None,
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release.install("--set", "rbac.scope=namespace", "--set", "peering.enabled=true")
    kubeconfig = str(service_account_kubeconfig(api, platform, release, tmp_path / "operator.kubeconfig"))
    freeipa()
    custom = client.CustomObjectsApi(api)
    operators: dict[str, OperatorProcess] = {}
    for pod in ("op-a", "op-b"):
        (tmp_path / pod).mkdir()
        operators[pod] = OperatorProcess(
            namespace, kubeconfig, tmp_path / pod, tmp_path / f"{pod}.log", args=["--peering", PEERING]
        )
    try:
        for pod, operator in operators.items():
            # kopf's identity in the KopfPeering, as the chart sets it to the pod's name: who is who.
            monkeypatch.setenv("POD_ID", pod)
            operator.start()

        def peers_now() -> dict[str, Any]:
            peering = custom.get_namespaced_custom_object(
                "kopf.dev", "v1", namespace, "kopfpeerings", PEERING
            )
            status: dict[str, Any] = peering.get("status") or {}
            return status

        def both_peers() -> dict[str, Any] | None:
            now = peers_now()
            return now if set(now) == set(operators) else None

        peers = wait_for("both operators' keep-alives in the KopfPeering", both_peers, timeout=60)
        # The higher priority (the earlier start) is the active one.
        active_id = max(peers, key=lambda pod: peers[pod]["priority"])
        active = operators[active_id]
        (standby,) = [operator for pod, operator in operators.items() if pod != active_id]
        # kopf pauses the operator first and its watch-streams a moment later: an IdmBackup created in
        # between still reaches the standby's handler (the server's Lease keeps it from a second
        # ipa-backup), so the test waits for the stream itself to pause.
        wait_for(
            "one active and one paused operator",
            lambda: (
                not kopf_paused(active)
                and kopf_paused(standby)
                and "Pausing the watch-stream for idmbackups" in standby.output()
            ),
            timeout=30,
        )

        prefix = f"peering/{namespace}"
        create_backup(
            api, namespace, "peered-1", backup_spec(platform, s3_storage(platform, prefix), type="Data")
        )
        obj = wait_finished(api, namespace, "peered-1", active)
        assert obj["status"]["phase"] == "Succeeded", (obj["status"], active.output()[-3000:])
        # Only the active one saw it: the standby's watch on IdmBackups stayed paused.
        assert "peered-1" in active.output()
        assert "peered-1" not in standby.output()
        assert "Pausing the watch-stream for idmbackups" in standby.output()
        assert kopf_paused(standby)

        # A stopped operator takes its entry out of the KopfPeering: the standby resumes at once, not
        # when the entry would expire (60 s; that is what happens after a SIGKILL).
        active.stop()
        wait_for("the standby to take over", lambda: not kopf_paused(standby), timeout=30)
        create_backup(
            api, namespace, "peered-2", backup_spec(platform, s3_storage(platform, prefix), type="Data")
        )
        obj = wait_finished(api, namespace, "peered-2", standby)
        assert obj["status"]["phase"] == "Succeeded", (obj["status"], standby.output()[-3000:])
        assert len(s3_keys(s3, platform.s3_bucket, prefix)) == 6  # two backups of three objects each

        # A replica started later (a rollout's new pod, a restarted one) waits instead of taking over
        # from the live active one, whose backups may be running.
        (tmp_path / "op-c").mkdir()
        monkeypatch.setenv("POD_ID", "op-c")
        operators["op-c"] = late = OperatorProcess(
            namespace, kubeconfig, tmp_path / "op-c", tmp_path / "op-c.log", args=["--peering", PEERING]
        )
        late.start()
        wait_for("the late replica's keep-alive", lambda: "op-c" in peers_now(), timeout=60)
        # kopf starts a peered operator paused and decides on every change of the peering object, so a
        # late replica that was going to take over would have resumed within moments.
        time.sleep(5)
        assert kopf_paused(late) and "Resuming operations" not in late.output()
        assert not kopf_paused(standby)
        (standby_id,) = [pod for pod in peers if pod != active_id]
        priorities = {pod: peer["priority"] for pod, peer in peers_now().items()}
        assert priorities["op-c"] < priorities[standby_id], priorities
        # Killed, the active one cannot take its entry out: the late replica resumes when it expires
        # (kopf's peering lifetime, 60 s), as after a node failure.
        killed_at = time.monotonic()
        standby.kill()
        wait_for("the late replica to take over", lambda: not kopf_paused(late), timeout=120)
        takeover = time.monotonic() - killed_at
        assert 30 < takeover < 100, takeover
        create_backup(
            api, namespace, "peered-3", backup_spec(platform, s3_storage(platform, prefix), type="Data")
        )
        obj = wait_finished(api, namespace, "peered-3", late)
        assert obj["status"]["phase"] == "Succeeded", (obj["status"], late.output()[-3000:])
        for operator in operators.values():
            log = operator.output()
            # The chart's RBAC is all kopf's peering needs.
            for sign in ("Forbidden", "forbidden", "Not enough permissions", "(403)"):
                assert sign not in log, next(line for line in log.splitlines() if sign in line)
    finally:
        for operator in operators.values():
            operator.stop()


# --- on the platform: kubeconform, the default roles, kubectl's columns, the helm test's check -----------

# Every value set the chart supports, rendered and checked by kubeconform.
VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "crds": ["--include-crds"],
    "namespace-mode": ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={identity,staging}"],
    "namespace-mode-no-discovery": [
        "--set", "rbac.scope=namespace", "--set", "rbac.clusterDiscovery=false",
    ],
    "peering-cluster": ["--set", "peering.enabled=true", "--set", "replicaCount=3"],
    "peering-namespace": [
        "--set", "peering.enabled=true", "--set", "replicaCount=2", "--set", "rbac.scope=namespace",
        "--set", "watchNamespaces={identity,staging}",
    ],
    "webhook-cert-manager": ["--set", "webhook.certificate.mode=certManager"],
    "webhook-helm": ["--set", "webhook.certificate.mode=helm"],
    "webhook-operator-url-client-ca": [
        "--set", "webhook.url=https://192.0.2.10:9443", "--set", "webhook.clientAuth.caBundle=Q0E=",
    ],
    "webhook-secret": [
        "--set", "webhook.certificate.mode=secret", "--set", "webhook.certificate.secretName=webhook-tls",
        "--set", "webhook.certificate.caBundle=Q0E=",
    ],
    "webhook-url": ["--set", "webhook.url=https://192.0.2.10:9443", "--set", "webhook.failurePolicy=Ignore"],
    "webhook-off-metrics-off": ["--set", "webhook.enabled=false", "--set", "metrics.enabled=false"],
    "everything-on": [
        *EVERYTHING_ON,
        *set_json({"metrics": {
            "serviceMonitor": {
                "honorLabels": False, "labels": {"release": "prometheus"},
                "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}],
                "metricRelabelings": [{"sourceLabels": ["__name__"], "regex": "go_.*", "action": "drop"}],
            },
            "prometheusRule": {
                "labels": {"release": "prometheus"}, "additionalLabels": {"team": "identity"},
                "extraRules": [
                    {"alert": "Extra", "expr": "vector(1)", "for": "5m", "labels": {"severity": "info"}},
                ],
            },
            "grafanaDashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "Backups"}},
        }}),
    ],
    "pod-options": [
        "--set", "logFormat=json", "--set", "verbose=true",
        "--set", "replicaCount=0", "--set", "tmp.medium=Memory",
        *set_json({
            "storage": {"pvcMounts": ["backups", {"claimName": "archive.claim", "namespaces": ["identity"]}]},
            "s3": {"ambientCredentials": True, "allowedEndpoints": ["s3.example.com", "minio:9000"]},
        }),
        *set_json({
            "extraArgs": ["--standalone"], "extraEnv": [{"name": "AWS_REGION", "value": "eu-central-1"}],
            "imagePullSecrets": [{"name": "registry"}], "podAnnotations": {"a": "b"}, "podLabels": {"c": "d"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "backup", "effect": "NoSchedule"},
            ],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [
                    {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                ]}},
            ]}},
            "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
            "priorityClassName": "system-cluster-critical",
        }),
    ],
    "no-rbac": [
        "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
        "--set", "serviceAccount.name=ops",
        "--set", "tests.enabled=false",
    ],
}  # fmt: skip


def _strict(schema: Any) -> Any:
    """kubeconform's -strict schemas: no fields beyond the documented ones, where the schema lists them;
    int-or-string and nullable as the API server reads them. Keys of properties are names, not keywords."""
    if not isinstance(schema, dict):
        return schema
    node: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions") and isinstance(value, dict):
            node[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            node[key] = [_strict(v) for v in value] if isinstance(value, list) else _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            node[key] = [_strict(v) for v in value]
        else:
            node[key] = value
    if node.pop("x-kubernetes-int-or-string", None) is True:
        node = {k: v for k, v in node.items() if k not in ("type", "format")}
        node["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if node.pop("nullable", None) is True and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and node.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        node["additionalProperties"] = False
    return node


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"].rsplit("/", 1)[-1]
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def write_kubeconform_schemas(openapi: dict[str, Any], crd_files: list[Path], out: Path) -> str:
    """JSON schemas in kubeconform's layout, from the API server's OpenAPI v2 and from CRD files; the
    -schema-location template that finds them."""

    def write(api_version: str, kind: str, schema: dict[str, Any]) -> None:
        group, _, version = api_version.rpartition("/")
        path = out / (group or version) / f"{kind.lower()}_{version}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", **schema}))

    definitions = {name: _strict(d) for name, d in openapi["definitions"].items()}
    # Types the OpenAPI document spells as strings, which manifests also write as numbers.
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {
        "oneOf": [{"type": "string"}, {"type": "integer"}]
    }
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {
        "oneOf": [{"type": "string"}, {"type": "number"}]
    }
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            reachable, todo = set(), [name]
            while todo:
                current = todo.pop()
                if current not in reachable:
                    reachable.add(current)
                    todo += list(_references(definitions[current]))
            schema = {"$ref": f"#/definitions/{name}", "definitions": {r: definitions[r] for r in reachable}}
            group = gvk["group"]
            write(f"{group}/{gvk['version']}" if group else gvk["version"], gvk["kind"], schema)
    for path in crd_files:
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {}).update(
                {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
            )
            write(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"], schema)
    return str(out) + "/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"


@pytest.fixture(scope="session")
def kubeconform() -> Path:
    """kubeconform, built by testbed/build.sh (a no-op once cached)."""
    bin_dir = stack.build("kubeconform")
    path = Path((bin_dir.parent / "kubeconform.path").read_text().strip()) / "kubeconform"
    assert path.is_file(), path
    return path


def third_party_crds() -> list[Path]:
    """The Prometheus Operator's and cert-manager's CRDs, generated by testbed/build.sh crds."""
    bin_dir = stack.build("crds")
    directories = [Path(line) for line in (bin_dir.parent / "crds.path").read_text().split()]
    return sorted(p for d in directories for p in d.glob("*.yaml"))


def test_kubeconform_accepts_every_rendered_value_set(
    helm: Callable[..., str], kubectl: Path, kubeconform: Path, platform: stack.Platform, tmp_path: Path
) -> None:
    raw = subprocess.run(
        [str(kubectl), "--kubeconfig", platform.kubeconfig, "get", "--raw", "/openapi/v2"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    crds = sorted((REPO / "crds").rglob("*.yaml")) + third_party_crds()
    kinds = {yaml.safe_load(p.read_text())["spec"]["names"]["kind"] for p in crds}
    assert {"ServiceMonitor", "PrometheusRule", "Issuer", "Certificate", "ClusterKopfPeering"} <= kinds
    location = write_kubeconform_schemas(json.loads(raw), crds, tmp_path / "schemas")
    checked: dict[str, set[str]] = {}
    for name, args in VALUE_SETS.items():
        docs = render(helm, *args)
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        result = subprocess.run(
            [
                str(kubeconform), "-strict", "-summary", "-output", "json", "-kubernetes-version",
                KUBE_VERSION.removeprefix("v"), "-schema-location", location, str(manifest),
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
        summary = json.loads(result.stdout)["summary"]
        # Every document was checked against a schema: none skipped, none without one.
        assert summary == {"valid": len(docs), "invalid": 0, "errors": 0, "skipped": 0}, (name, summary)
        checked[name] = {d["kind"] for d in docs}
    assert set().union(*checked.values()) >= {
        "Deployment", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
        "Secret", "ValidatingWebhookConfiguration", "Issuer", "Certificate", "ServiceMonitor",
        "PrometheusRule", "ConfigMap", "Pod", "PodDisruptionBudget", "ClusterKopfPeering", "KopfPeering",
        "CustomResourceDefinition",
    }  # fmt: skip


def test_kubeconform_refuses_what_the_api_server_would(
    kubectl: Path, kubeconform: Path, platform: stack.Platform, tmp_path: Path
) -> None:
    """The schemas are strict: an unknown field, a wrong type and a ServiceMonitor field that does not
    exist are refused (so the acceptance above means something)."""
    raw = subprocess.run(
        [str(kubectl), "--kubeconfig", platform.kubeconfig, "get", "--raw", "/openapi/v2"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    location = write_kubeconform_schemas(json.loads(raw), third_party_crds(), tmp_path / "schemas")
    bad = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"portz": []}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"},
         "spec": {"ports": [{"port": "x"}]}},
        {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "c"},
            "spec": {"selector": {}, "endpoints": [{"port": "metrics", "honourLabels": True}]},
        },
    ]  # fmt: skip
    for doc in bad:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
        result = subprocess.run(
            [str(kubeconform), "-strict", "-schema-location", location, str(tmp_path / "bad.yaml")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1 and "is invalid" in result.stdout, (doc, result.stdout, result.stderr)


def user_can(
    kubectl: Path, platform: stack.Platform, user: str, verb: str, resource: str, namespace: str
) -> bool:
    argv = [str(kubectl), "--kubeconfig", platform.kubeconfig, "auth", "can-i", verb]
    resource, _, subresource = resource.partition("/")
    argv += [resource, f"--subresource={subresource}", f"--as={user}", "-n", namespace]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.stdout.strip() in ("yes", "no"), (argv, out.stdout, out.stderr)
    return out.stdout.strip() == "yes"


def test_view_and_edit_users_get_the_resources_through_aggregation(
    release: Release, kubectl: Path, platform: stack.Platform, api: client.ApiClient, namespace: str
) -> None:
    release.install("--skip-crds")
    rbac = client.RbacAuthorizationV1Api(api)
    users = {"vera": "view", "eddie": "edit", "ada": "admin"}
    for user, role in users.items():
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": f"{user}-{role}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            },
        )
    backups, schedules = "idmbackups.idm-backup.io", "idmbackupschedules.idm-backup.io"
    restores = "idmrestores.idm-backup.io"
    kinds = (backups, schedules, restores)
    # The controller-manager aggregates the rules into view/edit/admin; wait for it and the authorizer.
    wait_for(
        "the aggregated rules",
        lambda: user_can(kubectl, platform, "eddie", "create", backups, namespace),
        timeout=30,
    )
    reading = [(verb, kind) for verb in ("get", "list", "watch") for kind in kinds]
    reading += [("get", f"{restores}/status")]
    writing = [(verb, kind) for verb in ("create", "update", "patch", "delete") for kind in kinds]
    writing += [("deletecollection", backups), ("deletecollection", restores)]
    status = [("patch", f"{backups}/status"), ("update", f"{schedules}/status")]
    status += [("patch", f"{restores}/status"), ("update", f"{restores}/status")]
    expected = {
        "vera": {**dict.fromkeys(reading, True), **dict.fromkeys(writing, False)},
        "eddie": {**dict.fromkeys(reading, True), **dict.fromkeys(writing, True)},
        "ada": {**dict.fromkeys(reading, True), **dict.fromkeys(writing, True)},
    }
    for user, verbs in expected.items():
        got = {key: user_can(kubectl, platform, user, *key, namespace) for key in verbs}
        assert got == verbs, user
        # Status is the operator's; and a RoleBinding reaches no other namespace.
        assert not any(user_can(kubectl, platform, user, *key, namespace) for key in status), user
        assert not user_can(kubectl, platform, user, "list", backups, "default"), user
        assert not user_can(kubectl, platform, user, "create", restores, "default"), user
    # The webhook's Secret check passes for edit (it may read Secrets), not for view.
    assert user_can(kubectl, platform, "eddie", "get", "secrets", namespace)
    assert not user_can(kubectl, platform, "vera", "get", "secrets", namespace)
    # Uninstalled: the roles go, and with them the users' access.
    release.uninstall()
    wait_for(
        "the rules to go",
        lambda: not user_can(kubectl, platform, "eddie", "create", backups, namespace),
        timeout=30,
    )


def kubectl_table(
    kubectl: Path, platform: stack.Platform, namespace: str, *args: str
) -> list[dict[str, str]]:
    """`kubectl get` as rows of {column: cell}, cut at the header's column starts."""
    out = subprocess.run(
        [str(kubectl), "--kubeconfig", platform.kubeconfig, "-n", namespace, "get", *args],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    header = out[0]
    starts = [m.start() for m in re.finditer(r"(?:(?<=  )|^)[A-Z][A-Z ]*?(?=  |$)", header)]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return [
        {n: line[a:b].strip() for n, a, b in zip(names, starts, [*starts[1:], None], strict=True)}
        for line in out[1:]
    ]


def test_kubectl_get_shows_why_a_backup_failed_and_whether_a_schedule_fails(
    api: client.ApiClient, kubectl: Path, platform: stack.Platform, crds: None, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api)
    uri = f"s3://{platform.s3_bucket}/cols/{namespace}/ipa.example.test/ipa-data-2026-11-26-02-00-03/ipa-data.tar.gpg"
    statuses: dict[str, dict[str, Any]] = {
        "good": {
            "phase": "Succeeded", "step": "done", "reason": "BackupSucceeded", "message": f"stored {uri}",
            "target": {"pod": "ipa-hidden", "host": "ipa.example.test"},
            "archive": {
                "name": "ipa.example.test/ipa-data-2026-11-26-02-00-03", "uri": uri, "size": "12.0 MiB",
                "sizeBytes": 12582912,
            },
        },
        "bad": {
            "phase": "Failed", "step": "uploading 12.0 MiB to s3://idm-backups/cols",
            "reason": "UploadFailed", "message": "S3 refused the part: AccessDenied",
            "target": {"pod": "ipa-hidden", "host": "ipa.example.test"},
        },
        "busy": {"phase": "Running", "step": "ipa-backup: Backing up ipaca in EXAMPLE-TEST to LDIF"},
    }  # fmt: skip
    for name, status in statuses.items():
        create_backup(api, namespace, name, backup_spec(platform, s3_storage(platform, "cols"), type="Data"))
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )
    rows = {r["NAME"]: r for r in kubectl_table(kubectl, platform, namespace, "idmbackups")}
    assert list(rows["good"]) == [
        "NAME",
        "PHASE",
        "TYPE",
        "TARGET",
        "REASON",
        "STEP",
        "SIZE",
        "ARCHIVE",
        "AGE",
    ]
    assert {k: rows["good"][k] for k in ("PHASE", "REASON", "STEP", "SIZE", "ARCHIVE")} == {
        "PHASE": "Succeeded", "REASON": "BackupSucceeded", "STEP": "done", "SIZE": "12.0 MiB",
        "ARCHIVE": "ipa.example.test/ipa-data-2026-11-26-02-00-03",
    }  # fmt: skip
    assert (rows["bad"]["REASON"], rows["bad"]["STEP"]) == ("UploadFailed", statuses["bad"]["step"])
    assert (rows["busy"]["PHASE"], rows["busy"]["STEP"]) == ("Running", statuses["busy"]["step"])
    wide = {r["NAME"]: r for r in kubectl_table(kubectl, platform, namespace, "idmbackups", "-o", "wide")}
    assert list(wide["good"])[-3:] == ["AGE", "URI", "MESSAGE"]
    assert wide["good"]["URI"] == uri and wide["bad"]["MESSAGE"] == statuses["bad"]["message"]

    template = {"spec": backup_spec(platform, s3_storage(platform, "cols"), type="Data")}
    now = "2026-11-26T02:10:00Z"
    schedule_statuses = {
        "failing": [
            {"type": "Ready", "status": "True", "reason": "Scheduled", "message": "next backup at x",
             "lastTransitionTime": now},
            {"type": "LastBackupSucceeded", "status": "False", "reason": "Failed",
             "message": "2 failed in a row", "lastTransitionTime": now},
        ],
        "fine": [
            {"type": "Ready", "status": "True", "reason": "Scheduled", "message": "next backup at y",
             "lastTransitionTime": now},
            {"type": "LastBackupSucceeded", "status": "True", "reason": "Succeeded", "message": "fine-1",
             "lastTransitionTime": now},
        ],
        "invalid": [
            {"type": "Ready", "status": "False", "reason": "InvalidTemplate",
             "message": "the API server refused", "lastTransitionTime": now},
        ],
    }  # fmt: skip
    for name, conditions in schedule_statuses.items():
        create_schedule(api, namespace, name, {"schedule": "0 2 * * *", "template": template})
        status = {"conditions": conditions, "consecutiveFailures": 2 if name == "failing" else 0}
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "idmbackupschedules", name, {"status": status}
        )
    rows = {r["NAME"]: r for r in kubectl_table(kubectl, platform, namespace, "idmbackupschedules")}
    assert list(rows["fine"]) == [
        "NAME", "SCHEDULE", "SUSPENDED", "READY", "LAST RESULT", "LAST SUCCESS", "NEXT RUN", "DRILL", "AGE",
    ]  # fmt: skip
    got = {name: (row["READY"], row["LAST RESULT"]) for name, row in rows.items()}
    assert got == {"failing": ("True", "Failed"), "fine": ("True", "Succeeded"), "invalid": ("False", "")}
    wide = {
        r["NAME"]: r for r in kubectl_table(kubectl, platform, namespace, "idmbackupschedules", "-o", "wide")
    }
    assert wide["failing"]["FAILURES"] == "2"
    assert (wide["invalid"]["REASON"], wide["invalid"]["MESSAGE"]) == (
        "InvalidTemplate",
        "the API server refused",
    )


def test_kubectl_get_shows_a_restores_phase_source_target_and_duration(
    api: client.ApiClient, kubectl: Path, platform: stack.Platform, crds: None, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api)
    storage = s3_storage(platform, "cols")
    directory = f"{namespace}/ipa.example.test/ipa-data-2026-11-26-02-00-03/"
    uri = f"s3://{platform.s3_bucket}/cols/{directory}ipa-data.tar.gpg"
    spec = {
        "source": {"location": {"storage": storage, "directory": directory}},
        "target": backup_spec(platform, storage)["target"],
        "confirm": "ipa.example.test",
    }
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IdmRestore",
        "metadata": {"name": "back"},
        "spec": spec,
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "idmrestores", body)
    status = {
        "phase": "Failed", "step": "check", "reason": "EntryCountMismatch", "durationSeconds": 95.5,
        "message": "userRoot: 1203 entries in the archive, 1180 after the restore",
        "target": {"pod": "ipa-hidden", "host": "ipa.example.test"}, "source": {"uri": uri},
    }  # fmt: skip
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "idmrestores", "back", {"status": status}
    )
    (row,) = kubectl_table(kubectl, platform, namespace, "idmr")
    assert row == {
        "NAME": "back", "PHASE": "Failed", "SOURCE": uri, "TARGET": "ipa.example.test", "DURATION": "95.5",
        "AGE": row["AGE"],
    }  # fmt: skip
    (wide,) = kubectl_table(kubectl, platform, namespace, "idmrestores", "-o", "wide")
    assert list(wide)[-2:] == ["AGE", "REASON"] and wide["REASON"] == "EntryCountMismatch"


def test_the_helm_test_pods_check_passes_against_a_running_operator_and_fails_without(
    helm: Callable[..., str],
    platform: stack.Platform,
    crds: None,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test pod cannot run here (no image): its script runs locally, as the pod would run it, against
    a real operator's metrics endpoint."""
    (pod,) = of_kind(render(helm), "Pod")
    (container,) = pod["spec"]["containers"]
    (script,) = container["args"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = processes.free_port()
    monkeypatch.setenv("IDM_BACKUP_METRICS_PORT", str(port))
    monkeypatch.setenv("IDM_BACKUP_METRICS_ADDRESS", "127.0.0.1")
    (tmp_path / "pvc").mkdir()
    operator = OperatorProcess(namespace, platform.kubeconfig, tmp_path / "pvc", tmp_path / "operator.log")

    def check(timeout: str) -> subprocess.CompletedProcess[str]:
        url = env["METRICS_URL"].replace("rel-idm-backup-operator-metrics.ops.svc:9090", f"127.0.0.1:{port}")
        return subprocess.run(
            [sys.executable, *container["command"][1:], script],
            env={"METRICS_URL": url, "TIMEOUT_SECONDS": timeout}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    operator.start()
    try:
        # Started at the same time as the operator, as after an install: it waits for the endpoint.
        result = check(env["TIMEOUT_SECONDS"])
        assert result.returncode == 0, (result.stdout, result.stderr, operator.output()[-2000:])
        assert result.stdout.startswith(f"ok: http://127.0.0.1:{port}/metrics answers: idm_backup_slots "), (
            result.stdout
        )
    finally:
        operator.stop()
    result = check("3")
    assert result.returncode == 1 and result.stderr.startswith("failed: "), (result.stdout, result.stderr)
