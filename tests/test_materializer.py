"""The materializer's state machine in-process, on trio's test clock: absent ->
materializing -> ready | failed, a failure answered from memory until it may be retried,
a refresh that forgets failures, and eviction making a package absent again.

No FUSE and no daemon: a Materializer over a copy of the fixture cache in a folder (a real
LocalMirror that counts what it is asked for), a real store and the real gpg checks.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from conftest import FIXTURE_CACHE, FIXTURE_KEY

from lazymount.catalog.installtree import InstallTree
from lazymount.catalog.loader import load_catalog
from lazymount.errors import IntegrityError
from lazymount.materialize import RETRY_AFTER, Materializer, MirrorSource
from lazymount.mirror.transport import LocalMirror
from lazymount.store.content import Store
from lazymount.trust.policy import Trust
from lazymount.trust.verify import Verifier, read_key_file

HELLO = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
HELLO_TARBALL = "blobs/sha256/ff/ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f"
T = TypeVar("T")


class CountingMirror(LocalMirror):
    """A folder mirror that remembers every path it was asked to open."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.opened: list[str] = []

    def open(self, path: str, expected: int | None, revalidate: bool = False) -> Any:
        self.opened.append(path)
        return super().open(path, expected, revalidate)

    def fetches(self, path: str = HELLO_TARBALL) -> int:
        return self.opened.count(path)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(FIXTURE_CACHE, copy)
    return copy


@pytest.fixture
def verifier() -> Any:
    checker = Verifier([read_key_file(FIXTURE_KEY)])
    yield checker
    checker.close()


def break_tarball(cache: Path) -> bytes:
    """Change the last byte of lmhello's tarball; returns the intact bytes."""
    blob = cache / HELLO_TARBALL
    intact = blob.read_bytes()
    blob.write_bytes(intact[:-1] + b"!")
    return intact


