"""Which resource a piece of work is for, as every layer names it (locks, manifests, status, Events)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourceIdentity:
    namespace: str
    name: str
    uid: str
