"""The eviction plan of a bounded store in-process (store/quota.py): which packages go to
make room, in which order, which never go, and when nothing can make room.

Packages are real store entries (published through Store, with receipts); their last use
is their entry's mtime, as the daemon leaves it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazymount.errors import StoreFull
from lazymount.store.content import Store
from lazymount.store.quota import LOW_WATER, StoreUsage

KIB = 1024
QUOTA = 1000 * KIB


def publish(store: Store, key: str, disk_bytes: int, last_used: float) -> None:
    staging = store.new_staging(key)
    (staging / "tree").mkdir()
    store.publish(staging, staging / "tree", key, {"label": f"pkg-{key}",
                                                   "disk_bytes": disk_bytes})
    os.utime(key, (last_used, last_used), dir_fd=store.pkgs_fd, follow_symlinks=False)


@pytest.fixture
def usage(tmp_path: Path) -> StoreUsage:
    """A store holding a (oldest), b, c, d (newest) of 200 KiB each: 800 of 1000 KiB."""
    store = Store(tmp_path / "store")
    for age, key in enumerate("abcd"):
        publish(store, key, 200 * KIB, 1_000_000 + age * 60)
    table = StoreUsage(store, QUOTA)
    table.load()
    return table


def keys(rows) -> list[str]:
    return [row.key for row in rows]


def test_a_package_that_fits_evicts_nothing_and_is_reserved(usage):
    assert usage.fit("e", 200 * KIB, "pkg-e", busy=set()) == []
    assert usage.total() == QUOTA  # the reservation counts until it is published
    usage.published("e", 200 * KIB, "pkg-e")
    assert usage.total() == QUOTA and keys(usage.kept())[-1] == "e"


def test_room_is_made_least_recently_used_first_down_to_the_low_water_mark(usage):
    # 800 + 500 > 1000: evict until the store and the new package fit under the low-water
    # mark (900), so that the next package does not evict again at once
    assert usage.low_water == int(QUOTA * LOW_WATER)
    victims = usage.fit("e", 500 * KIB, "pkg-e", busy=set())
    assert keys(victims) == ["a", "b"]  # 800 -> 400 KiB: 400 + 500 is 900
    assert [row.label for row in victims] == ["pkg-a", "pkg-b"]


def test_a_recent_use_moves_a_package_to_the_back_of_the_line(usage):
    usage.touch("a")  # used now: newer than every other
    assert keys(usage.kept()) == ["b", "c", "d", "a"]
    assert keys(usage.fit("e", 500 * KIB, "pkg-e", busy=set())) == ["b", "c"]


def test_packages_in_use_are_never_in_the_plan(usage):
    victims = usage.fit("e", 500 * KIB, "pkg-e", busy={"a", "c"})
    assert keys(victims) == ["b", "d"]


def test_a_package_bigger_than_the_evictable_room_fails_and_evicts_nothing(usage):
    with pytest.raises(StoreFull) as refused:
        usage.fit("e", 700 * KIB, "pkg-e", busy={"a", "b"})
    assert str(refused.value) == (
        "pkg-e: needs 700.0 KiB but the store quota of 1000.0 KiB has only 600.0 KiB left "
        "even after evicting every package not in use")
    assert usage.total() == 800 * KIB  # nothing reserved
    assert keys(usage.kept()) == ["a", "b", "c", "d"]


def test_a_reservation_not_published_is_given_back(usage):
    usage.fit("e", 200 * KIB, "pkg-e", busy=set())
    assert usage.room(busy=set()) == QUOTA - 200 * KIB
    usage.release("e")
    assert usage.total() == 800 * KIB and usage.room(busy=set()) == QUOTA


def test_an_evicted_package_no_longer_counts(usage):
    usage.evicting("a")
    assert usage.total() == 600 * KIB and keys(usage.kept()) == ["b", "c", "d"]
    assert usage.fit("e", 200 * KIB, "pkg-e", busy=set()) == []


def test_without_a_quota_there_is_no_plan(tmp_path):
    store = Store(tmp_path / "store")
    publish(store, "a", 200 * KIB, 1_000_000)
    table = StoreUsage(store)
    table.load()
    assert table.fit("e", 10 << 40, "pkg-e", busy=set()) == [] and table.room(set()) is None


def test_last_uses_are_written_back_to_the_store(usage, tmp_path):
    usage.touch("b")
    usage.flush()
    again = StoreUsage(usage.store, QUOTA)
    again.load()  # as a restarted daemon reads them
    assert keys(again.kept()) == ["a", "c", "d", "b"]
