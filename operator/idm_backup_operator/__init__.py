"""Kubernetes operator that protects containerized FreeIPA with encrypted, verified ipa-backup archives."""

__version__ = "0.1.0"
