"""Recipient key validation and streaming encryption, against the real gpg binary with freshly made keys."""

import dataclasses
import io
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from idm_backup_operator.archive.encryption import (
    GpgError,
    KeyMaterialError,
    decrypt,
    encrypt,
    load_recipients,
)
from testbed.gpgkeys import ExportedKey, Keyring

PASSPHRASE = "open sesame"


@dataclasses.dataclass(frozen=True)
class Keys:
    alice: ExportedKey
    bob: ExportedKey  # RSA, the other common choice
    sign_only: ExportedKey
    expired: ExportedKey
    revoked: ExportedKey
    expired_subkey: ExportedKey
    protected: ExportedKey  # its private key is protected with PASSPHRASE


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    ring = Keyring(home)
    revoked = ring.make("Revoked <revoked@example.test>")
    revocation = (home / "openpgp-revocs.d" / f"{revoked}.rev").read_bytes()
    ring.gpg("--import", input=revocation.replace(b":-----BEGIN", b"-----BEGIN"))
    old = ring.make("Old subkey <old@example.test>", "ed25519", "cert", faked_time="20200101T000000")
    ring.gpg("--faked-system-time", "20200101T000000", "--quick-add-key", old, "cv25519", "encr", "1d")
    protected = ring.make("Protected <protected@example.test>", passphrase=PASSPHRASE)
    bob = ring.make("Bob <bob@example.test>", "rsa2048", "cert,sign")
    ring.gpg("--quick-add-key", bob, "rsa2048", "encr")
    yield Keys(
        alice=ring.export(ring.make("Alice <alice@example.test>")),
        bob=ring.export(bob),
        sign_only=ring.export(ring.make("Signer <signer@example.test>", "ed25519", "sign")),
        expired=ring.export(
            ring.make("Expired <expired@example.test>", expire="1d", faked_time="20200101T000000")
        ),
        revoked=ring.export(revoked),
        expired_subkey=ring.export(old),
        protected=ring.export(protected, PASSPHRASE),
    )
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


