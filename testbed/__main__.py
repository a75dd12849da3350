"""`python -m testbed up|down|status`: the local platform for the demo and the test suite."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from testbed import stack


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build what is missing and start every service (idempotent)")
    down = sub.add_parser("down", help="stop every service this platform started")
    down.add_argument("--purge", action="store_true", help="also delete all state (etcd, S3, LDAP, volumes)")
    sub.add_parser("status", help="say whether the platform runs")
    args = parser.parse_args()

    if args.command == "up":
        started = time.monotonic()
        platform = stack.up()
        print(json.dumps(asdict(platform), indent=2))
        print(
            f"platform up in {time.monotonic() - started:.1f}s; export KUBECONFIG={platform.kubeconfig}",
            file=sys.stderr,
        )
    elif args.command == "down":
        stack.down(purge=args.purge)
    else:
        print("up" if stack.is_up() else "down")
        return 0 if stack.is_up() else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
