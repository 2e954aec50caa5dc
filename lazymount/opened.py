"""Opening a package through its signed table of contents instead of materializing it whole.

A package whose tarball has a TOC (``buildcache/toc.py``) clearsigned by a trusted key, and
naming the tarball the signed manifest names, is *opened*: its directories and symbolic links
are made in the store at once (a partial package, ``store/partial.py``), the stats of its
files come from the TOC, and a file's bytes are fetched on its first open: the compressed
span(s) it lives in by HTTP range requests, the window before its seek point, each checked
against the TOC, inflated from the seek point (``install/tocread.py``; an inflated span is
kept for the next members in it, and its end is the window of the span after), its content
checked against its sha256, relocated exactly as a whole prefix is (``install/onefile.py``)
and renamed into the tree. Reads of members in the same span share one fetch, and the
small files lying in the spans inflated for a small file are made with it, in the background
(the next open of a header is a store hit, not a round through every layer).

Anything that does not check out raises ``TocUnusable``: the materializer then falls back
to the whole tarball, as without a TOC. Runs on the trio thread; the blocking parts run in
worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lazymount.buildcache import published
from lazymount.buildcache.manifest import BlobRecord, is_clearsigned
from lazymount.buildcache.toc import Toc, TocMember, parse_toc, relocated_size, span_end, spans_of
from lazymount.errors import FormatError, IntegrityError, LazymountError, MirrorError, NotInMirror
from lazymount.install import onefile
from lazymount.install.buildinfo import (
    BUILDINFO,
    BuildInfo,
    check_build_prefix,
    parse_buildinfo,
)
from lazymount.install.tocread import check_member, inflate_span
from lazymount.mirror.transport import Mirror
from lazymount.store import partial
from lazymount.store.content import Store
from lazymount.system.files import climbs_out
from lazymount.system.sizes import show_size
from lazymount.trust.policy import Trust

log = logging.getLogger(__name__)

WINDOW_BYTES = 32 << 10
KEPT_SPANS = 4  # compressed spans kept in memory (a span is inflated once, then kept so)
KEPT_REGIONS = 12  # inflated spans (~4 MiB each) kept for the next members in them
STREAMED = 4 << 20  # files at least this big are written span by span, not held whole
READ_AHEAD = 3  # spans inflated ahead of the one being written
NEIGHBOUR_BYTES = 256 << 10  # small files made with a neighbour that shares their spans
NEIGHBOUR_BATCH = 64  # of them made in one worker step
SHEBANG_HEAD = 2  # what relocation needs of a file's start: whether it is a script


class TocUnusable(LazymountError):
    """A table of contents, or bytes it describes, that must not be used: the package is
    materialized whole instead."""


@dataclass
class FoundToc:
    """A verified TOC and the place it came from (its windows are fetched there); no place
    for the copy a partial package keeps in the store."""

    toc: Toc
    plaintext: bytes
    place: Mirror | None  # None: the store's copy (opened before a restart)


async def find_toc(places: list[Mirror], trust: Trust, tarball: BlobRecord, label: str
                   ) -> FoundToc | None:
    """The TOC of ``tarball`` from the first of ``places`` that has one: None if none has;
    TocUnusable if one is there but is not signed by a trusted key, is malformed, or names
    another tarball."""
    path = published.toc_path(tarball.checksum)
    for place in places:
        try:
            document = await place.read(path, published.MAX_ENVELOPE_BYTES)
        except NotInMirror:
            continue
        except MirrorError as exc:
            log.warning("%s: no table of contents from %s: %s", label, place.url, exc)
            continue
        where = place.where(path)
        if not is_clearsigned(document) or trust.verifier is None:
            raise TocUnusable(f"the table of contents {where} is not signed by a trusted key")
        try:
            plaintext = await trust.verify(document, label)
            toc = parse_toc(plaintext, where)
        except LazymountError as exc:
            raise TocUnusable(str(exc)) from None
        if toc.tarball_sha256 != tarball.checksum or (
                tarball.length is not None and toc.tarball_size != tarball.length):
            raise TocUnusable(f"the table of contents {where} describes another tarball "
                              f"({toc.tarball_sha256[:12]}, not {tarball.checksum[:12]})")
        return FoundToc(toc, plaintext, place)
    return None


@dataclass
class _Flight:
    """One fetch that several callers wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


