"""The phases of a resource's work, and which of them are final."""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


def is_finished(phase: str | None) -> bool:
    """Whether a status's phase, as read from a resource (absent, or a string from any version), is final."""
    return phase in (Phase.SUCCEEDED, Phase.FAILED)