class HeldStore(Store):
    """A store whose removals wait until the test lets them go."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.let_go = threading.Event()

    def remove(self, key: str, wait: bool = False) -> bool:
        self.let_go.wait(30)
        return super().remove(key, wait)


@asynccontextmanager
async def materializer(cache: Path, store: Path | Store, verifier: Verifier
                       ) -> AsyncIterator[tuple[Materializer, CountingMirror]]:
    """A Materializer with a nursery of its own, as the daemon builds it."""
    mirror = CountingMirror(cache)
    catalog = await load_catalog([mirror])
    source = MirrorSource(mirror, Trust(verifier).for_mirror())
    if isinstance(store, Path):
        store = Store(store)
    async with trio.open_nursery() as nursery:
        yield Materializer(InstallTree("/tmp/lmu", catalog), [source], store,
                           nursery=nursery), mirror


def run(main: Callable[[trio.testing.MockClock], Awaitable[T]]) -> T:
    """Run ``main`` on a test clock that moves only when told."""
    clock = trio.testing.MockClock()
    return trio.run(main, clock, clock=clock)


def test_a_package_goes_from_absent_through_materializing_to_ready(cache, tmp_path,
                                                                   verifier):
    async def main(clock: trio.testing.MockClock) -> list[str]:
        seen = []
        async with materializer(cache, tmp_path / "store", verifier) as (work, mirror):
            seen.append(work.status(HELLO))
            async with trio.open_nursery() as callers:
                for _ in range(4):
                    callers.start_soon(work.ensure, HELLO)
                await trio.testing.wait_all_tasks_blocked()
                seen.append(work.status(HELLO))
                assert work.materializing() == {work.key(HELLO)}
            seen.append(work.status(HELLO))
            assert mirror.fetches() == 1  # four callers, one attempt
            assert (work.ready_tree(HELLO) / "bin" / "hello").is_file()  # type: ignore[operator]
        # its runtime dependency was started in the background (the nursery waited for it)
        seen.append(work.status(GREET))
        return seen

    assert run(main) == ["absent", "materializing", "ready", "ready"]


def test_a_failure_is_answered_from_memory_until_it_may_be_tried_again(cache, tmp_path,
                                                                       verifier):
    intact = break_tarball(cache)

    async def main(clock: trio.testing.MockClock) -> None:
        async with materializer(cache, tmp_path / "store", verifier) as (work, mirror):
            with pytest.raises(IntegrityError, match="sha256 mismatch") as first:
                await work.ensure(HELLO)
            assert work.status(HELLO).startswith("failed: lmhello-1.0-3vgakfz: sha256")
            (cache / HELLO_TARBALL).write_bytes(intact)  # the mirror is mended
            clock.jump(RETRY_AFTER - 1)
            with pytest.raises(IntegrityError) as again:
                await work.ensure(HELLO)
            assert again.value is first.value and mirror.fetches() == 1
            clock.jump(2)  # RETRY_AFTER has passed: the next access tries again
            tree = await work.ensure(HELLO)
            assert (tree / "bin" / "hello").is_file() and mirror.fetches() == 2
            assert work.status(HELLO) == "ready"

    run(main)


def test_a_refreshed_index_forgets_failures_and_keeps_what_is_ready(cache, tmp_path,
                                                                    verifier):
    intact = break_tarball(cache)

    async def main(clock: trio.testing.MockClock) -> None:
        async with materializer(cache, tmp_path / "store", verifier) as (work, mirror):
            await work.ensure(GREET)
            with pytest.raises(IntegrityError):
                await work.ensure(HELLO)
            (cache / HELLO_TARBALL).write_bytes(intact)
            greet_fetches = len(mirror.opened)
            work.swap(work.tree, work.sources)  # what a refresh does, on the trio thread
            assert work.status(HELLO) == "absent" and work.status(GREET) == "ready"
            assert (await work.ensure(HELLO) / "bin" / "hello").is_file()  # no clock moved
            assert await work.ensure(GREET) == work.ready_tree(GREET)
            assert not any("lmgreet" in path for path in mirror.opened[greet_fetches:])

    run(main)


def test_an_evicted_package_is_absent_and_materialized_anew(cache, tmp_path, verifier):
    store = tmp_path / "store"

    async def main(clock: trio.testing.MockClock) -> None:
        async with materializer(cache, store, verifier) as (work, mirror):
            tree = await work.ensure(HELLO)
            assert work.usage.size_of(work.key(HELLO))
            assert await work.evict(HELLO)
            assert work.status(HELLO) == "absent" and work.ready_tree(HELLO) is None
            assert not (store / "pkgs" / work.key(HELLO)).exists()
            assert work.usage.size_of(work.key(HELLO)) is None  # no longer counted
            assert not await work.evict(HELLO)  # nothing left to remove
            assert await work.ensure(HELLO) == tree and (tree / "bin" / "hello").is_file()
            assert mirror.fetches() == 2

    run(main)


def test_a_package_is_not_evicted_while_it_materializes(cache, tmp_path, verifier):
    async def main(clock: trio.testing.MockClock) -> None:
        async with materializer(cache, tmp_path / "store", verifier) as (work, mirror):
            async with trio.open_nursery() as callers:
                callers.start_soon(work.ensure, HELLO)
                await trio.testing.wait_all_tasks_blocked()
                assert work.status(HELLO) == "materializing"
                assert not await work.evict(HELLO)
            assert work.status(HELLO) == "ready" and mirror.fetches() == 1

    run(main)


def test_an_access_during_an_eviction_waits_for_the_old_tree_to_go(cache, tmp_path,
                                                                   verifier):
    """An access that comes while the evicted tree is being removed does not get the tree
    that is going away: it waits, then materializes the package anew."""
    store = HeldStore(tmp_path / "store")

    async def main(clock: trio.testing.MockClock) -> None:
        async with materializer(cache, store, verifier) as (work, mirror):
            await work.ensure(HELLO)
            got: list[Path] = []

            async def access() -> None:
                got.append(await work.ensure(HELLO))

            async with trio.open_nursery() as callers:
                callers.start_soon(work.evict, HELLO)
                await trio.testing.wait_all_tasks_blocked()  # the removal is held
                assert (store.pkgs / work.key(HELLO)).exists()  # still there ...
                callers.start_soon(access)
                # time enough for an access that did not wait to find the old tree
                await trio.to_thread.run_sync(time.sleep, 0.5)
                await trio.testing.wait_all_tasks_blocked()
                assert not got and mirror.fetches() == 1  # ... but the access waits
                store.let_go.set()
            assert mirror.fetches() == 2 and (got[0] / "bin" / "hello").is_file()
            assert work.status(HELLO) == "ready"

    run(main)


def test_a_caller_that_gives_up_does_not_abort_the_attempt(cache, tmp_path, verifier):
    """The attempt runs in the materializer's nursery: a cancelled caller (a process
    interrupted in open()) leaves it running for everyone else."""
    async def main(clock: trio.testing.MockClock) -> None:
        async with materializer(cache, tmp_path / "store", verifier) as (work, mirror):
            with trio.move_on_after(1):
                await work.ensure(HELLO)
            assert work.status(HELLO) == "materializing"
            tree = await work.ensure(HELLO)
            assert (tree / "bin" / "hello").is_file() and mirror.fetches() == 1

    clock = trio.testing.MockClock(autojump_threshold=0)  # the 1 s passes at once
    trio.run(main, clock, clock=clock)
