"""How many backups one operator runs at once, and which waiting backup goes next.

Fifty schedules that fire in the same minute must neither start fifty ipa-backups, gpg processes and
upload buffers at once (the operator's memory limit, the API server, the storage) nor queue invisibly
behind a thread pool. A backup takes a slot before it touches anything; when none is free it waits,
without holding a thread, and its status says so.

Fairness is between namespaces, the unit of tenancy: a freed slot goes to the waiting backup whose
namespace has the fewest backups running; among those, to the namespace that got a slot least recently,
and within it to the backup that has waited longest. One
namespace with forty due backups therefore gets no more slots than it can use while another namespace
waits. An optional per-namespace cap bounds a namespace even when nobody else is waiting.

Memory is bounded too: each running backup holds its upload buffers (three S3 parts), so a tenant's
large partSizeMiB could take the shared operator down. With a memory budget, a backup starts only when
its buffers fit; the backup next in line waits for room rather than being overtaken by smaller ones, so
a large backup is delayed, never starved. A backup that could never fit is refused before it queues.

The choice is a pure function (next_waiter); BackupSlots keeps the state on the event loop that owns the
kopf handlers, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

DEFAULT_SLOTS = 4
# How often, all together, queued backups may ask whether they are still wanted (one API read each):
# with hundreds queued, each one asks less often instead of the API server being asked more.
QUEUE_CHECKS_PER_SECOND = 5.0
SLOTS_ENV = "IDM_BACKUP_MAX_CONCURRENT"
PER_NAMESPACE_ENV = "IDM_BACKUP_MAX_CONCURRENT_PER_NAMESPACE"
MEMORY_ENV = "IDM_BACKUP_UPLOAD_MEMORY_MIB"
# Room for the default four backups with the largest parts the CRD allows (3 x 128 MiB would not fit
# twice: such backups then run one or two at a time), within the chart's 1 GiB memory limit.
DEFAULT_MEMORY_MIB = 512
MiB = 1 << 20


class TooLarge(ValueError):
    """The backup's buffers alone exceed the operator's memory budget: it could never start."""


@dataclass(frozen=True)
class Waiter:
    namespace: str
    uid: str
    arrival: int  # order of arrival: lower waited longer
    memory: int = 0  # bytes of upload buffers it will hold


def next_waiter(
    waiting: Iterable[Waiter],
    running: Mapping[str, int],
    per_namespace: int | None,
    last_served: Mapping[str, int],
) -> Waiter | None:
    """The waiter a free slot goes to: fewest running in its namespace, then the namespace served least
    recently (round robin when they tie), then the longest waiting."""
    eligible = [w for w in waiting if per_namespace is None or running.get(w.namespace, 0) < per_namespace]
    return min(
        eligible,
        key=lambda w: (running.get(w.namespace, 0), last_served.get(w.namespace, -1), w.arrival),
        default=None,
    )


@dataclass(frozen=True)
class Queued:
    """What a queued backup tells its user."""

    limit: int
    ahead: int  # backups that would get a slot before this one, as the queue stands now
    per_namespace: int | None
    memory_budget: int | None = None

    @property
    def message(self) -> str:
        cap = f", at most {self.per_namespace} per namespace" if self.per_namespace is not None else ""
        if self.memory_budget is not None:
            cap += f", with {self.memory_budget // MiB} MiB for upload buffers"
        return (
            f"queued: this operator runs at most {self.limit} backups at once{cap}, and what this backup "
            f"needs is taken; {self.ahead} queued backup(s) go first"
        )


@dataclass
class BackupSlots:
    limit: int = DEFAULT_SLOTS
    per_namespace: int | None = None
    memory_budget: int | None = None  # bytes
    running: Counter[str] = field(default_factory=Counter)
    # namespace -> number of the grant it last got, for the round robin between equals
    _served: dict[str, int] = field(default_factory=dict)
    _grants: itertools.count[int] = field(default_factory=itertools.count)
    _in_use: int = 0
    _memory_in_use: int = 0
    _waiting: dict[Waiter, asyncio.Future[None]] = field(default_factory=dict)
    _arrivals: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.limit < 1 or (self.per_namespace is not None and self.per_namespace < 1):
            raise ValueError("backup slots: the limits must be at least 1")

    @classmethod
    def configured(cls, limit: int, per_namespace: int, memory_mib: int) -> BackupSlots:
        """From the command line's numbers, where 0 means no per-namespace limit, or no memory budget."""
        return cls(limit, per_namespace or None, memory_mib * MiB or None)

    @classmethod
    def from_env(cls) -> BackupSlots:
        return cls.configured(
            int(os.environ.get(SLOTS_ENV) or DEFAULT_SLOTS),
            int(os.environ.get(PER_NAMESPACE_ENV) or 0),
            int(os.environ.get(MEMORY_ENV) or DEFAULT_MEMORY_MIB),
        )

    # Read from the metrics server's thread too: plain numbers, never an iteration over changing state.
    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def memory_in_use(self) -> int:
        return self._memory_in_use

    def _fits(self, memory: int) -> bool:
        return self.memory_budget is None or self._memory_in_use + memory <= self.memory_budget

    def _free_for(self, namespace: str, memory: int) -> bool:
        """Whether a newcomer may start at once: a slot and memory free, and nobody in line before it
        (a waiter that may use a free slot waits only for memory, and must not be overtaken)."""
        return (
            self.in_use < self.limit
            and (self.per_namespace is None or self.running[namespace] < self.per_namespace)
            and self._fits(memory)
            and next_waiter(self._waiting, self.running, self.per_namespace, self._served) is None
        )

    def _ahead_of(self, waiter: Waiter) -> int:
        """Waiters that next_waiter would pick before this one, were slots to free up one at a time."""
        rest = set(self._waiting) - {waiter}
        running, served = Counter(self.running), dict(self._served)
        ahead = 0
        while rest:
            chosen = next_waiter([*rest, waiter], running, None, served)
            if chosen is None or chosen == waiter:
                break
            rest.discard(chosen)
            running[chosen.namespace] += 1
            served[chosen.namespace] = max(served.values(), default=-1) + 1
            ahead += 1
        return ahead

    def _hand_over(self) -> None:
        while self.in_use < self.limit:
            chosen = next_waiter(self._waiting, self.running, self.per_namespace, self._served)
            if chosen is None or not self._fits(chosen.memory):
                return  # the one next in line waits for room: nobody overtakes it
            self._take(chosen.namespace, chosen.memory)
            self._waiting.pop(chosen).set_result(None)

    def _take(self, namespace: str, memory: int) -> None:
        self.running[namespace] += 1
        self._in_use += 1
        self._memory_in_use += memory
        self._served[namespace] = next(self._grants)

    def _release(self, namespace: str, memory: int) -> None:
        self.running[namespace] -= 1
        self._in_use -= 1
        self._memory_in_use -= memory
        if self.running[namespace] <= 0:
            del self.running[namespace]
        self._hand_over()

    def _leave(self, waiter: Waiter) -> None:
        """Out of the queue; a slot handed over in the meantime goes on to the next waiter."""
        if self._waiting.pop(waiter, None) is None:
            self._release(waiter.namespace, waiter.memory)
        else:
            self._hand_over()  # it may have been the one next in line, waiting for memory

    @asynccontextmanager
    async def slot(
        self,
        namespace: str,
        uid: str,
        *,
        on_queued: Callable[[Queued], Awaitable[None]],
        still_wanted: Callable[[], Awaitable[bool]],
        recheck_seconds: float,
        memory: int = 0,
    ) -> AsyncIterator[bool]:
        """Hold a slot for the body of the `with`; yields False if the backup was no longer wanted.

        While queued, still_wanted() is asked every recheck_seconds, or less often when so many wait that
        they would ask more than QUEUE_CHECKS_PER_SECOND together (the resource may have been deleted): a
        queued backup that nobody wants any more leaves the queue instead of running later.
        """
        if self.memory_budget is not None and memory > self.memory_budget:
            raise TooLarge(
                f"its upload buffers need {memory // MiB} MiB, more than this operator's budget of "
                f"{self.memory_budget // MiB} MiB: use a smaller partSizeMiB"
            )
        if self._free_for(namespace, memory):
            self._take(namespace, memory)
        elif not await self._queue(
            Waiter(namespace, uid, next(self._arrivals), memory), on_queued, still_wanted, recheck_seconds
        ):
            yield False
            return
        try:
            yield True
        finally:
            self._release(namespace, memory)

    async def _queue(
        self,
        waiter: Waiter,
        on_queued: Callable[[Queued], Awaitable[None]],
        still_wanted: Callable[[], Awaitable[bool]],
        recheck_seconds: float,
    ) -> bool:
        """Wait for a slot: True once it is this waiter's, False if the backup is no longer wanted."""
        granted = asyncio.get_running_loop().create_future()
        self._waiting[waiter] = granted
        try:
            await on_queued(
                Queued(self.limit, self._ahead_of(waiter), self.per_namespace, self.memory_budget)
            )
            while not granted.done():
                await asyncio.wait(
                    [granted], timeout=max(recheck_seconds, len(self._waiting) / QUEUE_CHECKS_PER_SECOND)
                )
                if not granted.done() and not await still_wanted():
                    self._leave(waiter)
                    return False
        except BaseException:
            # Cancelled while queued (operator shutdown), or the status write failed.
            self._leave(waiter)
            raise
        return True
