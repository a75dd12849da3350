"""Times as status fields and annotations hold them: RFC 3339, UTC, whole seconds."""

from __future__ import annotations

import datetime
from typing import overload


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@overload
def parse_time(value: str) -> datetime.datetime: ...


@overload
def parse_time(value: str | None) -> datetime.datetime | None: ...


def parse_time(value: str | None) -> datetime.datetime | None:
    """None for a field that is absent or empty."""
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
