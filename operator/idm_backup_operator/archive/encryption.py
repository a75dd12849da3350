"""OpenPGP encryption of archives before they leave the operator, with the recipients' public keys only.

ipa-backup's own ``--gpg`` needs a *secret* key on the IPA server. Here the operator holds nothing but
public keys, read from a Kubernetes Secret; whoever restores keeps the private key, offline. A Secret that
contains a private key is therefore refused rather than merely warned about: the key would sit in the
cluster next to the archives it protects, and it is never needed to back up.

Everything happens in private, temporary GnuPG home directories, so the operator's environment (and any
``~/.gnupg``) plays no part, and ``--trust-model always`` replaces the web of trust: the user chose these
keys explicitly. The archive is gzip already, hence ``--compress-algo none``: compressing it again made
encryption six times slower for nothing (25.7 s versus 4.2 s per GiB).
"""

import contextlib
import dataclasses
import datetime
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import gnupg

from idm_backup_operator.streams import CHUNK_SIZE, Readable, chunks_of

GPG = "gpg"
GPGCONF = "gpgconf"

# How much of gpg's stderr is worth quoting in an error message: its last lines say what went wrong.
_STDERR_TAIL = 2000


class KeyMaterialError(ValueError):
    """The key material cannot be used; the message is meant for the user who supplied it."""


class GpgError(RuntimeError):
    """gpg failed while encrypting or decrypting a stream."""


@dataclasses.dataclass(frozen=True)
class PublicKey:
    fingerprint: str
    uids: tuple[str, ...]
    algorithm: str  # e.g. "rsa4096", "ed25519"
    created: datetime.datetime
    expires: datetime.datetime | None
    can_encrypt: bool  # has a usable (not expired, not revoked) encryption (sub)key
    subkey_fingerprints: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.fingerprint} ({', '.join(self.uids) or 'no user ID'})"


@dataclasses.dataclass(frozen=True)
class Recipients:
    """Validated recipients, with their public keys in binary form ready to be imported by `encrypt`."""

    keys: tuple[PublicKey, ...]
    material: bytes = dataclasses.field(repr=False)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(key.fingerprint for key in self.keys)


def load_recipients(*materials: bytes | str, wanted: Sequence[str] = ()) -> Recipients:
    """Read public keys (ASCII-armored or binary, one or more per material) and validate them as recipients.

    Without `wanted`, every key found is a recipient and each must be usable. With it, only the keys
    named there (by fingerprint, long or short key ID, of the primary key or of a subkey) are recipients,
    and each must be present and usable; other keys in the material are ignored.
    """
    with _gnupg_home() as home:
        gpg = _gnupg(home)
        for index, material in enumerate(materials, 1):
            where = f"key material #{index}" if len(materials) > 1 else "the key material"
            _import_public(gpg, material, where)
        listing = {info["fingerprint"]: info for info in gpg.list_keys()}
        found = [_public_key(info) for info in listing.values()]
        if not found:
            raise KeyMaterialError("no OpenPGP key found in the key material")
        chosen = [_find(found, name) for name in wanted] if wanted else found
        chosen = list({key.fingerprint: key for key in chosen}.values())
        for key in chosen:
            _check_usable(key, listing[key.fingerprint])
        exported = gpg.export_keys([key.fingerprint for key in chosen], armor=False)
        return Recipients(keys=tuple(chosen), material=bytes(exported))


def _import_public(gpg: gnupg.GPG, material: bytes | str, where: str) -> None:
    data = material.encode() if isinstance(material, str) else material
    result = gpg.import_keys(data)
    if result.sec_read:
        raise KeyMaterialError(
            f"{where} contains a private (secret) key: supply only the public key. The private key is "
            f"never needed to back up, only to restore, and must not be stored in the cluster"
        )
    if "[GNUPG:] NODATA" in result.stderr and not result.count:
        raise KeyMaterialError(
            f"no OpenPGP key found in {where}: expected an ASCII-armored "
            f"'-----BEGIN PGP PUBLIC KEY BLOCK-----' or a binary export of a public key"
        )
    if result.returncode != 0 or result.not_imported:
        raise KeyMaterialError(f"{where} is not a valid OpenPGP key: {_gpg_says(result.stderr)}")


