"""The site catalog: the mirror's index as a compact, signed catalog.

For a registry (``oci://``) it goes to ``--output``, which clients name with ``--toc URL``,
or without ``--output`` into the repository, tagged ``lazymount-catalog`` (``registry.py``).

Written as a mount would read the index (``context.layout``), so the catalog names exactly
the index the mirror's clients are told about: its payload (``catalog/sitecatalog.py``'s
form) goes to ``lazymount/v1/blobs/<sha256>``, then the clearsigned envelope naming it and
the index's sha256 to ``lazymount/v1/catalog.json.sig``, in that order, so a client never
finds an envelope whose payload is not there yet. An envelope that names the mirror's
current index, was signed with the same key and whose payload checks out is kept.
"""

from __future__ import annotations

import hashlib
from typing import Any

import trio

from lazymount.buildcache import published
from lazymount.buildcache.index import IndexSource, records_of, scan_index
from lazymount.buildcache.layout import DEFAULT_PROJECTION, is_sha256
from lazymount.buildcache.ocitoc import RegistryPublished
from lazymount.catalog import sitecatalog
from lazymount.catalog.installtree import InstallTree
from lazymount.errors import FormatError, LazymountError, MirrorError, NotInMirror
from lazymount.publish import registry
from lazymount.publish.context import Context, Output, PartReport


async def publish(context: Context) -> PartReport:
    """Write the catalog envelope and its payload for ``context.mirror``'s current index."""
    report = PartReport()
    mirror, layout = context.mirror, context.layout
    try:
        identity = await layout.index_identity(mirror, None)
        checksum = identity.checksum
        if checksum is None:
            raise FormatError(f"{context.url} names no sha256 of its index (Spack writes "
                              "build_cache/index.json.hash beside it)")
        kept = await _kept(context, checksum, layout.version)
        if kept is not None:
            report.lines.append(f"catalog: up to date ({kept['payload']['specs']} specs, "
                                f"index {checksum[:12]})")
            return report
        document = await layout.read_index(mirror, identity.named)
        if hashlib.sha256(document).hexdigest() != checksum:
            raise FormatError(f"the index of {context.url} is not the one its index.json.hash "
                              "names (being rewritten?)")
        payload, specs = await trio.to_thread.run_sync(_payload, document)
        sha256 = hashlib.sha256(payload).hexdigest()
        body = {"index": {"sha256": checksum, "size": len(document), "layout": layout.version},
                "payload": {"sha256": sha256, "size": len(payload), "specs": specs,
                            "records": sitecatalog.RECORDS}}
        envelope = published.make_envelope("catalog", body)
        signed = await trio.to_thread.run_sync(context.signer.clearsign, envelope)
        if context.output is None:
            await registry.push_catalog(context, signed, payload)
        else:
            await _write(context.output, await _envelope(context), sha256, payload, signed)
    except LazymountError as exc:
        report.failures.append(f"catalog: {exc}")
        return report
    report.lines.append(f"catalog: {specs} specs, {len(payload)} bytes for an index of "
                        f"{len(document)} bytes ({100 * len(payload) / len(document):.1f}%)")
    return report


async def _write(output: Output, before: dict[str, Any] | None, sha256: str, payload: bytes,
                 signed: bytes) -> None:
    """The payload, then the envelope naming it; then the payload only ``before`` named."""
    await output.write_async(published.blob_path(sha256), payload)
    await output.write_async(published.catalog_path(), signed)
    old = _payload_named(before)
    if old is not None and old != sha256:  # named by no envelope now
        output.path(published.blob_path(old)).unlink(missing_ok=True)


def _payload(document: bytes) -> tuple[bytes, int]:
    """The catalog payload of an index document, and how many specs it holds. Blocking."""
    table = scan_index(document)
    catalog = records_of(table, 0, IndexSource(document))
    tree = InstallTree("/", catalog, DEFAULT_PROJECTION)
    return sitecatalog.encode(document, table, tree), len(catalog)


async def _envelope(context: Context) -> dict[str, Any] | None:
    """The body of the catalog envelope written before with this key, if any."""
    output = context.output
    if output is None:
        found = await registry.read_catalog(context)
        signed = None if found is None else found[0]
    else:
        signed = await trio.to_thread.run_sync(output.read, published.catalog_path(),
                                               published.MAX_ENVELOPE_BYTES)
    plaintext = None if signed is None else await trio.to_thread.run_sync(
        context.signer.signed, signed)
    if plaintext is None:
        return None
    try:
        return published.open_envelope(plaintext, "catalog", published.catalog_path())
    except FormatError:
        return None


def _payload_named(body: dict[str, Any] | None) -> str | None:
    payload = body.get("payload") if body is not None else None
    sha256 = payload.get("sha256") if isinstance(payload, dict) else None
    return sha256 if isinstance(sha256, str) and is_sha256(sha256) else None


async def _kept(context: Context, checksum: str, layout: int) -> dict[str, Any] | None:
    """The envelope written before, if it names this index and its payload checks out."""
    body = await _envelope(context)
    index = body.get("index") if body is not None else None
    payload = body.get("payload") if body is not None else None
    if not isinstance(index, dict) or not isinstance(payload, dict) or \
            index.get("sha256") != checksum or index.get("layout") != layout or \
            payload.get("records") != sitecatalog.RECORDS:
        return None
    sha256 = _payload_named(body)
    if sha256 is None:
        return None
    data = await _read_payload(context, sha256)
    if data is None or len(data) != payload.get("size") or \
            hashlib.sha256(data).hexdigest() != payload["sha256"]:
        return None
    return body


async def _read_payload(context: Context, sha256: str) -> bytes | None:
    """The payload ``sha256`` as written before (None if absent or too large)."""
    where = published.blob_path(sha256)
    try:
        if context.output is not None:
            return await trio.to_thread.run_sync(context.output.read, where,
                                                 sitecatalog.MAX_PAYLOAD_BYTES)
        return await RegistryPublished(context.mirror).read(where, sitecatalog.MAX_PAYLOAD_BYTES)
    except (NotInMirror, MirrorError):
        return None
