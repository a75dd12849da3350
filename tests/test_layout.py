"""The storage layout's guarantee: no two namespaces ever write the same key, whatever their prefixes."""

from __future__ import annotations

import datetime
from pathlib import PurePosixPath

import pytest

from idm_backup_operator.archive import layout
from idm_backup_operator.freeipa import BackupDirectory, BackupType

DIRECTORY = BackupDirectory(
    PurePosixPath("/var/lib/ipa/backup/ipa-data-2026-11-28-02-00-00"),
    BackupType.DATA,
    datetime.datetime(2026, 11, 28, 2, 0, 0),
)


def _key(prefix: str, namespace: str, host: str) -> str:
    # As the stores join them: the prefix, then the layout's own keys.
    return f"{prefix}/{layout.backup_keys(namespace, host, DIRECTORY, encrypted=True).archive}"


@pytest.mark.parametrize(
    ("prefix", "namespace", "host"),
    [
        ("acc", "hv-a", "ipa.example.test"),
        # Namespace hv-b borrows hv-a's tree as its prefix: its files land inside it, under its own name.
        ("acc/hv-a", "hv-b", "ipa.example.test"),
        ("acc/hv-a/ipa.example.test", "hv-b", "ipa.example.test"),
        ("acc/hv-a/ipa.example.test/ipa-data-2026-11-28-02-00-00", "hv-b", "x.example.test"),
    ],
)
def test_the_third_segment_from_the_end_is_always_the_writers_namespace(
    prefix: str, namespace: str, host: str
) -> None:
    segments = _key(prefix, namespace, host).split("/")
    assert segments[-4:] == [namespace, host, DIRECTORY.path.name, "ipa-data.tar.gpg"]


def test_a_borrowed_prefix_never_reproduces_another_namespaces_key() -> None:
    own = _key("acc", "hv-a", "ipa.example.test")
    borrowed = {
        _key(prefix, "hv-b", host)
        for prefix in ("acc", "acc/hv-a", "acc/hv-a/ipa.example.test", "")
        for host in ("ipa.example.test", "hv-a.example.test")
    }
    assert own not in borrowed