def _find(keys: Sequence[PublicKey], name: str) -> PublicKey:
    wanted = re.sub(r"\s+", "", name).upper().removeprefix("0X")
    if not re.fullmatch(r"[0-9A-F]{8}|[0-9A-F]{16}|[0-9A-F]{40}|[0-9A-F]{64}", wanted):
        raise KeyMaterialError(f"recipient {name!r} is not a key fingerprint or key ID in hexadecimal")
    for key in keys:
        if any(fpr.endswith(wanted) for fpr in (key.fingerprint, *key.subkey_fingerprints)):
            return key
    present = "; ".join(str(key) for key in keys)
    raise KeyMaterialError(f"recipient {name!r} is not in the key material, which holds: {present}")


def _check_usable(key: PublicKey, info: dict[str, Any]) -> None:
    validity = info["trust"]
    if validity == "r":
        raise KeyMaterialError(f"key {key} is revoked")
    if validity == "e":
        expired = f" on {key.expires:%Y-%m-%d}" if key.expires else ""
        raise KeyMaterialError(f"key {key} expired{expired}")
    if validity == "i":
        raise KeyMaterialError(f"key {key} is invalid (gpg cannot verify its self-signatures)")
    if not key.can_encrypt:
        subkeys = info.get("subkey_info", {}).values()
        if any("e" in sub["cap"] for sub in subkeys) or "e" in info["cap"]:
            raise KeyMaterialError(f"every encryption subkey of key {key} is expired or revoked")
        raise KeyMaterialError(
            f"key {key} cannot encrypt: it has no encryption subkey (add one with "
            f"'gpg --quick-add-key {key.fingerprint} cv25519 encr' and export the public key again)"
        )


# Algorithm numbers of RFC 4880 / RFC 6637; for elliptic curves the curve says more than the algorithm.
_ALGORITHMS = {"1": "rsa", "2": "rsa", "3": "rsa", "16": "elg", "17": "dsa"}


def _public_key(info: dict[str, Any]) -> PublicKey:
    family = _ALGORITHMS.get(info["algo"])
    algorithm = f"{family}{info['length']}" if family else info.get("curve") or f"algorithm {info['algo']}"
    return PublicKey(
        fingerprint=info["fingerprint"],
        uids=tuple(info["uids"]),
        algorithm=algorithm,
        created=_timestamp(info["date"]) or datetime.datetime.fromtimestamp(0, datetime.UTC),
        expires=_timestamp(info["expires"]),
        # gpg sums up the usable capabilities of the key and its subkeys in capital letters.
        can_encrypt="E" in info["cap"],
        subkey_fingerprints=tuple(fpr for _, _, fpr, _ in info["subkeys"] if fpr),
    )


def _timestamp(value: str) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(int(value), datetime.UTC) if value else None


def encrypt(
    source: Iterable[bytes] | Readable, recipients: Recipients, *, chunk_size: int = CHUNK_SIZE
) -> "GpgStream":
    """Ciphertext chunks of `source` encrypted to all `recipients`, produced as `source` is consumed."""
    args = ["--trust-model", "always", "--compress-algo", "none"]
    for fingerprint in recipients.fingerprints:
        args += ["--recipient", fingerprint]
    return GpgStream(source, [*args, "--encrypt"], recipients.material, chunk_size=chunk_size)


