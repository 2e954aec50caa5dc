"""Tables of contents pushed into the registry repository of an ``oci://`` cache, as the
artifact ``buildcache/ocitoc.py`` describes: the windows and the envelope as blobs first,
then the manifest under the tag ``lazymount-toc-<tarball sha256>``, so a client never finds
a tag whose blobs are missing.
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
    await registry.push_blob(ocitoc.EMPTY)
    layers = []
    for window in windows.values():
        layers.append((await registry.push_blob(window), len(window)))
    envelope = (await registry.push_blob(signed), len(signed))
    await registry.put_manifest(ocitoc.toc_tag(tarball_sha256),
                                ocitoc.toc_manifest(envelope, layers), MEDIA_OCI_MANIFEST)


async def up_to_date(context: Context, tarball: BlobRecord) -> bool:
    """Whether the repository has a TOC of ``tarball`` under its tag, signed by this key,
    stored with every window it names."""
    try:
        signed, stored = await ocitoc.read_envelope(registry_of(context), tarball.checksum,
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
