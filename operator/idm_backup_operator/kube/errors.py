"""The Kubernetes client's error, as the layers above kube/ catch it without importing the client.

Every call into the API raises the client's ApiException (with `status` and `reason`); kube/ owns the
client, so this is where the name comes from for everyone else.
"""

from __future__ import annotations

from kubernetes.client import ApiException as ApiError

__all__ = ["ApiError"]
