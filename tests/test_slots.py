"""Backup slots: at most N backups at once, and a fair queue between namespaces for the rest."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from idm_backup_operator import metrics
from idm_backup_operator.slots import BackupSlots, MiB, Queued, TooLarge, Waiter, next_waiter


def test_a_free_slot_goes_to_the_namespace_with_the_fewest_running_then_round_robin() -> None:
    waiting = [Waiter("a", "a1", 0), Waiter("a", "a2", 1), Waiter("b", "b1", 2), Waiter("c", "c1", 3)]
    never: dict[str, int] = {}
    assert next_waiter(waiting, Counter({"a": 3, "b": 1}), None, never) == Waiter("c", "c1", 3)
    assert next_waiter(waiting, Counter({"a": 1, "b": 1, "c": 1}), None, never) == Waiter("a", "a1", 0)
    assert next_waiter(waiting, Counter({"a": 2, "c": 2}), None, never) == Waiter("b", "b1", 2)
    # Equal running: the namespace served longest ago goes first, whoever arrived first.
    served = {"a": 7, "b": 5, "c": 6}
    assert next_waiter(waiting, Counter(), None, served) == Waiter("b", "b1", 2)
    assert next_waiter(waiting, Counter({"b": 1}), None, served) == Waiter("c", "c1", 3)


def test_the_per_namespace_cap_passes_over_a_full_namespace_and_may_leave_the_slot_free() -> None:
    waiting = [Waiter("a", "a1", 0), Waiter("b", "b1", 1)]
    assert next_waiter(waiting, Counter({"a": 2, "b": 1}), 2, {}) == Waiter("b", "b1", 1)
    assert next_waiter(waiting, Counter({"a": 2, "b": 2}), 2, {}) is None
    assert next_waiter([], Counter(), None, {}) is None


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BackupSlots(0)
    assert BackupSlots.configured(3, 0, 0).per_namespace is None
    configured = BackupSlots.configured(3, 2, 512)
    assert (configured.per_namespace, configured.memory_budget) == (2, 512 << 20)
    assert BackupSlots.configured(3, 2, 0).memory_budget is None


class _Run:
    """Backups competing for slots, each held until the test lets it finish."""

    def __init__(self, slots: BackupSlots) -> None:
        self.slots = slots
        self.started: list[str] = []
        self.queued: dict[str, Queued] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.unwanted: set[str] = set()

    async def backup(self, namespace: str, uid: str, memory: int = 0) -> bool:
        async def on_queued(why: Queued) -> None:
            self.queued[uid] = why

        async def still_wanted() -> bool:
            return uid not in self.unwanted

        self.release[uid] = asyncio.Event()
        async with self.slots.slot(
            namespace,
            uid,
            on_queued=on_queued,
            still_wanted=still_wanted,
            recheck_seconds=0.01,
            memory=memory,
        ) as wanted:
            if not wanted:
                return False
            self.started.append(uid)
            await self.release[uid].wait()
        return True

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)


def test_backups_beyond_the_limit_wait_and_slots_go_round_the_namespaces() -> None:
    async def scenario() -> None:
        run = _Run(BackupSlots(2))
        # Namespace a has five backups due before b's and c's single ones.
        names = [("a", f"a{i}") for i in range(5)] + [("b", "b0"), ("c", "c0")]
        tasks = [asyncio.create_task(run.backup(ns, uid)) for ns, uid in names]
        await run.settle()
        assert run.started == ["a0", "a1"]
        assert run.slots.in_use == 2 and run.slots.queued == 5
        # What each queued backup is told: b0 and c0 are next despite arriving last.
        assert run.queued["b0"].ahead == 0 and run.queued["c0"].ahead == 1
        assert run.queued["a2"].ahead == 0  # when a2 queued, b and c had not arrived yet
        assert run.queued["a4"].ahead == 2  # a2 and a3; b and c had not arrived yet
        assert "at most 2 backups at once" in run.queued["a2"].message
        run.release["a0"].set()
        await run.settle()
        assert run.started[2] == "b0"  # a has one running, b none
        run.release["a1"].set()
        await run.settle()
        # a and c both have none running now; a was served more recently, and c not at all.
        assert run.started[3] == "c0"
        for uid in ("b0", "c0", "a2", "a3"):
            run.release[uid].set()
            await run.settle()
        assert run.started == ["a0", "a1", "b0", "c0", "a2", "a3", "a4"]
        run.release["a4"].set()
        assert all(await asyncio.gather(*tasks))
        assert run.slots.in_use == 0 and run.slots.queued == 0

    asyncio.run(scenario())


def test_the_per_namespace_cap_lets_another_namespace_use_the_free_slot() -> None:
    async def scenario() -> None:
        run = _Run(BackupSlots(3, per_namespace=1))
        tasks = [
            asyncio.create_task(run.backup(ns, uid)) for ns, uid in [("a", "a0"), ("a", "a1"), ("b", "b0")]
        ]
        await run.settle()
        assert run.started == ["a0", "b0"]
        assert run.slots.in_use == 2  # a slot is free, but a may not use it
        assert "at most 1 per namespace" in run.queued["a1"].message
        run.release["a0"].set()
        await run.settle()
        assert run.started == ["a0", "b0", "a1"]
        for uid in ("a1", "b0"):
            run.release[uid].set()
        await asyncio.gather(*tasks)
        assert run.slots.in_use == 0

    asyncio.run(scenario())


def test_a_queued_backup_that_is_no_longer_wanted_leaves_without_a_slot() -> None:
    async def scenario() -> None:
        run = _Run(BackupSlots(1))
        first = asyncio.create_task(run.backup("a", "a0"))
        gone = asyncio.create_task(run.backup("a", "a1"))
        after = asyncio.create_task(run.backup("a", "a2"))
        await run.settle()
        run.unwanted.add("a1")
        assert await gone is False
        run.release["a0"].set()
        await run.settle()
        assert run.started == ["a0", "a2"]
        run.release["a2"].set()
        assert await first and await after
        assert run.slots.in_use == 0 and run.slots.queued == 0

    asyncio.run(scenario())


def test_cancelling_a_queued_backup_hands_its_slot_on() -> None:
    async def scenario() -> None:
        run = _Run(BackupSlots(1))
        first = asyncio.create_task(run.backup("a", "a0"))
        cancelled = asyncio.create_task(run.backup("b", "b0"))
        last = asyncio.create_task(run.backup("c", "c0"))
        await run.settle()
        # The slot is handed to b0 and, before b0 runs again, b0 is cancelled (operator shutdown).
        run.release["a0"].set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await run.settle()
        assert "c0" in run.started and "b0" not in run.started
        run.release["c0"].set()
        assert await first and await last
        assert run.slots.in_use == 0 and run.slots.queued == 0

    asyncio.run(scenario())


def test_a_backup_that_raises_gives_its_slot_back() -> None:
    async def scenario() -> None:
        slots = BackupSlots(1)

        async def never(_: Queued) -> None:
            raise AssertionError("the first backup must not queue")

        async def yes() -> bool:
            return True

        with pytest.raises(RuntimeError):
            async with slots.slot("a", "a0", on_queued=never, still_wanted=yes, recheck_seconds=1):
                raise RuntimeError("the backup failed")
        assert slots.in_use == 0

    asyncio.run(scenario())


def test_the_slots_are_exposed_as_metrics() -> None:
    async def scenario() -> dict[str, float]:
        slots = BackupSlots(1)
        state = metrics.BackupMetrics()
        state.registry.register(metrics.SlotMetrics(slots))
        run = _Run(slots)
        tasks = [asyncio.create_task(run.backup("a", uid)) for uid in ("a0", "a1", "a2")]
        await run.settle()
        found = {
            sample.name: sample.value
            for family in text_string_to_metric_families(state.exposition().decode())
            for sample in family.samples
        }
        for uid in ("a0", "a1", "a2"):
            run.release[uid].set()
            await run.settle()
        await asyncio.gather(*tasks)
        return found

    found = asyncio.run(scenario())
    assert (found["idm_backup_slots"], found["idm_backup_slots_in_use"], found["idm_backup_queued"]) == (
        1,
        1,
        2,
    )


def test_a_backup_whose_buffers_do_not_fit_waits_first_in_line_and_is_not_overtaken() -> None:
    async def scenario() -> None:
        run = _Run(BackupSlots(4, memory_budget=100 * MiB))
        first = asyncio.create_task(run.backup("a", "small-1", 60 * MiB))
        await run.settle()
        big = asyncio.create_task(run.backup("b", "big", 90 * MiB))
        await run.settle()
        # A free slot and room for a small one, but the big one is next in line: it is not overtaken.
        late = asyncio.create_task(run.backup("c", "small-2", 10 * MiB))
        await run.settle()
        assert run.started == ["small-1"] and run.slots.queued == 2
        assert "with 100 MiB for upload buffers" in run.queued["big"].message
        run.release["small-1"].set()
        await run.settle()
        # The big one first; 90 + 10 MiB fit together, so small-2 follows it at once.
        assert run.started == ["small-1", "big", "small-2"] and run.slots.memory_in_use == 100 * MiB
        for uid in ("big", "small-2"):
            run.release[uid].set()
        assert all(await asyncio.gather(first, big, late))
        assert (run.slots.in_use, run.slots.memory_in_use) == (0, 0)

    asyncio.run(scenario())


def test_a_backup_that_could_never_fit_is_refused_before_it_queues() -> None:
    async def scenario() -> None:
        run = _Run(BackupSlots(4, memory_budget=100 * MiB))
        with pytest.raises(TooLarge, match="need 300 MiB, more than this operator's budget of 100 MiB"):
            await run.backup("a", "huge", 300 * MiB)
        assert (run.slots.in_use, run.slots.queued) == (0, 0)

    asyncio.run(scenario())


def test_when_the_one_next_in_line_leaves_the_rest_move_up() -> None:
    async def scenario() -> None:
        run = _Run(BackupSlots(4, memory_budget=100 * MiB))
        first = asyncio.create_task(run.backup("a", "a0", 60 * MiB))
        await run.settle()
        big = asyncio.create_task(run.backup("b", "big", 90 * MiB))
        await run.settle()
        small = asyncio.create_task(run.backup("c", "c0", 30 * MiB))
        await run.settle()
        assert run.started == ["a0"]
        run.unwanted.add("big")  # deleted while it waited for memory
        assert await big is False
        await run.settle()
        assert run.started == ["a0", "c0"]
        for uid in ("a0", "c0"):
            run.release[uid].set()
        assert await first and await small

    asyncio.run(scenario())