@pytest.fixture(autouse=True)
def private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Temporary GnuPG homes land here, so that each test can check that none was left behind.

    Not under pytest's tmp_path: gpg-agent's socket path must fit in 107 bytes, and
    /tmp/pytest-of-root/pytest-154/<test name>/homes/idm-gnupg-XXXXXXXX/S.gpg-agent.browser did not.
    """
    homes = Path(tempfile.mkdtemp(prefix="gpg-"))
    monkeypatch.setattr(tempfile, "tempdir", str(homes))
    yield homes
    assert list(homes.iterdir()) == []
    homes.rmdir()
    assert _gpg_children() == []


def _gpg_children() -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and name == "gpg":
            children.append(int(stat.parent.name))
    return children


# --- Recipients -----------------------------------------------------------------------------------------


def test_armored_and_binary_keys_describe_the_same_key(keys: Keys) -> None:
    armored = load_recipients(keys.alice.armored)
    binary = load_recipients(keys.alice.public)
    assert armored.keys == binary.keys
    (key,) = armored.keys
    assert key.fingerprint == keys.alice.fingerprint
    assert key.uids == ("Alice <alice@example.test>",)
    assert key.algorithm == "ed25519"
    assert key.expires is None
    assert key.can_encrypt
    assert len(key.subkey_fingerprints) == 1


def test_rsa_key_and_str_material(keys: Keys) -> None:
    (key,) = load_recipients(keys.bob.armored.decode()).keys
    assert key.algorithm == "rsa2048"


def test_all_keys_of_all_materials_are_recipients_without_a_selection(keys: Keys) -> None:
    recipients = load_recipients(keys.alice.armored + keys.bob.armored, keys.alice.public)
    assert sorted(recipients.fingerprints) == sorted([keys.alice.fingerprint, keys.bob.fingerprint])


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(lambda fpr: fpr, id="fingerprint"),
        pytest.param(lambda fpr: fpr.lower(), id="lowercase"),
        pytest.param(lambda fpr: "0x" + fpr[-16:], id="long-id"),
        pytest.param(lambda fpr: " ".join(fpr[i : i + 4] for i in range(0, 40, 4)), id="spaced"),
    ],
)
def test_selection_by_fingerprint_or_key_id(keys: Keys, name: Callable[[str], str]) -> None:
    # Unusable keys that are not selected do not matter.
    material = keys.alice.armored + keys.bob.armored + keys.expired.armored
    recipients = load_recipients(material, wanted=[name(keys.bob.fingerprint)])
    assert recipients.fingerprints == (keys.bob.fingerprint,)


def test_selection_by_subkey_fingerprint_names_the_primary_key(keys: Keys) -> None:
    (alice,) = load_recipients(keys.alice.public).keys
    recipients = load_recipients(keys.alice.public, wanted=[alice.subkey_fingerprints[0]])
    assert recipients.fingerprints == (keys.alice.fingerprint,)


def test_recipient_missing_from_material(keys: Keys) -> None:
    with pytest.raises(
        KeyMaterialError,
        match=r"recipient '[0-9A-F]{40}' is not in the key material, "
        r"which holds: [0-9A-F]{40} \(Alice <alice@example.test>\)",
    ):
        load_recipients(keys.alice.armored, wanted=[keys.bob.fingerprint])


def test_recipient_that_is_not_a_fingerprint(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"'alice@example.test' is not a key fingerprint or key ID"):
        load_recipients(keys.alice.armored, wanted=["alice@example.test"])


def test_secret_key_is_refused(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"contains a private \(secret\) key: supply only"):
        load_recipients(keys.alice.secret)


def test_secret_key_among_several_materials_is_named(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"key material #2 contains a private"):
        load_recipients(keys.bob.public, keys.alice.secret)


def test_expired_key(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"Expired <expired@example.test>\) expired on 2020-01-02"):
        load_recipients(keys.expired.armored)


def test_revoked_key(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"Revoked <revoked@example.test>\) is revoked"):
        load_recipients(keys.revoked.armored)


def test_key_without_encryption_subkey(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"cannot encrypt: it has no encryption subkey"):
        load_recipients(keys.sign_only.armored)


def test_key_whose_encryption_subkey_expired(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"every encryption subkey of key .* is expired or revoked"):
        load_recipients(keys.expired_subkey.armored)


PEM = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUJ0K\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    "material", [b"", b"   \n", b"just some text\n", PEM], ids=["empty", "blank", "text", "x509"]
)
def test_no_key_found(material: bytes) -> None:
    with pytest.raises(KeyMaterialError, match=r"no OpenPGP key found in the key material"):
        load_recipients(material)


def test_malformed_armor(keys: Keys) -> None:
    lines = keys.alice.armored.splitlines()
    damaged = b"\n".join([*lines[:4], lines[4][:10] + b"AAAAAAAA" + lines[4][18:], *lines[5:]])
    with pytest.raises(KeyMaterialError, match=r"is not a valid OpenPGP key: .*"):
        load_recipients(damaged)


def test_random_bytes() -> None:
    # Depending on its first byte, noise reads as no OpenPGP data at all or as a broken packet.
    with pytest.raises(KeyMaterialError, match=r"is not a valid OpenPGP key|no OpenPGP key found"):
        load_recipients(os.urandom(64))


def test_truncated_binary_key(keys: Keys) -> None:
    with pytest.raises(KeyMaterialError, match=r"is not a valid OpenPGP key|no OpenPGP"):
        load_recipients(keys.alice.public[: len(keys.alice.public) // 2])


# --- Streaming encryption -------------------------------------------------------------------------------


def _random_chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield os.urandom(size)


def test_round_trip_to_two_recipients(keys: Keys) -> None:
    plaintext = b"".join(_random_chunks(6 * 1024 * 1024 + 12345, 1000))
    recipients = load_recipients(keys.alice.armored, keys.bob.public)
    with encrypt(io.BytesIO(plaintext), recipients) as stream:
        ciphertext = b"".join(stream)
    assert len(ciphertext) > len(plaintext)  # incompressible, plus two recipients' session keys
    for key in (keys.alice, keys.bob):
        with decrypt(
            [ciphertext[i : i + 70000] for i in range(0, len(ciphertext), 70000)], key.secret
        ) as out:
            assert b"".join(out) == plaintext


def test_no_compression(keys: Keys) -> None:
    zeros = bytes(4 * 1024 * 1024)
    with encrypt([zeros], load_recipients(keys.alice.public)) as stream:
        size = sum(len(chunk) for chunk in stream)
    assert len(zeros) < size < len(zeros) + 4096


def test_chunks_are_bounded(keys: Keys) -> None:
    recipients = load_recipients(keys.alice.public)
    with encrypt(_random_chunks(3 * 1024 * 1024), recipients, chunk_size=65536) as out:
        sizes = [len(chunk) for chunk in out]
    assert max(sizes) == 65536 and len(sizes) > 40


def test_decrypt_with_passphrase(keys: Keys) -> None:
    with encrypt([b"for the record"], load_recipients(keys.protected.public)) as stream:
        ciphertext = b"".join(stream)
    with decrypt([ciphertext], keys.protected.secret, passphrase=PASSPHRASE) as out:
        assert b"".join(out) == b"for the record"
    with (
        pytest.raises(GpgError, match=r"Bad passphrase|decryption failed"),
        decrypt([ciphertext], keys.protected.secret, passphrase="wrong") as out,
    ):
        b"".join(out)


def test_decrypt_with_the_wrong_key(keys: Keys) -> None:
    with encrypt([b"secret data"], load_recipients(keys.alice.public)) as stream:
        ciphertext = b"".join(stream)
    with (
        pytest.raises(GpgError, match=r"gpg decrypt failed \(exit status 2\): .*No secret key"),
        decrypt([ciphertext], keys.bob.secret) as out,
    ):
        b"".join(out)


def test_tampered_ciphertext_fails(keys: Keys) -> None:
    with encrypt(_random_chunks(1024 * 1024), load_recipients(keys.alice.public)) as stream:
        ciphertext = bytearray(b"".join(stream))
    ciphertext[len(ciphertext) // 2] ^= 0xFF
    with (
        pytest.raises(GpgError, match=r"gpg decrypt failed"),
        decrypt([bytes(ciphertext)], keys.alice.secret) as out,
    ):
        b"".join(out)


def test_decrypt_needs_a_private_key(keys: Keys) -> None:
    with (
        pytest.raises(KeyMaterialError, match=r"no usable OpenPGP private key found"),
        decrypt([b"x"], keys.alice.public) as out,
    ):
        next(out)


class SourceFailed(Exception):
    pass


def test_source_failure_is_reraised_and_gpg_is_stopped(keys: Keys) -> None:
    def failing() -> Iterator[bytes]:
        yield from _random_chunks(2 * 1024 * 1024)
        raise SourceFailed("pod stream broke")

    with (
        pytest.raises(SourceFailed, match=r"pod stream broke"),
        encrypt(failing(), load_recipients(keys.alice.public)) as stream,
    ):
        for _ in stream:
            pass


def test_early_close_stops_gpg_and_cleans_up(keys: Keys, private_tmp: Path) -> None:
    endless = iter(lambda: bytes(65536), None)
    stream = encrypt(endless, load_recipients(keys.alice.public))
    next(stream)
    assert _gpg_children()
    assert list(private_tmp.iterdir())
    stream.close()


def test_encryption_memory_and_throughput(keys: Keys, tmp_path: Path) -> None:
    """256 MiB through gpg in a fresh interpreter: its peak RSS must not follow the data size."""
    recipients = tmp_path / "alice.asc"
    recipients.write_bytes(keys.alice.armored)
    script = textwrap.dedent("""
        import os, sys, time
        from idm_backup_operator.archive.encryption import encrypt, load_recipients

        def hwm():
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0]) * 1024

        recipients = load_recipients(open(sys.argv[1], "rb").read())
        block = os.urandom(1024 * 1024)
        before = hwm()
        started = time.monotonic()
        with encrypt((block for _ in range(256)), recipients) as stream:
            out = sum(len(chunk) for chunk in stream)
        elapsed = time.monotonic() - started
        print(hwm() - before, out, elapsed)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(recipients)], capture_output=True, check=True)
    growth, size, elapsed = result.stdout.split()
    print(
        f"\n256 MiB encrypted in {float(elapsed):.2f} s = {256 * 1.048576 / float(elapsed):.0f} MB/s, "
        f"peak RSS growth {int(growth) / 2**20:.1f} MiB"
    )
    assert int(size) > 256 * 2**20
    assert int(growth) < 32 * 2**20
