"""Runs the parts of a publication in order, each over the same context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from lazymount.publish import sitecatalog, tocs
from lazymount.publish.context import Context, PartReport

Part = Callable[[Context], Awaitable[PartReport]]

# The catalog first: it is small, and a client that finds it has the index at once.
PARTS: tuple[tuple[str, Part], ...] = (
    ("catalog", sitecatalog.publish),
    ("tables of contents", tocs.publish),
)


async def publish(context: Context) -> list[tuple[str, PartReport]]:
    """Every part's report, in order; a part that fails on one item goes on with the next."""
    return [(name, await part(context)) for name, part in PARTS]
