#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian machine, and nothing twice:
# Debian packages, the Python virtualenv in .venv, and the platform's Go binaries (built from the Go
# module proxy into ~/.cache/idm-backup-operator, keyed by version). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(
  389-ds-base ldap-utils python3-ldap   # the real LDAP server, and python-ldap for the FreeIPA stand-in
  libldap2-dev libsasl2-dev gcc         # python-ldap ships no wheels: it compiles against these
  gnupg openssl util-linux procps iproute2
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python 3.11+ required" >&2; exit 1; }
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-* && touch "$stamp"
fi

command -v go >/dev/null || { echo "setup: Go is required to build the platform (https://go.dev/dl)" >&2; exit 1; }
# An older local Go fetches the toolchain the Kubernetes modules ask for, through the module proxy.
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
bash testbed/build.sh all >/dev/null
bash testbed/build.sh helm >/dev/null   # for the chart's tests
# The chart's checkers: promtool (alert rules and their unit tests), kubeconform (rendered manifests), and
# the Prometheus Operator's and cert-manager's CRDs, generated from their Go types, for kubeconform.
bash testbed/build.sh promtool >/dev/null
bash testbed/build.sh kubeconform >/dev/null
bash testbed/build.sh crds >/dev/null
