"""Who asked, and what they may read: the admission webhook's questions to the API server.

The operator reads every Secret of a namespace, so a Secret an object names is used only for someone
allowed to read it themselves; the SubjectAccessReview asks the API server exactly that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client


@dataclasses.dataclass(frozen=True)
class ReferenceScope:
    """Where references are looked up: the object's namespace, as the operator will see it."""

    core: client.CoreV1Api
    namespace: str
    pvc_root: Path
    ambient_s3_credentials: bool
    # Asks the API server what a requester may do; only needed when there is one (see Requester).
    authorization: client.AuthorizationV1Api | None = None


@dataclasses.dataclass(frozen=True)
class Requester:
    """Who asked the API server for the object: the AdmissionReview's userInfo, as the API server
    authenticated it. The SubjectAccessReview asks about exactly this user, groups and extra included, so
    that RBAC bound to a group (or an authorizer that reads extra) answers as it did for the request."""

    username: str
    uid: str | None = None
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_userinfo(cls, info: Mapping[str, Any]) -> Requester:
        return cls(
            username=str(info.get("username") or ""),
            uid=info.get("uid") or None,
            groups=tuple(info.get("groups") or ()),
            extra={key: tuple(values or ()) for key, values in (info.get("extra") or {}).items()},
        )


def may_get_secret(where: ReferenceScope, requester: Requester, name: str) -> bool:
    """Raises ApiError when the API server cannot answer (e.g. the operator may not ask)."""
    return may(where, requester, "get", "secrets", name=name)


def may(
    where: ReferenceScope,
    requester: Requester,
    verb: str,
    resource: str,
    *,
    group: str = "",
    name: str | None = None,
) -> bool:
    """Whether the requester may `verb` the `resource` in the scope's namespace (a SubjectAccessReview).
    Raises ApiError when the API server cannot answer (e.g. the operator may not ask)."""
    assert where.authorization is not None, "a requester needs ReferenceScope.authorization"
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=requester.username,
            uid=requester.uid,
            groups=list(requester.groups) or None,
            extra={key: list(values) for key, values in requester.extra.items()} or None,
            resource_attributes=client.V1ResourceAttributes(
                namespace=where.namespace, verb=verb, group=group, resource=resource, name=name
            ),
        )
    )
    # Admission reviews have a deadline of their own (the webhook's timeoutSeconds): well inside it.
    answer = where.authorization.create_subject_access_review(review, _request_timeout=5)
    return bool(answer.status and answer.status.allowed)
