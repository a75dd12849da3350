"""Fixtures for tests on the local platform (testbed/): real API server, node, S3 and LDAP.

The platform starts once per session, or is reused if a developer already started it with
`python -m testbed up`; it is stopped at the end only if this session started it. Each test gets a fresh
namespace, deleted afterwards.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from kubernetes import client, config

from testbed import freeipa_pod, stack
from testbed.deploy import OperatorProcess, drop_finalizers, install_crds
from testbed.gpgkeys import ExportedKey, Keyring
from tests.helpers import (
    KEY_SECRET,
    S3_SECRET,
    Backup,
    apply,
    create_backup,
    create_test_namespace,
    pod_ready,
    wait_finished,
    wait_for,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the platform, through any fixture, is marked `platform`, so that
    `-m "not platform"` never starts it: by the fixtures it needs, not by hand."""
    for item in items:
        if "platform" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.platform)


@pytest.fixture(scope="session")
def platform() -> Iterator[stack.Platform]:
    already_up = stack.is_up()
    plat = stack.up()
    os.environ["KUBECONFIG"] = plat.kubeconfig
    yield plat
    if not already_up and not os.environ.get("IDM_TESTBED_KEEP"):
        stack.down()


@pytest.fixture(scope="session")
def api(platform: stack.Platform) -> client.ApiClient:
    return config.new_client_from_config(config_file=platform.kubeconfig)


@pytest.fixture
def namespace(api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    # Short: a FreeIPA pod's FQDN (host.subdomain.<namespace>.svc.cluster.local) must fit in 64
    # characters, or the kubelet refuses to start it, as a real one does.
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower().removeprefix("test_"))[:16].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    create_test_namespace(api, name)
    yield name
    drop_finalizers(api, name)  # the test's operator is gone by now
    client.CoreV1Api(api).delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def freeipa(api: client.ApiClient, namespace: str, platform: stack.Platform) -> Callable[..., str]:
    """Create a ready stand-in FreeIPA pod for a host of the LDAP topology; returns the pod name."""
    apply(api, namespace, freeipa_pod.dm_password_secret(platform.ldap_password))

    def create(host: str = "ipa-hidden.example.test", name: str | None = None, **kwargs: Any) -> str:
        pod_name = name or host.split(".", 1)[0]
        apply(
            api,
            namespace,
            freeipa_pod.data_claim(f"{pod_name}-data"),
            freeipa_pod.freeipa_pod(pod_name, host, platform.ldap_uri, **kwargs),
        )
        wait_for(f"pod {pod_name} ready", lambda: pod_ready(api, namespace, pod_name), timeout=60)
        return pod_name

    return create


@pytest.fixture(scope="session")
def crds(api: client.ApiClient) -> None:
    install_crds(api)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def operator(
    platform: stack.Platform, crds: None, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    pvc_root = tmp_path / "pvc"
    pvc_root.mkdir()
    proc = OperatorProcess(namespace, platform.kubeconfig, pvc_root, tmp_path / "operator.log")
    proc.start()
    yield proc
    proc.stop()
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        # A failed test's assertion rarely says why the operator did what it did; its log does. Printed
        # in teardown, pytest shows it under the failure.
        print(f"--- operator log (last 6000 characters) ---\n{proc.output()[-6000:]}")


@pytest.fixture
def run_backup(api: client.ApiClient, namespace: str, operator: OperatorProcess, secrets: None) -> Backup:
    """Create an IdmBackup and wait until the test's operator has finished it."""

    def run(name: str, spec: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
        create_backup(api, namespace, name, spec)
        return wait_finished(api, namespace, name, operator, timeout)

    return run


@pytest.fixture(scope="session")
def backup_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExportedKey]:
    """The key pair of the person who will restore: the operator only ever sees its public half."""
    home = tmp_path_factory.mktemp("restore-gnupg")
    home.chmod(0o700)
    ring = Keyring(home)
    yield ring.export(ring.make("IdM Restore <restore@example.test>"))
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


@pytest.fixture
def s3(platform: stack.Platform) -> Any:
    """A client of the platform's S3 server."""
    return boto3.client(
        "s3",
        endpoint_url=platform.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=platform.s3_access_key,
        aws_secret_access_key=platform.s3_secret_key,
    )


@pytest.fixture
def secrets(api: client.ApiClient, namespace: str, platform: stack.Platform, backup_key: ExportedKey) -> None:
    apply(
        api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": S3_SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": platform.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": platform.s3_secret_key,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": KEY_SECRET},
            "data": {"restore.asc": base64.b64encode(backup_key.armored).decode()},
        },
    )


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return stack.helm_binary()


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
