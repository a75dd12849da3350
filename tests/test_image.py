"""What can be checked of the container image without Docker: its install steps and its entry point.

The Dockerfile's steps are repeated in a clean virtualenv (no system site-packages, nothing from the
development venv), and the operator runs from it as the image runs it: as uid 65532 with HOME and TMPDIR
in a scratch directory, with nothing writable elsewhere. It then takes an encrypted backup on the
platform, which proves gpg and the S3 client work for a user without a home directory.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from testbed import stack
from testbed.deploy import REPO
from tests.helpers import backup_spec, create_backup, s3_storage, wait_finished, wait_for

IMAGE_UID = 65532


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """A stand-in for the image's file system: pytest's own temporary directories are private to root,
    and the image's user must be able to reach its venv and its /tmp."""
    root = Path(tempfile.mkdtemp(prefix="idm-image-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def image_venv(image_root: Path) -> Path:
    """/opt/venv of the image: `pip install .` of the repository into a fresh virtualenv."""
    venv = image_root / "venv"
    # What the Dockerfile copies, and only that: pip builds in the source tree, which must stay clean.
    source = image_root / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "operator", source / "operator", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
        check=True,
        env=env,
        timeout=900,
        capture_output=True,
    )
    return venv


def test_the_dockerfile_installs_the_package_this_way_and_runs_it_as_65532() -> None:
    # The steps the fixture repeats; if the Dockerfile changes them, this test must change with it.
    dockerfile = _dockerfile()
    assert "RUN python -m venv /opt/venv" in dockerfile
    assert "pip install --no-deps ." in dockerfile
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile
    assert 'ENTRYPOINT ["idm-backup-operator"]' in dockerfile
    assert re.search(r"HOME=/tmp\b", dockerfile) and re.search(r"TMPDIR=/tmp\b", dockerfile)
    assert re.search(r"USER=operator\b", dockerfile)


def test_the_clean_install_has_the_entry_point_and_nothing_from_the_development_venv(
    image_venv: Path,
) -> None:
    version = subprocess.run(
        [str(image_venv / "bin" / "idm-backup-operator"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    project = (REPO / "pyproject.toml").read_text()
    expected = re.search(r'^version = "([^"]+)"', project, re.MULTILINE)
    assert expected is not None
    assert version.strip() == f"idm-backup-operator {expected.group(1)}"
    installed = subprocess.run(
        [str(image_venv / "bin" / "pip"), "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    for runtime in (
        "kopf==",
        "kubernetes==",
        "python-ldap==",
        "python-gnupg==",
        "boto3==",
        "prometheus_client==",
    ):
        assert runtime in installed
    for development in ("pytest", "mypy", "ruff", "moto"):
        assert development not in installed


def _kubeconfig_with_embedded_credentials(platform: stack.Platform, path: Path) -> None:
    """The image's user cannot read the platform's root-owned key files: the kubeconfig carries them."""
    config = yaml.safe_load(Path(platform.kubeconfig).read_text())
    for entry, fields in (
        ("clusters", ("certificate-authority",)),
        ("users", ("client-certificate", "client-key")),
    ):
        for item in config[entry]:
            inner = item["cluster" if entry == "clusters" else "user"]
            for field in fields:
                inner[f"{field}-data"] = base64.b64encode(Path(inner.pop(field)).read_bytes()).decode()
    path.write_text(yaml.safe_dump(config))


@pytest.fixture
def image_operator(
    image_root: Path, image_venv: Path, platform: stack.Platform, crds: None, namespace: str, tmp_path: Path
) -> Iterator[Any]:
    scratch = image_root / f"tmp-{namespace}"  # the image's /tmp emptyDir
    scratch.mkdir()
    kubeconfig = scratch / "kubeconfig"
    _kubeconfig_with_embedded_credentials(platform, kubeconfig)
    os.chown(scratch, IMAGE_UID, IMAGE_UID)
    os.chown(kubeconfig, IMAGE_UID, IMAGE_UID)
    port = 18080 + os.getpid() % 1000
    env = {
        "PATH": f"{image_venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(scratch),
        "USER": "operator",  # as the image sets it: uid 65532 has no passwd entry here either
        "TMPDIR": str(scratch),
        "PYTHONUNBUFFERED": "1",
        "KUBECONFIG": str(kubeconfig),
        "IDM_BACKUP_METRICS_PORT": "0",
    }
    log = tmp_path / "operator.log"
    argv = [
        "setpriv",
        f"--reuid={IMAGE_UID}",
        f"--regid={IMAGE_UID}",
        "--clear-groups",
        str(image_venv / "bin" / "idm-backup-operator"),
        "run",
        "--namespace",
        namespace,
        "--liveness",
        f"http://127.0.0.1:{port}/healthz",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=scratch)

    class Running:
        def output(self) -> str:
            return log.read_text(errors="replace")

    running = Running()

    def alive() -> bool:
        assert proc.poll() is None, running.output()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_for("the image's operator to answer its liveness probe", alive, timeout=60, interval=0.5)
        yield running
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_the_installed_operator_runs_as_the_images_user_and_takes_an_encrypted_backup(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    freeipa: Any,
    secrets: None,
    image_operator: Any,
) -> None:
    freeipa()
    spec = backup_spec(platform, s3_storage(platform, f"image/{namespace}"), type="Data", online=True)
    create_backup(api, namespace, "from-image", spec)
    status = wait_finished(api, namespace, "from-image", image_operator)["status"]
    assert status["phase"] == "Succeeded", (status, image_operator.output()[-3000:])
    assert status["archive"]["uri"].endswith("ipa-data.tar.gpg")
    assert status["archive"]["encrypted"] is True and status["archive"]["recipients"]