class _NotMade(LazymountError):
    """A file that was to be made with its neighbours and was not: its open fetches it."""


class Shape:
    """The paths of an opened package, from its TOC, below its prefix: what a lookup, a stat
    and a listing answer before any file is there. Checked like extraction checks a
    tarball: every member inside the prefix, no member under a link or a file, no link
    climbing out. Raises TocUnusable."""

    def __init__(self, toc: Toc, label: str):
        # parse_toc checked every path: inside the prefix (or a folder above it), once
        self.prefix = toc.prefix
        self.members: dict[str, TocMember] = {}  # path below the prefix -> member
        self.root_mode = 0o755
        for member in toc.members:
            if member.path == self.prefix:
                self.root_mode = member.mode
            elif not self.prefix or member.path.startswith(self.prefix + "/"):
                self.members[self.rel_of(member.path)] = member
        self.buildinfo = self.members.get(BUILDINFO)
        if self.buildinfo is None or self.buildinfo.kind != "file":
            raise TocUnusable(f"{label}: the table of contents lists no {BUILDINFO}")
        self.children: dict[str, list[str]] = {}
        leaves = {rel for rel, m in self.members.items() if m.kind != "dir"}
        for rel, member in self.members.items():
            parent, _, name = rel.rpartition("/")
            self.children.setdefault(parent, []).append(name)
            self._check(rel, member, leaves, label)
        for rel in list(self.children):  # folders that hold members without being listed
            while rel:
                parent, _, name = rel.rpartition("/")
                if rel not in self.members:
                    self.children.setdefault(parent, []).append(name)
                    self.members[rel] = TocMember(f"{self.prefix}/{rel}".lstrip("/"), "dir",
                                                  0o755, 0, "", 0, "")
                rel = parent
        for names in self.children.values():
            names[:] = sorted(set(names))

    def _check(self, rel: str, member: TocMember, leaves: set[str], label: str) -> None:
        parent = rel.rpartition("/")[0]
        while parent:
            if parent in leaves:
                raise TocUnusable(f"{label}: {member.path} lies below a link or a file")
            parent = parent.rpartition("/")[0]
        if member.kind == "symlink":
            target = member.link
            if not target or "\0" in target:
                raise TocUnusable(f"{label}: {member.path} is a link without a target")
            if not target.startswith("/") and climbs_out(member.path, target, self.prefix):
                raise TocUnusable(f"{label}: {member.path} is a link that climbs out of the "
                                  "prefix")
        if member.kind == "hardlink" and self.rel_of(member.link) not in self.members:
            raise TocUnusable(f"{label}: {member.path} is a hard link to {member.link}, "
                              "which is not in the package")

    def rel_of(self, path: str) -> str:
        """A member path (as in the tar) below the prefix."""
        return path[len(self.prefix) + 1:] if self.prefix else path

    def files(self) -> list[str]:
        return [rel for rel, m in self.members.items() if m.kind in ("file", "hardlink")]


