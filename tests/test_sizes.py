"""Sizes as options and config keys take them and as messages show them (system/sizes.py)."""

from __future__ import annotations

import pytest

from lazymount.system.sizes import option_size, parse_size, show_size


@pytest.mark.parametrize(("text", "count"), [
    ("512", 512), ("4608K", 4608 << 10), ("64G", 64 << 30), (" 2 t ", 2 << 40),
    ("10MiB", 10 << 20), ("3kb", 3 << 10),
])
def test_sizes_are_read_with_binary_units(text: str, count: int) -> None:
    assert parse_size(text) == count
    assert parse_size(option_size(count)) == count


@pytest.mark.parametrize("text", ["0", "0K", "lots", "1.5G", "-1", "12X", ""])
def test_what_is_not_a_size_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size \(like 512M or 64G\)$"):
        parse_size(text)


def test_zero_is_a_size_only_where_it_is_allowed() -> None:
    assert parse_size("0", zero=True) == 0
    assert parse_size("0M", zero=True) == 0


def test_options_show_the_shortest_suffix() -> None:
    assert [option_size(n) for n in (64 << 30, 4608 << 10, 1000, 1 << 40)] == [
        "64G", "4608K", "1000", "1T"]


@pytest.mark.parametrize(("count", "shown"), [
    (0, "0 bytes"), (812, "812 bytes"), (1023, "1023 bytes"), (1024, "1.0 KiB"),
    (9933, "9.7 KiB"), (201 << 20 | 300 << 10, "201.3 MiB"), (3 << 30, "3.0 GiB"),
    (3 << 40, "3.0 TiB"), (5000 << 40, "5000.0 TiB"),
])
def test_sizes_are_shown_in_binary_units(count: int, shown: str) -> None:
    assert show_size(count) == shown
