"""TEST STAND-IN for FreeIPA's ipapython/version.py -- NOT FreeIPA.

Part of the idm-backup-operator test platform (testbed/images/freeipa-standin). The real module is
generated at build time with the release's VERSION; the stand-in "runs" FreeIPA 4.12.2 unless the fault
`version=<X>` is set (the file /data/ipa-standin-fault, else the IPA_STANDIN_FAULT variable, read the
same way as ipa_standin.fault()), which makes the server report release X: ipa-backup then writes X in
its header, ipa-restore compares backups against X, and
`python3 -c 'from ipapython import version; print(version.VERSION)'` prints X.
"""

import os

DEFAULT_VERSION = "4.12.2"
_FAULT_FILE = "/data/ipa-standin-fault"


def _server_version() -> str:
    try:
        with open(_FAULT_FILE) as f:
            fault = f.read().strip()
    except OSError:
        fault = os.environ.get("IPA_STANDIN_FAULT", "").strip()
    if fault.startswith("version="):
        return fault.split("=", 1)[1].strip() or DEFAULT_VERSION
    return DEFAULT_VERSION


def _num_version(version: str) -> int:
    # After IPA 3.2.0: each part as two decimal digits (4.12.2 -> 41202).
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


# The full version including strings.
VERSION = _server_version()
# The real one adds the vendor tag (e.g. 4.12.2-1.fc40); the stand-in has none.
VENDOR_VERSION = VERSION
NUM_VERSION = _num_version(VERSION)
