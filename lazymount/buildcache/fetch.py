"""Downloading blobs and checking them against their manifest record.

Large blobs are streamed: the trio thread downloads and hashes, and a worker thread consumes
the bytes (decompresses and extracts) from a pipe at the same time, so nothing waits for the
whole blob. The length and sha256 are checked at the end; the caller publishes nothing unless
this returns normally. A record without a length (layout v2 signs only the sha256) is bounded
by the caller's maximum instead, and only its sha256 is checked.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from typing import BinaryIO, TypeVar

import trio

from lazymount.buildcache.manifest import BlobRecord
from lazymount.errors import IntegrityError, LazymountError
from lazymount.mirror.transport import Mirror

T = TypeVar("T")
PIPE_SIZE = 1 << 20
MAX_UNSIZED_BLOB = 64 << 30  # default bound on a blob whose record gives no length


class _Digest:
    """Running length and sha256 of a download, refusing bytes past the promised length
    (or past ``max_bytes`` when the record has no length)."""

    def __init__(self, record: BlobRecord, what: str, max_bytes: int):
        self.record = record
        self.what = what
        self.sha = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.record.length is None:
            if self.size > self.max_bytes:
                raise IntegrityError(
                    f"{self.what}: blob {self.record.checksum[:12]} is larger than the "
                    f"{self.max_bytes} byte limit"
                )
        elif self.size > self.record.length:
            raise IntegrityError(
                f"{self.what}: blob {self.record.checksum[:12]} is longer than the "
                f"{self.record.length} bytes its manifest says"
            )
        self.sha.update(chunk)

    def check(self) -> None:
        if self.record.length is not None and self.size != self.record.length:
            raise IntegrityError(
                f"{self.what}: blob {self.record.checksum[:12]} has {self.size} bytes, "
                f"its manifest says {self.record.length}"
            )
        if self.sha.hexdigest() != self.record.checksum:
            raise IntegrityError(
                f"{self.what}: sha256 mismatch for blob {self.record.checksum[:12]}: "
                f"got {self.sha.hexdigest()[:12]}"
            )


async def fetch_bytes(mirror: Mirror, record: BlobRecord, what: str, max_bytes: int) -> bytes:
    """A small blob in memory, after its length and sha256 are checked."""
    if record.length is not None and record.length > max_bytes:
        raise IntegrityError(f"{what}: blob of {record.length} bytes is over the {max_bytes} limit")
    digest = _Digest(record, what, max_bytes)
    chunks = []
    async with mirror.open(record.path, record.length) as stream:
        async for chunk in stream:
            digest.update(chunk)
            chunks.append(chunk)
    digest.check()
    return b"".join(chunks)


async def stream_blob(
    mirror: Mirror, record: BlobRecord, what: str, consume: Callable[[BinaryIO], T],
    max_bytes: int = MAX_UNSIZED_BLOB,
) -> T:
    """Run ``consume(reader)`` in a worker thread on the blob's bytes as they arrive.

    Returns what ``consume`` returned, once the blob's length and sha256 are verified.
    A checksum error wins over whatever ``consume`` raised on the same bad bytes.
    ``max_bytes`` bounds a record without a length (IntegrityError past it).
    """
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only costs speed
    reader = os.fdopen(read_fd, "rb", buffering=PIPE_SIZE)
    digest = _Digest(record, what, max_bytes)
    outcome: dict[str, object] = {}

    def run_consumer() -> None:
        try:
            outcome["value"] = consume(reader)
        except BaseException as exc:  # handed to the trio side, raised there
            outcome["error"] = exc
        finally:
            reader.close()

    failure: LazymountError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, run_consumer)
        try:
            await _pump(mirror, record, digest, write_fd)
        except LazymountError as exc:  # kept out of the nursery, so it is not wrapped in a group
            failure = exc
    if failure is not None:
        raise failure
    digest.check()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


async def _pump(mirror: Mirror, record: BlobRecord, digest: _Digest, write_fd: int) -> None:
    """Download into the pipe while hashing; keeps hashing if the consumer stops early."""
    pipe: trio.lowlevel.FdStream | None = trio.lowlevel.FdStream(write_fd)
    try:
        async with mirror.open(record.path, record.length) as stream:
            async for chunk in stream:
                digest.update(chunk)
                if pipe is not None:
                    try:
                        await pipe.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # the consumer gave up; finish the download only to tell a
                        # tampered blob (checksum error) from a bad archive
                        await pipe.aclose()
                        pipe = None
    finally:
        if pipe is not None:
            await pipe.aclose()
