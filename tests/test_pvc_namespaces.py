"""Which namespaces may use which mounted claim (the chart's storage.pvcMounts, IDM_BACKUP_PVC_NAMESPACES).

One function decides it, `references.check_claim_namespace`; the webhook's reference checks and the
store a backup or restore opens both reach it through `references.pvc_mount`, so each is checked here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from idm_backup_operator.api.names import GROUP, IDMBACKUPS, VERSION
from idm_backup_operator.api.spec import PvcStorage
from idm_backup_operator.idmbackup import validation
from idm_backup_operator.kube import references
from idm_backup_operator.storage import PVCStore
from testbed import stack
from testbed.deploy import OperatorProcess
from tests.helpers import Backup, backup_spec, event_messages, wait_deleted

ENV = references.PVC_NAMESPACES_ENV
# No request is ever sent: a PVC's checks read only the operator's own file system.
UNUSED_CORE = client.CoreV1Api(client.ApiClient())


@pytest.fixture
def pvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for claim in ("shared", "team-only"):
        (tmp_path / claim).mkdir()
    monkeypatch.setenv(ENV, json.dumps({"team-only": ["team-a", "team-b"]}))
    return tmp_path


REFUSED = (
    "PVC team-only may be used only from namespaces team-a, team-b, not from elsewhere "
    "(the Helm chart's storage.pvcMounts)"
)


def test_unset_every_namespace_may_use_every_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert references.claim_namespaces() == {}
    references.check_claim_namespace("team-only", "elsewhere")
    monkeypatch.setenv(ENV, "  ")
    assert references.claim_namespaces() == {}


def test_a_listed_claim_is_only_for_its_namespaces_and_the_others_for_all(pvc_root: Path) -> None:
    assert references.claim_namespaces() == {"team-only": ("team-a", "team-b")}
    for namespace in ("team-a", "team-b"):
        references.check_claim_namespace("team-only", namespace)
    references.check_claim_namespace("shared", "elsewhere")
    with pytest.raises(references.ResolveError) as refused:
        references.check_claim_namespace("team-only", "elsewhere")
    assert str(refused.value) == REFUSED


def test_one_namespace_is_named_in_the_singular(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, json.dumps({"team-only": ["team-a"]}))
    with pytest.raises(references.ResolveError) as refused:
        references.check_claim_namespace("team-only", "elsewhere")
    assert str(refused.value).startswith("PVC team-only may be used only from namespace team-a, not from ")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("{team-only: [team-a]}", "is not JSON"),
        ('["team-only"]', "is not an object of claim names to lists of namespaces"),
        ('{"team-only": "team-a"}', "is not an object of claim names to lists of namespaces"),
        ('{"team-only": [1]}', "is not an object of claim names to lists of namespaces"),
    ],
)
def test_a_mapping_that_cannot_be_read_lets_no_namespace_use_any_claim(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv(ENV, value)
    for claim in ("team-only", "shared"):
        with pytest.raises(references.ResolveError) as refused:
            references.check_claim_namespace(claim, "team-a")
        assert str(refused.value).startswith(f"{ENV} {problem}")
        assert str(refused.value).endswith("no PVC may be used")


def test_the_store_a_backup_or_restore_opens_is_refused_before_the_volume_is_looked_at(
    pvc_root: Path, tmp_path: Path
) -> None:
    def opened(claim: str, namespace: str) -> object:
        return references.open_store(
            UNUSED_CORE, namespace, PvcStorage(claim, "prod"), pvc_root, tmp_path, ambient_credentials=False
        )

    assert isinstance(opened("team-only", "team-a"), PVCStore)
    assert isinstance(opened("shared", "elsewhere"), PVCStore)
    with pytest.raises(references.ResolveError) as refused:
        opened("team-only", "elsewhere")
    assert str(refused.value) == REFUSED
    # Whether a claim given to others is mounted is not told to a namespace that may not use it (and the
    # refusals above wrote nothing there: rmdir takes only an empty directory).
    (pvc_root / "team-only").rmdir()
    with pytest.raises(references.ResolveError) as unmounted:
        references.pvc_mount(PvcStorage("team-only", ""), pvc_root, "elsewhere")
    assert str(unmounted.value) == REFUSED


def test_the_webhooks_check_names_the_field_and_the_namespaces_allowed(pvc_root: Path) -> None:
    def problems(namespace: str) -> list[str]:
        where = validation.ReferenceScope(UNUSED_CORE, namespace, pvc_root, ambient_s3_credentials=False)
        checks = validation.storage_checks(PvcStorage("team-only", ""), "spec.storage", where)
        return validation.check_problems(checks, set())

    assert problems("team-b") == []
    assert problems("elsewhere") == [f"spec.storage.pvc.claimName: {REFUSED}"]


def test_a_claim_taken_from_the_namespace_later_leaves_its_files_and_lets_the_backup_go(
    api: client.ApiClient,
    namespace: str,
    platform: stack.Platform,
    operator: OperatorProcess,
    run_backup: Backup,
    freeipa: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An administrator gives a claim to other namespaces after this one stored backups on it. Deleting
    such a Delete-policy backup is a use of the claim, so its files stay; but the finalizer must not hold
    the IdmBackup (and so the namespace) for ever: it goes, and a Warning Event says what was left."""
    freeipa()
    (operator.pvc_root / "backups").mkdir()
    stored = run_backup(
        "kept",
        backup_spec(
            platform, {"pvc": {"claimName": "backups"}}, type="Data", online=True, deletionPolicy="Delete"
        ),
    )["status"]
    assert stored["phase"] == "Succeeded", stored
    archive = Path(stored["archive"]["uri"])
    files = sorted(p.name for p in archive.parent.iterdir())
    assert files == ["header", "ipa-data.tar.gpg", "manifest.json"]

    operator.stop()
    monkeypatch.setenv(ENV, json.dumps({"backups": ["someone-else"]}))
    operator.start()
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, IDMBACKUPS, "kept"
    )
    wait_deleted(api, namespace, "kept")

    assert event_messages(api, namespace, "kept", "StoredBackupNotDeleted") == [
        "cannot delete the stored backup: PVC backups may be used only from namespace someone-else, "
        f"not from {namespace} (the Helm chart's storage.pvcMounts)"
    ]
    assert sorted(p.name for p in archive.parent.iterdir()) == files
