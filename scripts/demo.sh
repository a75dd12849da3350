#!/usr/bin/env bash
# The local demo: installs what is missing, starts the platform (Kubernetes, S3, LDAP, a stand-in
# FreeIPA hidden replica), runs the operator and takes an encrypted backup to S3, then prints its status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m testbed.demo "$@"
