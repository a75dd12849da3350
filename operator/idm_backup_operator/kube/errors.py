"""The Kubernetes client's error, as the layers above kube/ catch it without importing the client.

Every call into the API raises the client's ApiException (with `status` and `reason`); kube/ owns the
client, so this is where the name comes from for everyone else.
"""

from __future__ import annotations

import json

from kubernetes.client import ApiException as ApiError

__all__ = ["ApiError", "api_message"]


def api_message(err: ApiError) -> str:
    """What the API server said (its Status message), or the HTTP status when it said nothing readable."""
    try:
        return str(json.loads(err.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return f"{err.status} {err.reason}"
