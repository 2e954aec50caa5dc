"""Loading the index of every mirror into one catalog (hash -> SpecRecord).

Runs on the trio thread; JSON parsing of a large index hops to a worker thread.
"""

from __future__ import annotations

import logging

import trio

from .errors import LazymountError, MirrorError
from .fetch import fetch_bytes
from .index import SpecRecord, merge_indexes, parse_index
from .layout import INDEX_MANIFEST, MEDIA_INDEX
from .manifest import MAX_MANIFEST_BYTES, parse_manifest, pick
from .transport import Mirror

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 2 << 30


async def load_index(mirror: Mirror, position: int) -> dict[str, SpecRecord]:
    """The records of one mirror's layout-v3 index. Raises a LazymountError naming the mirror."""
    what = f"index of {mirror.url}"
    text = await mirror.read(INDEX_MANIFEST, MAX_MANIFEST_BYTES)
    record = pick(parse_manifest(text, what), MEDIA_INDEX, what)
    if record.compression != "none":
        raise MirrorError(f"{what}: unsupported index compression {record.compression!r}")
    blob = await fetch_bytes(mirror, record, what, MAX_INDEX_BYTES)
    return await trio.to_thread.run_sync(parse_index, blob, position)


async def load_catalog(mirrors: list[Mirror]) -> dict[str, SpecRecord]:
    """Merged catalog of all mirrors, first mirror first.

    A mirror whose index cannot be read is skipped with a warning; if none can be read, the
    first error is raised.
    """
    results: list[dict[str, SpecRecord] | LazymountError] = [MirrorError("not read")] * len(mirrors)

    async def one(position: int, mirror: Mirror) -> None:
        try:
            results[position] = await load_index(mirror, position)
        except LazymountError as exc:
            results[position] = exc

    async with trio.open_nursery() as nursery:
        for position, mirror in enumerate(mirrors):
            nursery.start_soon(one, position, mirror)
    indexes = [r for r in results if isinstance(r, dict)]
    for result in results:
        if isinstance(result, LazymountError):
            if not indexes:
                raise result
            log.warning("skipping a mirror: %s", result)
    return merge_indexes(indexes)