def decrypt(
    source: Iterable[bytes] | Readable,
    secret_key: bytes | str,
    *,
    passphrase: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> "GpgStream":
    """Plaintext chunks of an encrypted `source`; for verification and tests, never for backing up.

    gpg writes plaintext before it has checked the integrity of the whole message: only a stream that
    was read to its end without an error is authentic.
    """
    return GpgStream(
        source, ["--decrypt"], secret_key, chunk_size=chunk_size, secret=True, passphrase=passphrase
    )


class GpgStream:
    """The output of gpg used as a filter, as an iterator of chunks that is also a context manager.

    gpg starts at the first `next()`. A thread feeds it `source` while the caller reads its output, so
    neither side can block the other with a full pipe, and only a chunk or two is ever in memory.
    Nothing is hashed here: callers tally what they need (each sha256 pass costs ~0.6 CPU-s per GiB).
    Closing the stream early, or an
    error on either side, kills gpg and removes its home directory. An exception raised by `source`
    is re-raised here, as is; gpg's own failures raise `GpgError` quoting gpg.
    """

    def __init__(
        self,
        source: Iterable[bytes] | Readable,
        args: Sequence[str],
        key_material: bytes | str,
        *,
        chunk_size: int,
        secret: bool = False,
        passphrase: str | None = None,
    ) -> None:
        self._chunks = self._run(source, args, key_material, chunk_size, secret, passphrase)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> "GpgStream":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(
        self,
        source: Iterable[bytes] | Readable,
        args: Sequence[str],
        key_material: bytes | str,
        chunk_size: int,
        secret: bool,
        passphrase: str | None,
    ) -> Generator[bytes, None, None]:
        with _gnupg_home() as home, open(home / "stderr", "w+b") as stderr:
            options = ["--no-autostart"]
            if secret:
                _import_secret(home, key_material, passphrase)
                # Never a pinentry dialog: a passphrase comes from a file, off the command line.
                options = ["--pinentry-mode", "loopback"]
                if passphrase is not None:
                    (home / "passphrase").write_text(passphrase)
                    options += ["--passphrase-file", str(home / "passphrase")]
            else:
                _gnupg(home).import_keys(key_material)
            command = [GPG, "--batch", "--no-tty", "--homedir", str(home), *options, *args]
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                # gpg's messages become part of ours: keep them in English whatever the pod's locale.
                env={**os.environ, "LC_ALL": "C", "LANGUAGE": "C"},
            )
            assert process.stdin is not None and process.stdout is not None
            feeder = _Feeder(chunks_of(source, chunk_size), process)
            try:
                while chunk := process.stdout.read(chunk_size):
                    yield chunk
                returncode = process.wait()
                if returncode == 0:
                    feeder.join()  # it has closed gpg's stdin: only its last bookkeeping is left
            finally:
                # gpg goes first: a feeder blocked on a full pipe is released by the broken pipe.
                if process.poll() is None:
                    process.kill()
                process.wait()
                process.stdout.close()
                feeder.stop()
            if feeder.error is not None:
                raise feeder.error
            if returncode != 0:
                stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - _STDERR_TAIL))
                said = _gpg_says(stderr.read().decode(errors="replace"))
                raise GpgError(f"gpg {args[-1].lstrip('-')} failed (exit status {returncode}): {said}")


class _Feeder(threading.Thread):
    """Writes the source into gpg's stdin, and takes gpg down if the source fails."""

    def __init__(self, chunks: Iterator[bytes], process: "subprocess.Popen[bytes]") -> None:
        super().__init__(name="gpg-feeder", daemon=True)
        self.error: BaseException | None = None
        self._chunks = chunks
        self._process = process
        self._stopped = threading.Event()
        self.start()

    def run(self) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            for chunk in self._chunks:
                if self._stopped.is_set():
                    break
                stdin.write(chunk)
        except BrokenPipeError:
            pass  # gpg exited early; its exit status says why.
        except BaseException as error:
            # Without the kill, gpg would see a closed stdin and finish a valid-looking, truncated output.
            self.error = error
            self._process.kill()
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def stop(self) -> None:
        self._stopped.set()
        # A source blocked in a read cannot be interrupted: the thread is a daemon and is left to finish.
        self.join(timeout=5)


def _import_secret(home: Path, material: bytes | str, passphrase: str | None) -> None:
    result = _gnupg(home, agent=True).import_keys(material, passphrase=passphrase)
    if not result.sec_imported:
        raise KeyMaterialError(f"no usable OpenPGP private key found: {_gpg_says(result.stderr)}")


@contextlib.contextmanager
def _gnupg_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="idm-gnupg-"))
    try:
        yield home
    finally:
        if (home / "S.gpg-agent").exists():
            subprocess.run([GPGCONF, "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _gnupg(home: Path, *, agent: bool = False) -> gnupg.GPG:
    # Public keys need no agent; without --no-autostart gpg would start one per temporary home anyway.
    return gnupg.GPG(gpgbinary=GPG, gnupghome=str(home), options=[] if agent else ["--no-autostart"])


def _gpg_says(stderr: str) -> str:
    """gpg's human-readable complaints, without its status lines and the echo of our own options."""
    lines = [line.removeprefix("gpg: ") for line in stderr.splitlines() if line.startswith("gpg: ")]
    relevant = [line for line in lines if not line.startswith(("keybox", "Total number", "WARNING: unsafe"))]
    return "; ".join(relevant) or stderr.strip() or "no details"
