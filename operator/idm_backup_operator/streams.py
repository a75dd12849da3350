"""Byte streams in fixed-size chunks, and the one place where they are measured.

Archives are gigabytes: every stage (pod exec, gpg, upload) passes chunks of at most CHUNK_SIZE along and
never holds a whole archive. The sha256 and size reported in a backup's status and manifest all come from
a `Tally` fed with exactly the bytes that passed, so what is reported is what was stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

CHUNK_SIZE = 1024 * 1024


@runtime_checkable
class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Tally:
    """The running sha256 and size of the bytes seen so far."""

    __slots__ = ("_hash", "size")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    @classmethod
    def of(cls, data: bytes) -> Tally:
        tally = cls()
        tally.update(data)
        return tally

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __repr__(self) -> str:
        return f"Tally(size={self.size}, sha256={self.sha256})"


def chunks_of(source: Iterable[bytes] | Readable, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Chunks from an iterable of chunks or from a file-like object.

    A binary file is iterable too, but by *lines*: arbitrary long for binary data, so files are read by size.
    """
    if isinstance(source, Readable):
        while chunk := source.read(size):
            yield chunk
    else:
        for chunk in source:
            if chunk:
                yield chunk


def tallied(chunks: Iterable[bytes], tally: Tally) -> Iterator[bytes]:
    """Pass the chunks through, counting and hashing them on the way."""
    for chunk in chunks:
        tally.update(chunk)
        yield chunk


def human_size(size: int) -> str:
    """A byte count as people read it: 1.5 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
