"""What ``lazymount publish`` adds to an ``oci://`` build cache, kept in its own repository.

A registry holds images, not folders, so the files ``published.py`` names are stored there
as OCI artifacts under tags (a tag works on every registry; the referrers API, which an
OCI referrer of the spec image would need, is missing from many):

* a table of contents: tagged ``lazymount-toc-<tarball sha256>`` (a client knows the
  tarball's digest from the spec's image manifest), ``artifactType``
  ``application/vnd.lazymount.toc.v1``; its first layer the clearsigned envelope
  (``application/vnd.lazymount.toc.v1+json``), then one layer per window
  (``application/vnd.lazymount.window.v1``), so the registry keeps the windows as long as
  the tag;
* the site catalog: tagged ``lazymount-catalog``, ``artifactType``
  ``application/vnd.lazymount.catalog.v1``; its envelope
  (``application/vnd.lazymount.catalog.v1+json``), then its payload
  (``application/vnd.lazymount.catalog-payload.v1``).

Each is an image manifest (``application/vnd.oci.image.manifest.v1+json``) with the empty
config (``application/vnd.oci.empty.v1+json``, the two bytes ``{}``). A payload's digest is
its sha256, so it is read as ``blobs/sha256:<sha256>``. The registry is trusted for nothing:
the envelope's signature and the sha256s it names are.

``RegistryPublished`` reads these as a ``--toc`` place is read (``published`` paths), so a
client finds and checks them in a registry by the same code as anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from lazymount.buildcache import published
from lazymount.buildcache.fetch import fetch_bytes
from lazymount.buildcache.manifest import BlobRecord
from lazymount.buildcache.ocimanifest import (
    MEDIA_OCI_MANIFEST,
    manifest_location,
    parse_image_manifest,
)
from lazymount.errors import FormatError, NotInMirror
from lazymount.mirror.transport import Mirror

TOC_TYPE = "application/vnd.lazymount.toc.v1"
MEDIA_TOC = "application/vnd.lazymount.toc.v1+json"
MEDIA_WINDOW = "application/vnd.lazymount.window.v1"
CATALOG_TYPE = "application/vnd.lazymount.catalog.v1"
MEDIA_CATALOG = "application/vnd.lazymount.catalog.v1+json"
MEDIA_PAYLOAD = "application/vnd.lazymount.catalog-payload.v1"
CATALOG_TAG = "lazymount-catalog"
MEDIA_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY).hexdigest()
MAX_MANIFEST_BYTES = 4 << 20  # a layer descriptor per window: ~150 bytes each

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOC = re.compile(re.escape(published.ROOT) + r"/toc/([0-9a-f]{64})\.json\.sig")
_BLOB = re.compile(re.escape(published.ROOT) + r"/blobs/([0-9a-f]{64})")

Layer = tuple[str, str, int]  # mediaType, digest, size


def toc_tag(tarball_sha256: str) -> str:
    """The tag of a tarball's TOC artifact."""
    if not _SHA256.fullmatch(tarball_sha256):
        raise FormatError(f"not a sha256: {tarball_sha256[:80]!r}")
    return f"lazymount-toc-{tarball_sha256}"


def artifact_manifest(artifact_type: str, layers: list[Layer]) -> bytes:
    """An artifact's image manifest: the empty config, ``layers`` in order."""
    def descriptor(media_type: str, digest: str, size: int) -> dict[str, object]:
        return {"mediaType": media_type, "digest": digest, "size": size}

    document = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(MEDIA_EMPTY, EMPTY_DIGEST, len(EMPTY)),
        "layers": [descriptor(*layer) for layer in layers],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def read_artifact(manifest: bytes, envelope_type: str, where: str
                  ) -> tuple[BlobRecord, set[str]]:
    """The envelope layer of an artifact's manifest, and the sha256s of its other layers
    (windows, a payload); FormatError if the first layer is not an ``envelope_type``."""
    image = parse_image_manifest(manifest, where)
    envelope = image.layers[0]
    if envelope.media_type != envelope_type:
        raise FormatError(f"{where}: not a lazymount artifact (its first layer is "
                          f"{envelope.media_type[:100]!r})")
    return envelope, {layer.checksum for layer in image.layers[1:]}


async def read_envelope(registry: Mirror, tag: str, envelope_type: str, max_bytes: int,
                        revalidate: bool = False) -> tuple[bytes, set[str]]:
    """The envelope of the artifact tagged ``tag`` (its sha256 checked against the
    manifest), and the sha256s of the blobs stored with it. ``revalidate``: the tag moves
    (the catalog's). Raises NotInMirror when there is no such tag, MirrorError,
    FormatError, IntegrityError."""
    location = manifest_location(tag)
    where = registry.where(location)
    manifest = await registry.read(location, MAX_MANIFEST_BYTES, revalidate=revalidate)
    envelope, others = read_artifact(manifest, envelope_type, where)
    return await fetch_bytes(registry, envelope, where, max_bytes), others


class RegistryPublished(Mirror):
    """What ``lazymount publish`` put into an ``oci://`` cache's repository, read by the
    paths a folder or a ``--toc`` place has it at (``published.py``)."""

    def __init__(self, registry: Mirror):
        self.registry = registry
        self.url = registry.url
        self.health = registry.health

    async def read(self, path: str, max_bytes: int, *, revalidate: bool = False) -> bytes:
        toc = _TOC.fullmatch(path)
        if toc is not None:
            return (await read_envelope(self.registry, toc_tag(toc.group(1)), MEDIA_TOC,
                                        max_bytes))[0]
        if path == published.catalog_path():
            return (await read_envelope(self.registry, CATALOG_TAG, MEDIA_CATALOG, max_bytes,
                                        revalidate=True))[0]
        blob = _BLOB.fullmatch(path)
        if blob is not None:
            return await self.registry.read(f"blobs/sha256:{blob.group(1)}", max_bytes)
        raise NotInMirror(f"{self.where(path)}: a registry holds no such file")

    def where(self, path: str) -> str:
        toc = _TOC.fullmatch(path)
        if toc is not None:
            return self.registry.where(manifest_location(toc_tag(toc.group(1))))
        if path == published.catalog_path():
            return self.registry.where(manifest_location(CATALOG_TAG))
        return self.registry.where(path)

    def open(self, path: str, expected: int | None, revalidate: bool = False
             ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        raise NotInMirror(f"{self.where(path)}: a registry holds no such file")