class Opened:
    """One opened package: its TOC, where its bytes are, and the files being fetched."""

    def __init__(self, key: str, label: str, found: FoundToc, shape: Shape, mirror: Mirror,
                 tarball: BlobRecord, store: Store,
                 start: Callable[[Callable[[], Awaitable[None]]], None]):
        """``start(fn)``: run ``fn`` in the daemon's nursery (no caller's cancel aborts a
        fetch others wait on)."""
        self.key, self.label = key, label
        self.toc, self.plaintext = found.toc, found.plaintext
        # where its windows are: beside the TOC
        self.window_places: list[Mirror] = [found.place] if found.place else [mirror]
        self.shape = shape
        self.mirror, self.tarball, self.store = mirror, tarball, store
        self.start = start
        self.tree: Path = store.pkgs / key / "tree"
        self.info: BuildInfo | None = None  # set by ``prepare``
        self.lists: onefile.Lists | None = None
        self.mapping: list[tuple[str, str]] = []
        self.sbang = ""
        self.sizes: dict[str, int] = {}  # relocated size of every file
        self.cpu = trio.CapacityLimiter(2)
        self._files: dict[str, _Flight] = {}
        self._spans: OrderedDict[int, _Flight] = OrderedDict()
        self._regions: OrderedDict[int, _Flight] = OrderedDict()
        self._windows: dict[str, _Flight] = {}
        self.replaced: trio.Event | None = None  # set once a whole tree replaced this one
        self.reason = ""  # why it was replaced
        self.failure: LazymountError | None = None  # why the whole tree failed too
        self.origin: tuple[Any, Any] | None = None  # (mirror source, entry) it came from
        self.links: dict[str, int] = {}  # file -> how many names it has
        self.completing = False
        self._staging: Path | None = None  # where files are made before they are renamed in
        self._small_spans: dict[str, range] | None = None  # the spans of each small file
        self._by_span: dict[int, list[str]] = {}  # small files by their first span
        self._made = 0
        self._naming = threading.Lock()
        self.filling = False  # being completed in the background
        self.present: set[str] = set()  # files in the tree
        self.present_bytes = 0
        self.grown: Callable[[int], None] = lambda disk_bytes: None  # the store grew so much

    # ---- what the file system asks ------------------------------------------------------

    def attr(self, rel: str) -> tuple[int, int, int] | None:
        """(kind bits | mode, size, links) of a file not yet present, None if not a file."""
        member = self.shape.members.get(rel)
        if member is None or member.kind not in ("file", "hardlink"):
            return None
        size = self.sizes.get(rel, 0)
        return (0o100000 | onefile.file_mode(self._file_member(rel).mode), size,
                self.links.get(self._target(rel), 1))

    def listing(self, rel: str) -> list[str]:
        return self.shape.children.get(rel, [])

    def describe(self) -> str:
        """How much of it is there: ``12 of 345 files, 3.1 MiB of 40.0 MiB``."""
        return (f"{len(self.present)} of {len(self.sizes)} files, "
                f"{show_size(self.present_bytes)} of {show_size(sum(self.sizes.values()))}")

    def busy(self) -> bool:
        """True while files are being fetched into it."""
        return bool(self._files)

    def filled(self) -> bool:
        """True once every file is in the tree."""
        return len(self.present) >= len(self.sizes)

    def is_file(self, rel: str) -> bool:
        member = self.shape.members.get(rel)
        return member is not None and member.kind in ("file", "hardlink")

    # ---- set up ----------------------------------------------------------------------------

    def prepare(self, info: BuildInfo, mapping: list[tuple[str, str]], sbang: str
                ) -> None:
        """The build info and the mapping: relocation rules and sizes after relocation."""
        self.info, self.mapping, self.sbang = info, mapping, sbang
        self.lists = onefile.Lists(info)
        for rel in self.shape.files():
            target = self._target(rel)
            self.links[target] = self.links.get(target, 0) + 1
        try:
            for rel in self.shape.files():
                self.sizes[rel] = relocated_size(self.toc, self._file_member(rel), mapping,
                                                 sbang)
        except FormatError as exc:
            raise TocUnusable(f"{self.label}: {exc}") from None

    def _target(self, rel: str) -> str:
        member = self.shape.members[rel]
        return self.shape.rel_of(member.link) if member.kind == "hardlink" else rel

    def _file_member(self, rel: str) -> TocMember:
        return self.shape.members[self._target(rel)]

    # ---- fetching a file -----------------------------------------------------------------

    async def ensure(self, rel: str) -> None:
        """Make ``tree/rel`` present (a file of the package). TocUnusable if its bytes do
        not check out or the mirror cannot answer ranges; MirrorError if it cannot be
        reached (a later open tries again)."""
        while rel not in self.present:
            flight = self._files.get(rel)
            if flight is None:
                flight = self._files[rel] = _Flight()
                self.start(functools.partial(self._fly, flight, self._fill, rel))
            await flight.done.wait()
            if flight.error is not None and not isinstance(flight.error, _NotMade):
                raise flight.error

    @staticmethod
    async def _fly(flight: _Flight, work: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            flight.value = await work(*args)
        except LazymountError as exc:
            flight.error = exc
        except Exception as exc:
            log.exception("unexpected failure")
            flight.error = LazymountError(f"internal error: {exc}")
        except BaseException:
            flight.error = MirrorError("the fetch was cancelled")
            raise
        finally:
            flight.done.set()

    async def _fill(self, rel: str) -> None:
        try:
            if self.shape.members[rel].kind == "hardlink":
                target = self._target(rel)
                await self.ensure(target)
                await self._staged(lambda folder, name: (onefile.link_of(
                    self.tree, target, folder, name, self.label), None), rel)
                return
            member = self.shape.members[rel]
            assert self.lists is not None
            lists = self.lists
            if member.size >= STREAMED:
                await self._fill_streamed(rel, member, lists)
                return
            data = await self.member_bytes(member)

            def make(folder: Path, name: str) -> tuple[Path, str | None]:
                path, changed = onefile.write_relocated(folder, name, rel, data, member.mode,
                                                        lists, self.mapping, self.sbang,
                                                        self.label)
                return path, None if changed else member.sha256  # unchanged: hashed already

            await self._staged(make, rel)
            self._start_neighbours(member)
        finally:
            self._files.pop(rel, None)  # present now, or tried again on the next open

    async def _fill_streamed(self, rel: str, member: TocMember, lists: onefile.Lists) -> None:
        """A big file: written to its staging file span by span as they are inflated (a few
        ahead), hashed as it goes, never whole in memory; then relocated and renamed in."""
        folder, name = await trio.to_thread.run_sync(self._work_name, rel)
        path = folder / name
        digest = hashlib.sha256()
        fd = await trio.to_thread.run_sync(onefile.create, path)
        try:
            head = await self._stream_member(member, fd, digest)
            if digest.hexdigest() != member.sha256:
                raise TocUnusable(f"{self.label}: {member.path[:200]!r}: its content does not "
                                  "match the sha256 of the table of contents")
            await trio.to_thread.run_sync(os.fchmod, fd, onefile.file_mode(member.mode))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)

        def make(folder: Path, name: str) -> tuple[Path, str | None]:
            changed = onefile.relocate_made(folder, name, rel, head, member.mode, lists,
                                            self.mapping, self.sbang, self.label)
            return path, None if changed else member.sha256

        await self._staged(make, rel, (folder, name))

    async def _stream_member(self, member: TocMember, fd: int, digest: Any) -> bytes:
        """Write ``member``'s bytes to ``fd`` and into ``digest``, in order, the next spans
        inflating meanwhile; returns its first bytes."""
        spans = spans_of(self.toc, member)
        head = b""
        written = 0
        try:
            async with trio.open_nursery() as nursery:
                for position, index in enumerate(spans):
                    for later in spans[position + 1:position + 1 + READ_AHEAD]:
                        if later not in self._regions:  # in order: each finds the one before
                            nursery.start_soon(self._fly, self._new_region(later),
                                               self._inflate, later)
                    region = await self._region(index)
                    base = self.toc.points[index].uncompressed
                    low = max(member.offset - base, 0)
                    high = min(member.offset + member.size - base, len(region))
                    piece = memoryview(region)[low:high]
                    head = head or bytes(piece[:SHEBANG_HEAD])
                    written += len(piece)
                    await trio.to_thread.run_sync(_write_hashed, fd, piece, digest)
        except BaseExceptionGroup as group:
            failures = group.subgroup(lambda exc: isinstance(exc, LazymountError))
            if failures is None:
                raise
            raise _first(failures) from None
        if written != member.size:
            raise TocUnusable(f"{self.label}: {member.path[:200]!r}: its spans hold "
                              f"{written} of its {member.size} bytes")
        return head

    async def _staged(self, make: Callable[[Path, str], tuple[Path, str | None]], rel: str,
                      named: tuple[Path, str] | None = None) -> None:
        """Make a file under a new name of the staging folder (``make(folder, name)`` gives
        its path and its sha256 if known; ``named``: that name, the file made already),
        note it in the fill log and rename it into the tree."""
        async with self.cpu:
            grown = await trio.to_thread.run_sync(self._publish, rel, make, named)
        self._present(rel, grown)

    def _publish(self, rel: str, make: Callable[[Path, str], tuple[Path, str | None]],
                 named: tuple[Path, str] | None = None) -> int:
        """Worker thread: make the file (under ``named``, or a new name), note it in the
        fill log, rename it into the tree; returns the bytes the store grew by."""
        folder, name = named or self._work_name(rel)
        path = folder / name
        try:
            path, sha256 = make(folder, name)
            st = os.lstat(path)
            if st.st_size != self.sizes.get(rel):
                log.error("%s: %s has %d bytes, its table of contents said %s; the size "
                          "served before it was fetched was wrong", self.label, rel,
                          st.st_size, self.sizes.get(rel))
            partial.note_filled(self.store, self.key, rel, st.st_size,
                                sha256 or _sha256(path))
            onefile.move_into(path, self.tree, rel, self.label)
            return st.st_blocks * 512 if st.st_nlink == 1 else 0
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    def _present(self, rel: str, grown: int) -> None:
        self.present.add(rel)
        self.present_bytes += self.sizes.get(rel, 0)
        self.grown(grown)

    # ---- the small neighbours of a file fetched --------------------------------------------
    # A span inflated for one small file holds hundreds of others (headers): each later open
    # of one would cost a round through FUSE, the trio thread and a worker thread, more than
    # making it. They are made now, in a few worker steps, from the spans already inflated,
    # each checked, relocated and renamed in exactly as a file opened on its own.

    def _neighbours(self, member: TocMember) -> list[str]:
        """The small files not present nor being fetched that lie wholly in the spans of
        ``member``, in the tarball's order."""
        if self._small_spans is None:
            self._small_spans, self._by_span = {}, {}
            for rel in self.shape.files():
                other = self.shape.members[rel]
                if other.kind == "file" and 0 < other.size <= NEIGHBOUR_BYTES:
                    spans = self._small_spans[rel] = spans_of(self.toc, other)
                    self._by_span.setdefault(spans.start, []).append(rel)
        spans = spans_of(self.toc, member)
        return [rel for index in spans for rel in self._by_span.get(index, [])
                if self._small_spans[rel].stop <= spans.stop and rel not in self.present
                and rel not in self._files]

    def _start_neighbours(self, member: TocMember) -> None:
        if self.replaced is not None or not 0 < member.size <= NEIGHBOUR_BYTES:
            return
        rels = self._neighbours(member)
        if not rels:
            return
        flights = {rel: _Flight() for rel in rels}
        self._files.update(flights)  # an open of one of them waits for its batch
        self.start(lambda: self._fill_neighbours(spans_of(self.toc, member), flights))

    async def _fill_neighbours(self, spans: range, flights: dict[str, _Flight]) -> None:
        rels = list(flights)
        try:
            for first in range(0, len(rels), NEIGHBOUR_BATCH):
                if self.replaced is not None or self._staging is None:
                    return  # replaced, completed or evicted meanwhile
                regions = {index: await self._region(index) for index in spans}
                async with self.cpu:
                    done = await trio.to_thread.run_sync(
                        self._publish_batch, rels[first:first + NEIGHBOUR_BATCH], regions)
                for rel, grown in done:
                    self._present(rel, grown)
                    self._land(flights, rel)
                if len(done) < len(rels[first:first + NEIGHBOUR_BATCH]):
                    return  # one did not check out: it fails on its own open
        except LazymountError as exc:
            log.debug("%s: neighbours not made: %s", self.label, exc)
        except Exception as exc:
            log.warning("%s: neighbours not made: %s", self.label, exc)
        finally:  # those not made are fetched on their own open
            for rel in list(flights):
                self._land(flights, rel, _NotMade())

    def _land(self, flights: dict[str, _Flight], rel: str, error: BaseException | None = None
              ) -> None:
        flight = flights.pop(rel)
        if self._files.get(rel) is flight:
            del self._files[rel]
        flight.error = error
        flight.done.set()

    def _publish_batch(self, rels: list[str], regions: dict[int, bytes]
                       ) -> list[tuple[str, int]]:
        """Worker thread: make each of ``rels`` from the inflated spans ``regions``, in
        order; returns those made (and the bytes the store grew by), stopping at the first
        that does not check out or cannot be made (its own open fetches it, and fails)."""
        assert self.lists is not None
        lists = self.lists
        done: list[tuple[str, int]] = []
        for rel in rels:
            member = self.shape.members[rel]
            assert self._small_spans is not None
            index = self._small_spans[rel]
            base = self.toc.points[index.start].uncompressed
            joined = b"".join(regions[i] for i in index) if len(index) > 1 \
                else regions[index.start]
            start = member.offset - base
            try:
                data = check_member(member, joined[start:start + member.size])
            except IntegrityError:
                break
            if self._staging is None:
                break  # closed meanwhile

            def make(folder: Path, name: str, rel: str = rel, member: TocMember = member,
                     data: bytes = data) -> tuple[Path, str | None]:
                path, changed = onefile.write_relocated(folder, name, rel, data, member.mode,
                                                        lists, self.mapping, self.sbang,
                                                        self.label)
                return path, None if changed else member.sha256

            try:
                done.append((rel, self._publish(rel, make)))
            except (LazymountError, OSError) as exc:  # the store is full, or was evicted
                log.debug("%s: %s not made with its neighbours: %s", self.label, rel, exc)
                break
        return done

    def _work_name(self, rel: str) -> tuple[Path, str]:
        """The staging folder of this package (made once: folders made and removed per
        file cost more than the file on this kind of disk) and a new name in it."""
        with self._naming:  # worker threads: one folder, no name twice
            if self._staging is None or not self._staging.is_dir():
                self._staging = self.store.new_staging(self.key)
            self._made += 1
            return self._staging, f"{self._made}-{rel.rpartition('/')[2]}"[:200]

    def close(self) -> None:
        """Its staging folder goes (the package was completed, replaced or evicted)."""
        if self._staging is not None:
            self.store.discard(self._staging)
            self._staging = None

    async def member_bytes(self, member: TocMember) -> bytes:
        """The checked content of a file member, as in the tarball: cut from the inflated
        spans it lies in (each inflated once while it is kept, for every member in it)."""
        spans = spans_of(self.toc, member) if member.size else range(0)
        parts: list[bytes] = [b""] * len(spans)

        async def one(position: int, index: int) -> None:
            parts[position] = await self._region(index)

        try:
            async with trio.open_nursery() as nursery:
                for position, index in enumerate(spans):
                    nursery.start_soon(one, position, index)
        except BaseExceptionGroup as group:
            failures = group.subgroup(lambda exc: isinstance(exc, LazymountError))
            if failures is None:
                raise
            raise _first(failures) from None
        start = member.offset - self.toc.points[spans.start].uncompressed if spans else 0

        def cut() -> bytes:
            data = b"".join(parts)[start:start + member.size] if parts else b""
            return check_member(member, data)

        try:
            if member.size < (1 << 20):
                return cut()
            return await trio.to_thread.run_sync(cut)  # hashing: not on the trio thread
        except IntegrityError as exc:
            raise TocUnusable(f"{self.label}: {exc}") from None

    async def _region(self, index: int) -> bytes:
        """Span ``index`` inflated (kept while it is among the last few used)."""
        flight = self._regions.get(index)
        if flight is None or (flight.done.is_set() and flight.error is not None):
            flight = self._new_region(index)
            await self._fly(flight, self._inflate, index)
        else:
            self._regions.move_to_end(index)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value  # type: ignore[no-any-return]

    def _new_region(self, index: int) -> _Flight:
        """The flight of span ``index`` being inflated, noted before it starts: the span
        after it waits for its end (its window) rather than fetching that window."""
        flight = self._regions[index] = _Flight()
        while len(self._regions) > KEPT_REGIONS:
            self._regions.popitem(last=False)
        return flight

    async def _inflate(self, index: int) -> bytes:
        point = self.toc.points[index]
        before = self._regions.get(index - 1) if index else None
        if point.window and before is not None and not before.done.is_set():
            await before.done.wait()  # read ahead: its end is this span's window, unfetched
        if not point.window:
            window = b""
        elif (before is not None and before.done.is_set() and before.error is None
              and len(before.value) >= WINDOW_BYTES):
            window = before.value[-WINDOW_BYTES:]  # the span before, inflated: no fetch
        else:
            window = await self._window(point.window)
        compressed = await self._span(index)
        try:
            async with self.cpu:
                return await trio.to_thread.run_sync(  # _fetch_span checked the span
                    inflate_span, self.toc, index, compressed, window, True)
        except IntegrityError as exc:
            raise TocUnusable(f"{self.label}: {exc}") from None

    def _span_bounds(self, index: int) -> tuple[int, int]:
        return self.toc.points[index].compressed, span_end(self.toc, index)

    async def _span(self, index: int) -> bytes:
        flight = self._spans.get(index)
        if flight is None or (flight.done.is_set() and flight.error is not None):
            flight = self._spans[index] = _Flight()
            while len(self._spans) > KEPT_SPANS:
                self._spans.popitem(last=False)
            await self._fly(flight, self._fetch_span, index)
        else:
            self._spans.move_to_end(index)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value  # type: ignore[no-any-return]

    async def _fetch_span(self, index: int) -> bytes:
        start, end = self._span_bounds(index)
        data = await self.mirror.read_range(self.tarball.path, start, end)
        if data is None:
            raise TocUnusable(f"{self.label}: {self.mirror.url} does not answer range requests")
        if hashlib.sha256(data).hexdigest() != self.toc.points[index].span:
            raise TocUnusable(f"{self.label}: compressed span {index} ({start}-{end - 1}) of "
                              "the tarball does not match its table of contents")
        return data

    async def _window(self, sha256: str) -> bytes:
        flight = self._windows.get(sha256)
        if flight is None or (flight.done.is_set() and flight.error is not None):
            flight = self._windows[sha256] = _Flight()
            await self._fly(flight, self._fetch_window, sha256)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value  # type: ignore[no-any-return]

    async def _fetch_window(self, sha256: str) -> bytes:
        path = published.blob_path(sha256)
        for place in self.window_places:
            try:
                data = await place.read(path, WINDOW_BYTES)
            except NotInMirror:
                continue
            except MirrorError as exc:
                if "larger than" in str(exc):
                    raise TocUnusable(f"{self.label}: the window {sha256[:12]} of its table of "
                                      "contents is too large") from None
                raise
            if hashlib.sha256(data).hexdigest() != sha256:
                raise TocUnusable(f"{self.label}: the window {sha256[:12]} does not match its "
                                  "table of contents")
            return data
        raise TocUnusable(f"{self.label}: the window {sha256[:12]} of its table of contents "
                          "is nowhere to be found")


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a group (TocUnusable before others: it decides)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, TocUnusable)), leaves[0])


