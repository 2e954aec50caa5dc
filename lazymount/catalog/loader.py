"""Loading the index of every mirror into one catalog (hash -> SpecRecord).

A mirror's index comes from the catalog store while it is unchanged, else from the site
catalog the mirror publishes (``sitecatalog.py``: signed by a trusted key and made from the
mirror's current index), else from its JSON document.

Runs on the trio thread; JSON parsing of a large index hops to a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from lazymount.buildcache.formats import CacheLayout, Identity, discover
from lazymount.buildcache.index import SpecRecord, merge_indexes, parse_index
from lazymount.catalog import sitecatalog
from lazymount.catalog.sitecatalog import SiteCatalog
from lazymount.catalog.stored import CatalogStore
from lazymount.errors import LazymountError, MirrorError
from lazymount.mirror.transport import Mirror
from lazymount.trust.policy import Trust

log = logging.getLogger(__name__)


async def load_index(mirror: Mirror, position: int, store: CatalogStore | None = None,
                     trust: Trust | None = None, stored_first: bool = False,
                     places: Sequence[Mirror] = ()) -> dict[str, SpecRecord]:
    """The records of one mirror's index, whichever layout (v3, or the old v2) it has; with
    a ``store``, parsed once and reused while unchanged (with ``stored_first``, reused
    without asking the mirror: see ``CatalogStore.load``); with ``trust``, from the site
    catalog on the mirror or at one of ``places`` (``--toc`` URLs) if one signed by a
    trusted key names its current index. Raises a LazymountError naming the mirror."""

    async def site(mirror: Mirror, layout: CacheLayout, identity: Identity
                   ) -> SiteCatalog | None:
        return None if trust is None else await sitecatalog.read(mirror, layout, identity,
                                                                 trust, places)

    if store is not None:
        return await store.load(mirror, position, site, ask=not stored_first)
    layout = await discover(mirror)
    named = None
    if trust is not None:  # which index: what a site catalog must name
        identity = await layout.index_identity(mirror, None)
        catalog = await site(mirror, layout, identity)
        if catalog is not None:
            return await trio.to_thread.run_sync(catalog.catalog, position)
        named = identity.named
    blob = await layout.read_index(mirror, named)
    return await trio.to_thread.run_sync(parse_index, blob, position)


async def load_catalog(mirrors: list[Mirror], store: CatalogStore | None = None,
                       trust: Trust | None = None, stored_first: bool = False,
                       places: Sequence[Mirror] = ()) -> dict[str, SpecRecord]:
    """Merged catalog of all mirrors, first mirror first (kept in ``store`` if given; from
    their site catalogs when ``trust`` trusts them; ``stored_first``: see ``load_index``).

    A mirror whose index cannot be read is skipped with a warning; if none can be read, the
    first error is raised.
    """
    results: list[dict[str, SpecRecord] | LazymountError] = [MirrorError("not read")] * len(mirrors)

    async def one(position: int, mirror: Mirror) -> None:
        try:
            results[position] = await load_index(mirror, position, store, trust,
                                                 stored_first, places)
        except LazymountError as exc:
            results[position] = exc

    async with trio.open_nursery() as nursery:
        for position, mirror in enumerate(mirrors):
            nursery.start_soon(one, position, mirror)
    indexes = [r for r in results if isinstance(r, dict)]
    for mirror, result in zip(mirrors, results, strict=True):
        if isinstance(result, LazymountError):
            if not indexes:
                raise result
            log.warning("skipping mirror %s: %s", mirror.url, result)
    return merge_indexes(indexes)
