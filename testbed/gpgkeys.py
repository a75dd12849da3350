"""Real OpenPGP keys for tests, made by gpg in a throw-away home the way a user would make them."""

import dataclasses
import subprocess
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ExportedKey:
    fingerprint: str
    public: bytes  # binary export
    armored: bytes
    secret: bytes


class Keyring:
    """A throw-away GnuPG home that makes keys the way a user would."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def gpg(self, *args: str, input: bytes | None = None, passphrase: str = "") -> bytes:
        command = [
            "gpg",
            "--batch",
            "--no-tty",
            "--homedir",
            str(self.home),
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            passphrase,
            *args,
        ]
        return subprocess.run(command, input=input, capture_output=True, check=True).stdout

    def make(
        self,
        uid: str,
        algo: str = "future-default",
        usage: str = "default",
        expire: str = "never",
        *,
        faked_time: str | None = None,
        passphrase: str = "",
    ) -> str:
        faked = ["--faked-system-time", faked_time] if faked_time else []
        self.gpg(*faked, "--quick-gen-key", uid, algo, usage, expire, passphrase=passphrase)
        return self.fingerprint(uid)

    def fingerprint(self, uid: str) -> str:
        listing = self.gpg("--with-colons", "--list-keys", f"={uid}").decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    def export(self, fingerprint: str, passphrase: str = "") -> ExportedKey:
        return ExportedKey(
            fingerprint=fingerprint,
            public=self.gpg("--export", fingerprint),
            armored=self.gpg("--armor", "--export", fingerprint),
            secret=self.gpg("--export-secret-keys", fingerprint, passphrase=passphrase),
        )
