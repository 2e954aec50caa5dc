"""The site catalog: the mirror's index as a compact, signed catalog (being written)."""

from __future__ import annotations

from lazymount.publish.context import Context, PartReport


async def publish(context: Context) -> PartReport:
    """Write the catalog envelope and its payload for ``context.mirror``'s current index."""
    return PartReport(lines=["catalog: not written yet by this version"])
