"""Tables of contents and the site catalog pushed into the registry repository of an
``oci://`` cache, as the artifacts ``buildcache/ocitoc.py`` describes: the blobs first, then
the manifest under its tag (``lazymount-toc-<tarball sha256>``, ``lazymount-catalog``), so a
client never finds a tag whose blobs are missing.
"""

from __future__ import annotations

import trio

from lazymount.buildcache import ocitoc
from lazymount.buildcache.manifest import BlobRecord
from lazymount.buildcache.ocimanifest import MEDIA_OCI_MANIFEST
from lazymount.buildcache.published import MAX_ENVELOPE_BYTES
from lazymount.buildcache.toc import parse_toc
from lazymount.errors import FormatError, IntegrityError, NotInMirror, UsageError
from lazymount.mirror.oci import OciMirror
from lazymount.publish.context import Context


def registry_of(context: Context) -> OciMirror:
    if not isinstance(context.mirror, OciMirror):
        raise UsageError(f"{context.url} is not a registry: give --output DIR")
    return context.mirror


async def push(context: Context, tarball_sha256: str, signed: bytes,
               windows: dict[str, bytes]) -> None:
    """The windows, the envelope ``signed`` and the tagged manifest naming them."""
    registry = registry_of(context)
    layers = [(ocitoc.MEDIA_TOC, await registry.push_blob(signed), len(signed))]
    for window in windows.values():
        layers.append((ocitoc.MEDIA_WINDOW, await registry.push_blob(window), len(window)))
    await _tag(registry, ocitoc.toc_tag(tarball_sha256), ocitoc.TOC_TYPE, layers)


async def push_catalog(context: Context, signed: bytes, payload: bytes) -> None:
    """The site catalog: its payload, its envelope and the manifest tagged
    ``lazymount-catalog`` naming them (the blobs an earlier tag named are left to the
    registry's garbage collection)."""
    registry = registry_of(context)
    layers = [(ocitoc.MEDIA_CATALOG, await registry.push_blob(signed), len(signed)),
              (ocitoc.MEDIA_PAYLOAD, await registry.push_blob(payload), len(payload))]
    await _tag(registry, ocitoc.CATALOG_TAG, ocitoc.CATALOG_TYPE, layers)


async def read_catalog(context: Context) -> tuple[bytes, set[str]] | None:
    """The catalog envelope under ``lazymount-catalog`` and the sha256s stored with it;
    None if there is none that can be read."""
    try:
        return await ocitoc.read_envelope(registry_of(context), ocitoc.CATALOG_TAG,
                                          ocitoc.MEDIA_CATALOG, MAX_ENVELOPE_BYTES,
                                          revalidate=True)
    except (NotInMirror, FormatError, IntegrityError):
        return None


async def _tag(registry: OciMirror, tag: str, artifact_type: str,
               layers: list[ocitoc.Layer]) -> None:
    """The manifest of ``layers`` under ``tag``, after its blobs (the empty config too):
    a client never finds a tag whose blobs are missing."""
    await registry.push_blob(ocitoc.EMPTY)
    await registry.put_manifest(tag, ocitoc.artifact_manifest(artifact_type, layers),
                                MEDIA_OCI_MANIFEST)


async def up_to_date(context: Context, tarball: BlobRecord) -> bool:
    """Whether the repository has a TOC of ``tarball`` under its tag, signed by this key,
    stored with every window it names."""
    try:
        signed, stored = await ocitoc.read_envelope(
            registry_of(context), ocitoc.toc_tag(tarball.checksum), ocitoc.MEDIA_TOC,
            MAX_ENVELOPE_BYTES)
    except (NotInMirror, FormatError, IntegrityError):
        return False
    plaintext = await trio.to_thread.run_sync(context.signer.signed, signed)
    if plaintext is None:
        return False
    try:
        toc = parse_toc(plaintext, ocitoc.toc_tag(tarball.checksum))
    except FormatError:
        return False
    if toc.tarball_sha256 != tarball.checksum or tarball.length not in (None, toc.tarball_size):
        return False
    return all(point.window in stored for point in toc.points if point.window)
