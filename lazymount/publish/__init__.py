"""The site's side: ``lazymount publish`` describes a mirror for its clients.

``context.py`` holds what every part of a publication shares (the mirror read through the
same transports as a mount, the trust its manifests are checked with, the signing key, the
place the files go); each part is one module with one ``async def publish(context) ->
PartReport``, run in order by ``run.py``:

    sitecatalog.py   the mirror's index as a compact, signed catalog
    tocs.py          a signed table of contents per big tarball (per-file fetching)

Where the files go inside a mirror is ``buildcache/published.py``'s (clients read it too).
"""
