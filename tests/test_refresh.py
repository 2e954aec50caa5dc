"""The refresh decision in-process (service/live.py), on trio's test clock: an unchanged
index keeps the tree, a changed one is swapped in whole (materializer and tree together), a
mirror that cannot be asked keeps the old one and says why, a reload keeps what a running
mount cannot change, and the periodic check keeps its interval.

No FUSE and no daemon: a LiveMount built as the daemon builds it, over a copy of the
fixture cache in a folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import FIXTURE_KEY, INDEX_MANIFEST, served_cache

from lazymount.catalog.stored import CatalogStore
from lazymount.config import MirrorConfig, MountConfig
from lazymount.errors import Withdrawn
from lazymount.materialize import Materializer
from lazymount.mirror.jitter import SPREAD
from lazymount.service.live import LiveMount, load_generation, load_trust, open_mirrors
from lazymount.store.content import Store

HELLO = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"


class Watched(LiveMount):
    """A LiveMount that notes when the periodic check came, instead of checking."""

    checks: list[float]

    async def refresh(self, why: str, reload: bool = False) -> dict[str, object]:
        if why == "periodic check":
            self.checks.append(trio.current_time())
            return {"changed": False}
        return await super().refresh(why, reload)


@asynccontextmanager
async def live_mount(cache: Path, store: Path, kind: type[LiveMount] = LiveMount,
                     **settings: Any) -> AsyncIterator[LiveMount]:
    """A LiveMount of ``cache`` with its materializer, as the daemon wires them (no
    filesystem: nothing is mounted); ``settings`` are MountConfig fields, and a reload
    reads ``live.next_config``."""
    config = MountConfig(Path("/tmp/lmu"), (MirrorConfig(str(cache)),),
                         trust_keys=(FIXTURE_KEY,), store=store, **settings)
    trust = load_trust(config)
    catalogs = CatalogStore(store / "catalog")
    generation = await load_generation(config, "/tmp/lmu", catalogs, open_mirrors(config),
                                       trust)
    async with trio.open_nursery() as nursery:
        materializer = Materializer(generation.tree, generation.sources, Store(store),
                                    nursery=nursery)
        live = kind(generation, "/tmp/lmu", materializer.store, catalogs, materializer,
                    reload_config=lambda: live.next_config)  # type: ignore[attr-defined]
        live.next_config = config  # type: ignore[attr-defined]
        try:
            yield live
        finally:
            nursery.cancel_scope.cancel()
            await live.aclose()


def run(main: Callable[[], Awaitable[None]], autojump: bool = False) -> None:
    clock = trio.testing.MockClock(autojump_threshold=0 if autojump else float("inf"))
    trio.run(main, clock=clock)


def test_an_unchanged_index_keeps_the_tree(tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet", "lmhello"})

    async def main() -> None:
        async with live_mount(cache, tmp_path / "store") as live:
            tree = live.current.tree
            assert await live.refresh("asked") == {"changed": False, "packages": 2}
            assert live.current.tree is tree and live.materializer.tree is tree
            assert live.refresh_error is None

    run(main)


def test_a_changed_index_is_swapped_in_whole(tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})

    async def main() -> None:
        async with live_mount(cache, tmp_path / "store") as live:
            assert HELLO not in live.current.tree.prefixes
            served_cache(cache, {"lmgreet", "lmhello"})
            assert await live.refresh("asked") == {"changed": True, "packages": 2,
                                                    "added": 1, "removed": 0}
            # the materializer works from the tree the mount lists, never from another
            assert live.materializer.tree is live.current.tree
            assert (await live.materializer.ensure(HELLO) / "bin" / "hello").is_file()
            served_cache(cache, {"lmgreet"})
            assert await live.refresh("asked") == {"changed": True, "packages": 1,
                                                    "added": 0, "removed": 1}
            assert HELLO not in live.materializer.tree.prefixes
            assert live.materializer.ready_tree(HELLO) is not None  # open files go on

    run(main)


def test_a_package_the_index_dropped_is_withdrawn(tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet", "lmhello"})

    async def main() -> None:
        async with live_mount(cache, tmp_path / "store") as live:
            served_cache(cache, {"lmgreet"})
            assert (await live.refresh("asked"))["removed"] == 1
            with pytest.raises(Withdrawn, match="no longer in the mirrors' index"):
                await live.materializer.ensure(HELLO)

    run(main)


def test_a_mirror_that_cannot_be_asked_keeps_the_old_tree_and_says_why(tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet", "lmhello"})

    async def main() -> None:
        async with live_mount(cache, tmp_path / "store") as live:
            tree = live.current.tree
            (cache / INDEX_MANIFEST).rename(tmp_path / "away")
            result = await live.refresh("asked")
            assert result["changed"] is False and "does not exist" in str(result["error"])
            assert live.refresh_error == result["error"]
            assert live.current.tree is tree and live.materializer.tree is tree
            (tmp_path / "away").rename(cache / INDEX_MANIFEST)  # the mirror is back
            assert await live.refresh("asked") == {"changed": False, "packages": 2}
            assert live.refresh_error is None

    run(main)


def test_a_reload_keeps_what_a_running_mount_cannot_change(tmp_path, caplog):
    cache = served_cache(tmp_path / "cache", {"lmgreet", "lmhello"})

    async def main() -> None:
        async with live_mount(cache, tmp_path / "store") as live:
            live.next_config = dataclasses.replace(  # type: ignore[attr-defined]
                live.config, projection="{name}/{hash}", store_quota=64 << 20,
                index_refresh=60.0)
            assert await live.refresh("reload", reload=True) == {"changed": False,
                                                                  "packages": 2}
            assert live.config.projection == live.current.tree.projection != "{name}/{hash}"
            assert live.config.index_refresh == 60.0  # these two take effect now
            assert live.materializer.usage.quota == 64 << 20

    run(main)
    assert "reload: projection changed; it takes effect when the mount is mounted again" \
        in caplog.text


def test_the_periodic_check_keeps_its_interval_and_follows_a_reload(tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet", "lmhello"})

    async def main() -> None:
        async with live_mount(cache, tmp_path / "store", Watched,
                              index_refresh=600.0) as live:
            assert isinstance(live, Watched)
            live.checks = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(live.run_periodically)
                await trio.sleep(600 * 10)
                # a random phase within the first interval, then the interval +-10 %
                first, *rest = live.checks
                assert 0 <= first <= 600
                gaps = [b - a for a, b in zip(live.checks, rest, strict=False)]
                assert len(gaps) >= 8
                assert all(600 * (1 - SPREAD) <= gap <= 600 * (1 + SPREAD) for gap in gaps)
                live.next_config = dataclasses.replace(  # type: ignore[attr-defined]
                    live.config, index_refresh=0.0)  # checks only when asked
                await live.refresh("reload", reload=True)
                count = len(live.checks)
                await trio.sleep(600 * 10)
                assert len(live.checks) == count
                nursery.cancel_scope.cancel()

    run(main, autojump=True)
