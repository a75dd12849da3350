"""TEST STAND-IN for FreeIPA's ipapython/version.py -- NOT FreeIPA.

Part of the idm-backup-operator test platform (testbed/images/freeipa-standin). The real module is
generated at build time with the release's VERSION and the package's VENDOR_VERSION; the stand-in "runs"
FreeIPA 4.12.2, package build 4.12.2-1.fc41, unless a fault (the file /data/ipa-standin-fault, else the
IPA_STANDIN_FAULT variable, read the same way as ipa_standin.fault()) says otherwise:
- `version=<X>`: the server runs release X: ipa-backup then writes X in its header, ipa-restore compares
  backups against X, and `python3 -c 'from ipapython import version; print(version.VERSION)'` prints X;
- `upgrade[=<seconds>]`, `upgrade-fail[=<seconds>]`: the image was updated to a newer build of the same
  release (4.12.2-2.fc41), so data recorded by the older build need ipa-server-upgrade;
- `data-newer`: the image was rolled back to an older build (4.12.2-0.fc41) than the data were last
  upgraded by.
Only VENDOR_VERSION differs with the last three: VERSION, which backups record and restores compare, stays.
"""

import os

DEFAULT_VERSION = "4.12.2"
# The package release of the build the image ships; the real VENDOR_VERSION looks like 4.12.2-1.fc41.
DEFAULT_BUILD = "1.fc41"
NEWER_BUILD = "2.fc41"
OLDER_BUILD = "0.fc41"
_FAULT_FILE = "/data/ipa-standin-fault"


def _fault() -> str:
    try:
        with open(_FAULT_FILE) as f:
            return f.read().strip()
    except OSError:
        return os.environ.get("IPA_STANDIN_FAULT", "").strip()


def _server_version(fault: str) -> str:
    if fault.startswith("version="):
        return fault.split("=", 1)[1].strip() or DEFAULT_VERSION
    return DEFAULT_VERSION


def _build(fault: str) -> str:
    name = fault.split("=", 1)[0]
    if name in ("upgrade", "upgrade-fail"):
        return NEWER_BUILD
    if name == "data-newer":
        return OLDER_BUILD
    return DEFAULT_BUILD


def _num_version(version: str) -> int:
    # After IPA 3.2.0: each part as two decimal digits (4.12.2 -> 41202).
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


_FAULT = _fault()
# The full version including strings.
VERSION = _server_version(_FAULT)
# The version of the package, with its release: what installutils.store_version() records as the data
# version and check_version() compares against.
VENDOR_VERSION = f"{VERSION}-{_build(_FAULT)}"
NUM_VERSION = _num_version(VERSION)
