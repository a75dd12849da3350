"""Command line: `idm-backup-operator run` starts the operator."""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from idm_backup_operator import __version__


def _run(args: argparse.Namespace) -> int:
    import idm_backup_operator.handlers  # noqa: F401 - registers the handlers with kopf

    # kopf sets up the root logger itself; a second handler here would print every line twice.
    kopf.configure(verbose=args.verbose)
    # boto3 and the Kubernetes client log whole request and response bodies at DEBUG.
    for noisy in ("botocore", "boto3", "urllib3", "kubernetes", "gnupg"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=True,
        liveness_endpoint=args.liveness,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="idm-backup-operator", description="Backups of FreeIPA on Kubernetes"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument(
        "--namespace", action="append", help="watch only this namespace (repeatable); default: all namespaces"
    )
    run.add_argument("--liveness", help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