def _write_hashed(fd: int, data: memoryview, digest: Any) -> None:
    digest.update(data)
    while data:
        data = data[os.write(fd, data):]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_buildinfo(opened: Opened) -> BuildInfo:
    """The package's build info, as the TOC carries it (the text of its member, whose
    sha256 the TOC names too), checked as extraction checks it."""
    text = opened.toc.buildinfo.encode()
    member = opened.shape.buildinfo
    assert member is not None
    if len(text) != member.size or hashlib.sha256(text).hexdigest() != member.sha256:
        raise TocUnusable(f"{opened.label}: the build info of the table of contents is not "
                          f"its {BUILDINFO}")
    try:
        info = parse_buildinfo(text, opened.label)
        check_build_prefix(info, "/" + opened.shape.prefix, opened.label)
    except FormatError as exc:
        raise TocUnusable(str(exc)) from None
    return info


def make_skeleton(staging: Path, opened: Opened) -> Path:
    """Worker thread: ``staging/tree`` with the package's folders and (relocated) links,
    and the TOC beside it. Returns the tree."""
    tree = staging / "tree"
    os.mkdir(tree, 0o700)
    shape = opened.shape
    folders = sorted(rel for rel, m in shape.members.items() if m.kind == "dir")
    for rel in folders:
        os.mkdir(tree / rel, 0o700)
    for rel, member in shape.members.items():
        if member.kind == "symlink":
            os.symlink(member.link, tree / rel)
    assert opened.info is not None  # prepared before any member is made
    onefile.relocate_skeleton(tree, opened.info, opened.mapping, opened.label)
    for rel in reversed(folders):
        os.chmod(tree / rel, onefile.dir_mode(shape.members[rel].mode))
        os.utime(tree / rel, (0, 0), follow_symlinks=False)
    os.chmod(tree, onefile.dir_mode(shape.root_mode))
    return tree
