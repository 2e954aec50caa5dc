"""Tables of contents of big tarballs, for per-file fetching (``buildcache/toc.py``).

For every spec of the mirror's index: its entry is read and verified as a mount reads it
(``layout.read_entry`` with the publication's trust), so only tarballs a signed manifest
names are described; a tarball under ``--min-size`` is skipped, and so is one whose TOC is
already in the output, signed by this signing key, and whose windows are there (publishing
again is incremental). Otherwise the tarball is downloaded to a temporary file (its length
and sha256 checked against the manifest), described (``describe.py``), and its windows and
signed TOC written: windows first, so a client never finds a TOC whose blobs are missing.
The output is a folder (``published.py``'s paths), or, for an ``oci://`` cache without
``--output``, the registry repository itself (``registry.py``).

One tarball at a time: describing is CPU-bound and the host is shared. A failure is reported
for its package and the next one is described.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import trio

from lazymount.buildcache.fetch import stream_blob
from lazymount.buildcache.index import SpecRecord, parse_index
from lazymount.buildcache.manifest import BlobRecord
from lazymount.buildcache.published import (
    MAX_ENVELOPE_BYTES,
    blob_path,
    make_envelope,
    toc_path,
)
from lazymount.buildcache.toc import WINDOW, parse_toc, toc_body
from lazymount.errors import FormatError, LazymountError
from lazymount.publish import registry
from lazymount.publish.context import Context, Output, PartReport
from lazymount.publish.describe import Described, describe

COPY = 1 << 20


async def publish(context: Context) -> PartReport:
    """Write a signed TOC for every tarball of at least ``context.options.min_size``."""
    report = PartReport()
    try:
        blob = await context.layout.read_index(context.mirror)
        records = await trio.to_thread.run_sync(parse_index, blob)
    except LazymountError as exc:
        report.failures.append(f"tables of contents: cannot read the index of "
                               f"{context.url}: {exc}")
        return report
    specs = sorted((r for r in records.values() if r.in_buildcache and not r.external_path),
                   key=lambda r: (r.name, r.version, r.dag_hash))
    counts: Counter[str] = Counter()
    progress = _Progress(context, len(specs))
    try:
        for record in specs:
            label = f"{record.name}-{record.version}-{record.dag_hash[:7]}"
            progress.begin(label)
            try:
                counts[await _one(context, record, label)] += 1
            except _TooBig as exc:
                report.lines.append(str(exc))
                counts["big"] += 1
            except LazymountError as exc:
                message = str(exc)
                report.failures.append(message if message.startswith(label)
                                       else f"{label}: {message}")
                counts["failed"] += 1
            progress.done()
    finally:
        progress.close()
    report.lines.append(_summary(counts, context))
    return report


async def _one(context: Context, record: SpecRecord, label: str) -> str:
    """Describe one spec's tarball; what happened: "written", "kept", "small", "other"."""
    entry = await context.layout.read_entry(context.mirror, record, context.trust, label)
    tarball = entry.tarball
    if tarball.compression != "gzip":
        return "other"
    if tarball.length is not None and tarball.length < context.options.min_size:
        return "small"
    if await _up_to_date(context, tarball):
        return "kept"
    with tempfile.TemporaryDirectory(prefix="lazymount-publish-") as folder:
        path = Path(folder) / "tarball"
        await stream_blob(context.mirror, tarball, label, lambda reader: _spool(reader, path))
        if path.stat().st_size < context.options.min_size:  # a v2 record has no length
            return "small"
        described = await trio.to_thread.run_sync(describe, path, tarball.checksum, label)
    await _write(context, described, label)
    return "written"


class _TooBig(Exception):
    """A tarball whose TOC would be larger than clients read."""


def _spool(reader: BinaryIO, path: Path) -> None:
    with open(path, "wb") as file:
        shutil.copyfileobj(reader, file, COPY)


async def _write(context: Context, described: Described, label: str) -> None:
    """The windows, then the signed TOC that names them."""
    if context.output is not None:
        await trio.to_thread.run_sync(_write_windows, context.output, described.windows)
    plaintext = await trio.to_thread.run_sync(make_envelope, "toc", toc_body(described.toc))
    signed = await trio.to_thread.run_sync(context.signer.clearsign, plaintext)
    if len(signed) > MAX_ENVELOPE_BYTES:  # a limit of the format, not a fault: said, skipped
        raise _TooBig(f"{label}: {len(described.toc.members)} members; its table of contents "
                      f"would take {len(signed)} bytes, more than clients read "
                      f"({MAX_ENVELOPE_BYTES}): none written")
    if context.output is None:
        await registry.push(context, described.toc.tarball_sha256, signed,
                                described.windows)
    else:
        await context.output.write_async(toc_path(described.toc.tarball_sha256), signed)


async def _up_to_date(context: Context, tarball: BlobRecord) -> bool:
    """Whether the output holds a TOC of ``tarball`` signed by this key, with its windows."""
    output = context.output
    if output is None:
        return await registry.up_to_date(context, tarball)
    where = toc_path(tarball.checksum)
    signed = await trio.to_thread.run_sync(output.read, where, MAX_ENVELOPE_BYTES)
    plaintext = None if signed is None else await trio.to_thread.run_sync(
        context.signer.signed, signed)
    if plaintext is None:
        return False
    try:
        toc = parse_toc(plaintext, where)
    except FormatError:
        return False
    if toc.tarball_sha256 != tarball.checksum or tarball.length not in (None, toc.tarball_size):
        return False
    return await trio.to_thread.run_sync(_windows_present, output, [p.window for p in toc.points])


def _write_windows(output: Output, windows: dict[str, bytes]) -> None:
    for sha256, window in windows.items():
        relative = blob_path(sha256)
        if not _holds(output.read(relative, WINDOW), sha256):
            output.write(relative, window)


def _windows_present(output: Output, windows: list[str]) -> bool:
    return all(_holds(output.read(blob_path(w), WINDOW), w) for w in windows if w)


def _holds(data: bytes | None, sha256: str) -> bool:
    return data is not None and hashlib.sha256(data).hexdigest() == sha256


class _Progress:
    """A bar on a terminal (``begin`` names the package being described, ``done`` counts
    it), nothing otherwise."""

    def __init__(self, context: Context, total: int):
        self.bar: Any = None
        if context.options.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="pkg", desc="tables of contents",
                            file=sys.stderr)

    def begin(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(counts: Counter[str], context: Context) -> str:
    parts = [f"{counts['written']} written", f"{counts['kept']} up to date",
             f"{counts['small']} under {context.options.min_size} bytes"]
    if counts["big"]:
        parts.append(f"{counts['big']} with too many members")
    if counts["other"]:
        parts.append(f"{counts['other']} not gzip")
    if counts["failed"]:
        parts.append(f"{counts['failed']} failed")
    return "tables of contents: " + ", ".join(parts)
