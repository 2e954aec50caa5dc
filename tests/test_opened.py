"""Packages opened through a signed table of contents: per-file fetching over HTTP ranges.

A cache written like Spack writes one (a C program and its library with RPATHs, headers and
configuration naming the prefix, links, a hard link, and tens of MiB of data over many seek
points), its TOCs written by ``lazymount publish``, served by nginx (which honours ranges) and
by a Python server that does not. The bytes each server sent are counted by the server.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import spackcache as sc
from conftest import FIXTURE_CACHE, FIXTURE_KEY, FIXTURE_SECRET_KEY, LMGREET, LMHELLO, Mount

from lazymount.buildcache.toc import parse_toc, spans_of

TOC_ROOT = "lazymount/v1"
DATA_FILES = 4
DATA_BYTES = 6 << 20  # each; with 4 MiB between seek points, many points


@dataclass
class TocCache:
    root: Path  # the mirror, with lazymount/v1/ written by lazymount publish
    writer: sc.CacheWriter
    app: sc.Package

    @property
    def tarball(self) -> Path:
        return self.writer.blob_path(self.writer.entries[self.app.dag_hash].tarball["checksum"])

    @property
    def checksum(self) -> str:
        return str(self.writer.entries[self.app.dag_hash].tarball["checksum"])

    def toc(self) -> Path:
        return self.root / TOC_ROOT / "toc" / f"{self.checksum}.json.sig"


def _data(seed: int, size: int) -> bytes:
    """About 2x compressible: text-like runs and random runs."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.3:
            out += rng.randbytes(4096)
        else:
            out += b" ".join(rng.choices(words, k=700))[:4096]
    return bytes(out[:size])


def publish(mirror: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazymount", "publish", str(mirror),
         f"--signing-key={FIXTURE_SECRET_KEY}", f"--trust-key={FIXTURE_KEY}", "--min-size=1M",
         *extra], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """``public(name)``: a new folder nginx's worker user can read (the test's own folders
    are root's alone)."""
    top = Path(tempfile.mkdtemp(prefix="lmtoc-", dir="/tmp"))
    top.chmod(0o755)

    def make(name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=top))

    yield make
    shutil.rmtree(top, ignore_errors=True)


def _readable(path: Path) -> Path:
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def toc_cache(public, signer) -> TocCache:
    writer = sc.CacheWriter(_readable(public("cache")) / "cache", signer=signer)
    app = writer.build_c_package("tocapp", message="Hello through a table of contents")
    prefix = writer.prefix_of(app)
    for index in range(DATA_FILES):
        app.files[f"share/tocapp/data/part{index}.dat"] = _data(index, DATA_BYTES)
    for index in range(300):
        mention = f'#define TOCAPP_PREFIX "{prefix}"\n' if index % 7 == 0 else ""
        app.files[f"include/tocapp/h{index:03d}.h"] = (
            f"/* header {index} */\n{mention}".encode() + _data(1000 + index, 900))
    app.files["lib/pkgconfig/tocapp.pc"] = f"prefix={prefix}\nlibdir=${{prefix}}/lib\n"
    app.files["bin/tocapp-again"] = sc.Hardlink("bin/tocapp")
    app.files["bin/tocapp-config"] = f"#!/bin/sh\necho {prefix}\n"
    app.files["lib/libtocapp.so.1"] = sc.Symlink("libtocapp.so")
    app.files["share/tocapp/self"] = sc.Symlink(f"{prefix}/share/tocapp/data.txt")
    app.files["share/tocapp/empty"] = sc.Dir()
    writer.add(app)
    writer.finish()
    done = publish(writer.root)
    assert done.returncode == 0, done.stdout + done.stderr
    cache = TocCache(writer.root, writer, app)
    assert cache.toc().exists(), done.stdout + done.stderr
    return cache


def copy_cache(cache: TocCache, public: Callable[[str], Path]) -> TocCache:
    where = _readable(public("copy")) / "cache"
    shutil.copytree(cache.root, where, symlinks=True)
    return TocCache(where, cache.writer, cache.app)


def prefix_in(mount: Mount, pkg: sc.Package) -> Path:
    return mount.root / "linux-x86_64" / f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"


def sent_bytes(log: Path, path_part: str) -> int:
    """Body bytes nginx sent for requests whose path contains ``path_part``."""
    total = 0
    if not log.exists():
        return 0
    for line in log.read_text().splitlines():
        m = re.search(r'"GET (\S+) [^"]*" (\d+) (\d+)', line)
        if m and path_part in m[1]:
            total += int(m[3])
    return total


def requested(log: Path) -> list[str]:
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        m = re.search(r'"GET (\S+) [^"]*" (\d+)', line)
        if m:
            out.append(m[1])
    return out


def tree_of(top: Path, root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry below ``top``: kind, mode and content (a link's target), with the mount
    path ``root`` written as ROOT (two mounts' paths have the same length)."""
    found: dict[str, tuple[str, int, bytes | str]] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(directory) / name
            rel = str(path.relative_to(top))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("l", 0, os.readlink(path).replace(str(root), "ROOT"))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("d", stat.S_IMODE(st.st_mode), b"")
            else:
                found[rel] = ("f", stat.S_IMODE(st.st_mode),
                              path.read_bytes().replace(bytes(root), b"ROOT"))
    return found


# ---- the core path ---------------------------------------------------------------------


def test_an_opened_package_runs_having_fetched_a_part_of_its_blob(toc_cache, nginx_server,
                                                                   mount_cache, tmp_path):
    url = nginx_server(toc_cache.root)
    log = tmp_path / "nginx-access.log"
    mount = mount_cache([url])
    prefix = prefix_in(mount, toc_cache.app)
    blob = toc_cache.tarball.stat().st_size
    # find and stat of the whole prefix: from the TOC, no span of the tarball beyond what
    # opening it reads (its build info)
    listed = subprocess.run(["find", str(prefix), "-printf", "%y %s %m %p\n"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"{prefix}/share/tocapp/data/part3.dat" in listed
    assert f"f {DATA_BYTES} " in listed
    opened_bytes = sent_bytes(log, toc_cache.checksum)
    assert opened_bytes < blob // 4, (opened_bytes, blob)
    assert "opened through its table of contents" in mount.log_text()
    # the program runs: its library comes through the mount (RPATH relocated)
    run = subprocess.run([str(prefix / "bin" / "tocapp")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr + mount.log_text()
    assert "Hello through a table of contents" in run.stdout
    # a C string keeps its length: the shorter prefix is padded with "/"
    assert re.search(f"^prefix: /*{re.escape(str(prefix))}$", run.stdout, re.M), run.stdout
    after = sent_bytes(log, toc_cache.checksum)
    assert after < blob // 2, (after, blob)
    # the stats served before the bytes were there are those of the files
    for rel in ("bin/tocapp", "lib/pkgconfig/tocapp.pc", "bin/tocapp-again"):
        assert (prefix / rel).stat().st_size == len((prefix / rel).read_bytes())
    assert (prefix / "bin/tocapp-again").read_bytes() == (prefix / "bin/tocapp").read_bytes()
    text = (prefix / "lib/pkgconfig/tocapp.pc").read_text()
    assert text.startswith(f"prefix={prefix}\n")
    assert "Traceback" not in mount.log_text()


def test_every_file_of_an_opened_package_is_the_file_of_a_whole_one(
        toc_cache, nginx_server, mount_cache, tmp_path, public):
    url = nginx_server(toc_cache.root)
    plain = copy_cache(toc_cache, public)
    shutil.rmtree(plain.root / "lazymount")
    opened = mount_cache([url], store=tmp_path / "store-opened")
    whole = mount_cache([str(plain.root)], store=tmp_path / "store-whole")
    assert len(str(opened.root)) == len(str(whole.root))
    top = prefix_in(opened, toc_cache.app)
    # the sizes served from the TOC, before any byte: those the files have once relocated
    served = {str(path.relative_to(top)): path.lstat().st_size
              for path in top.rglob("*") if path.is_file() and not path.is_symlink()}
    files = tree_of(top, opened.root)
    assert files == tree_of(prefix_in(whole, toc_cache.app), whole.root)
    assert served == {rel: len((top / rel).read_bytes()) for rel, (kind, _, _) in files.items()
                      if kind == "f"}
    assert "opened through its table of contents" in opened.log_text()
    assert "opened through" not in whole.log_text()


# ---- nothing weaker than today -----------------------------------------------------------


class _NoRanges(http.server.SimpleHTTPRequestHandler):
    """Answers every GET whole (a server that ignores Range), counting the bytes sent."""

    sent: dict[str, int] = {}

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        while chunk := source.read(64 << 10):
            try:
                outputfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client closed an answer it did not want
            self.sent[self.path] = self.sent.get(self.path, 0) + len(chunk)


def test_a_server_that_ignores_ranges_gets_the_blob_once(toc_cache, mount_cache):
    handler = functools.partial(_NoRanges, directory=str(toc_cache.root))
    _NoRanges.sent = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mount = mount_cache([f"http://127.0.0.1:{server.server_address[1]}"])
        prefix = prefix_in(mount, toc_cache.app)
        run = subprocess.run([str(prefix / "bin" / "tocapp")], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr + mount.log_text()
        assert (prefix / "share/tocapp/data/part1.dat").read_bytes() == _data(1, DATA_BYTES)
    finally:
        server.shutdown()
        server.server_close()
    text = mount.log_text()
    assert "does not answer range requests" in text
    assert text.count("it is materialized whole") == 1, text
    blob = toc_cache.tarball.stat().st_size
    # the range answered whole was closed unread: the blob crossed the wire about once
    sent = sum(n for path, n in _NoRanges.sent.items() if toc_cache.checksum in path)
    assert sent < 1.5 * blob, (sent, blob)


def _mount_and_read(mount_cache, cache: TocCache, nginx_server) -> tuple[Mount, Path]:
    mount = mount_cache([nginx_server(cache.root)])
    return mount, prefix_in(mount, cache.app)


def test_a_toc_signed_by_an_unknown_key_is_not_used(toc_cache, nginx_server, mount_cache,
                                                    tmp_path, public):
    cache = copy_cache(toc_cache, public)
    other = sc.Signer.generate()
    try:
        plain = sc.verify_clearsigned(cache.toc().read_bytes(),
                                      sc.Signer(FIXTURE_SECRET_KEY).public_key_armor)
        cache.toc().write_bytes(other.clearsign(plain.plaintext))
    finally:
        other.close()
    mount, prefix = _mount_and_read(mount_cache, cache, nginx_server)
    assert (prefix / "lib/pkgconfig/tocapp.pc").read_text().startswith(f"prefix={prefix}")
    text = mount.log_text()
    assert "opened through" not in text
    assert "table of contents is not used" in text


def _resign(cache: TocCache, change) -> None:  # type: ignore[no-untyped-def]
    with sc.Signer(FIXTURE_SECRET_KEY) as signer:
        verified = sc.verify_clearsigned(cache.toc().read_bytes(), signer.public_key_armor)
        document = json.loads(verified.plaintext)
        change(document)
        cache.toc().write_bytes(signer.clearsign(
            json.dumps(document, sort_keys=True, indent=0).encode() + b"\n"))


def test_a_toc_naming_another_tarball_is_not_used(toc_cache, nginx_server, mount_cache,
                                                  tmp_path, public):
    cache = copy_cache(toc_cache, public)

    def other(document: dict) -> None:  # type: ignore[type-arg]
        document["tarball"]["sha256"] = "0" * 64

    _resign(cache, other)
    mount, prefix = _mount_and_read(mount_cache, cache, nginx_server)
    assert (prefix / "bin/tocapp-config").read_text() == f"#!/bin/sh\necho {prefix}\n"
    assert "opened through" not in mount.log_text()
    assert "table of contents is not used" in mount.log_text()


def _first_data_member(document: dict) -> list:  # type: ignore[type-arg]
    for member in document["members"]:  # [path, kind, mode, size, link, offset, sha256, ...]
        if member[0].endswith("share/tocapp/data/part2.dat"):
            return member  # type: ignore[no-any-return]
    raise AssertionError("no part2.dat in the TOC")


def test_a_member_whose_recorded_sha256_is_wrong_is_never_served(toc_cache, nginx_server,
                                                                  mount_cache, tmp_path, public):
    cache = copy_cache(toc_cache, public)

    def wrong(document: dict) -> None:  # type: ignore[type-arg]
        _first_data_member(document)[6] = "1" * 64

    _resign(cache, wrong)
    mount, prefix = _mount_and_read(mount_cache, cache, nginx_server)
    assert (prefix / "share/tocapp/data/part1.dat").read_bytes() == _data(1, DATA_BYTES)
    assert "opened through" in mount.log_text()
    # the bytes do not match the signed TOC: the whole tarball (which matches its signed
    # manifest) is used instead, and the file read is the real one
    assert (prefix / "share/tocapp/data/part2.dat").read_bytes() == _data(2, DATA_BYTES)
    assert "does not match the sha256 of the table of contents" in mount.log_text()
    assert "it is materialized whole" in mount.log_text()


def test_a_flipped_byte_in_the_tarball_serves_nothing(toc_cache, nginx_server, mount_cache,
                                                     tmp_path, public):
    cache = copy_cache(toc_cache, public)
    blob = cache.root / cache.tarball.relative_to(toc_cache.root)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    mount, prefix = _mount_and_read(mount_cache, cache, nginx_server)
    with pytest.raises(OSError):
        (prefix / "share/tocapp/data/part2.dat").read_bytes()
    assert "does not match its table of contents" in mount.log_text()


def test_a_flipped_byte_in_a_window_is_refused(toc_cache, nginx_server, mount_cache,
                                               tmp_path, public):
    cache = copy_cache(toc_cache, public)
    for window in sorted((cache.root / TOC_ROOT / "blobs").iterdir()):
        data = bytearray(window.read_bytes())
        data[100] ^= 1
        window.write_bytes(bytes(data))
    mount, prefix = _mount_and_read(mount_cache, cache, nginx_server)
    assert (prefix / "share/tocapp/data/part3.dat").read_bytes() == _data(3, DATA_BYTES)
    text = mount.log_text()
    assert "does not match its table of contents" in text
    # refused when the package is opened (its build info), or at the first file
    assert "it is materialized whole" in text or "table of contents is not used" in text


# ---- the transport -----------------------------------------------------------------------


def test_read_range_returns_the_bytes_asked_or_none_from_a_server_without_ranges(
        public, nginx_server, http_server):
    import trio

    from lazymount.mirror.transport import Timeouts, open_mirror

    data = _data(7, 300_000)
    tmp_path = _readable(public("range"))
    (tmp_path / "blob").write_bytes(data)
    (tmp_path / "blob").chmod(0o644)

    async def ask(url: str) -> list[bytes | None]:
        mirror = open_mirror(url, Timeouts(read=5))
        try:
            return [await mirror.read_range("blob", 1000, 70_000),
                    await mirror.read_range("blob", 299_999, 300_000),
                    await mirror.read_range("blob", 299_999, 300_001)]
        finally:
            await mirror.aclose()

    # a range past the end (a TOC that is not of this file) is not answered either
    expected = [data[1000:70_000], data[-1:], None]
    assert trio.run(ask, nginx_server(tmp_path)) == expected
    assert trio.run(ask, str(tmp_path)) == expected
    assert trio.run(ask, http_server(tmp_path).url) == [None, None, None]


# ---- the store knows partial packages ----------------------------------------------------


def lazymount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazymount", *args], capture_output=True,
                          text=True, timeout=300)


def store_entry(mount: Mount, pkg: sc.Package) -> Path:
    return next(e for e in (mount.store / "pkgs").iterdir() if e.name.startswith(pkg.dag_hash))


def status_of(mount: Mount) -> dict:  # type: ignore[type-arg]
    result = lazymount("status", str(mount.root), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_status_fsck_and_a_restart_know_a_partial_package(toc_cache, nginx_server,
                                                          mount_cache, tmp_path):
    url = nginx_server(toc_cache.root)
    log = tmp_path / "nginx-access.log"
    mount = mount_cache([url])
    prefix = prefix_in(mount, toc_cache.app)
    assert (prefix / "share/tocapp/data.txt").read_text() == f"{prefix}/share/tocapp/data.txt\n"
    opened = status_of(mount)["packages"]["opened"]
    assert [o["files_present"] < o["files"] for o in opened] == [True]
    state = os.getxattr(prefix, "user.lazymount.status").decode()
    assert state.startswith("opened: ") and " of " in state, state
    assert "opened" in lazymount("status", str(prefix / "bin")).stdout
    result = lazymount("fsck", str(mount.root))
    assert result.returncode == 0, result.stdout + result.stderr
    entry = store_entry(mount, toc_cache.app)
    data = entry / "tree/share/tocapp/data.txt"
    data.chmod(0o644)
    data.write_text("changed\n" + data.read_text()[8:])
    result = lazymount("fsck", str(mount.root))
    assert result.returncode == 1 and "share/tocapp/data.txt: content" in result.stdout, \
        result.stdout
    data.write_text(f"{prefix}/share/tocapp/data.txt\n")  # as it was
    # a restart opens it again from the store: its TOC is not fetched again, and the file
    # it held is not fetched again either
    subprocess.run(["fusermount3", "-u", str(mount.root)], check=True)
    assert mount.process is not None
    mount.process.wait(30)
    tocs_before = sum("/toc/" in path for path in requested(log))
    spans_before = sent_bytes(log, toc_cache.checksum)
    again = mount_cache([url], store=mount.store, root=mount.root)
    assert (prefix / "share/tocapp/data.txt").read_text() == f"{prefix}/share/tocapp/data.txt\n"
    assert "opened through its table of contents" in again.log_text()
    assert sum("/toc/" in path for path in requested(log)) == tocs_before
    assert sent_bytes(log, toc_cache.checksum) == spans_before
    run = subprocess.run([str(prefix / "bin/tocapp")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr


def _span_neighbours(cache: TocCache, rel: str) -> list[str]:
    """The other headers lying wholly in the compressed spans of header ``rel``."""
    with sc.Signer(FIXTURE_SECRET_KEY) as signer:
        verified = sc.verify_clearsigned(cache.toc().read_bytes(), signer.public_key_armor)
    toc = parse_toc(verified.plaintext, "test")
    by_rel = {m.path.split(f"{cache.app.dag_hash}/", 1)[-1]: m for m in toc.members}
    spans = spans_of(toc, by_rel[rel])
    return [other for other, m in by_rel.items()
            if other.startswith("include/tocapp/h") and other != rel
            and spans.start <= spans_of(toc, m).start and spans_of(toc, m).stop <= spans.stop]


def test_the_small_neighbours_of_a_file_read_are_kept_without_another_fetch(
        toc_cache, nginx_server, mount_cache, tmp_path):
    url = nginx_server(toc_cache.root)
    log = tmp_path / "nginx-access.log"
    mount = mount_cache([url])
    prefix = prefix_in(mount, toc_cache.app)
    neighbours = _span_neighbours(toc_cache, "include/tocapp/h000.h")
    assert len(neighbours) > 100, neighbours  # the headers share a span
    assert (prefix / "include/tocapp/h000.h").read_bytes().startswith(b"/* header 0 */\n")
    # the span inflated for one header gave its neighbours to the store, each checked and
    # relocated, without being read
    tree = store_entry(mount, toc_cache.app) / "tree"
    deadline = time.monotonic() + 60
    while not all((tree / rel).exists() for rel in neighbours):
        assert time.monotonic() < deadline, mount.log_text()
        time.sleep(0.05)
    assert "(4 of" not in os.getxattr(prefix, "user.lazymount.status").decode()
    result = lazymount("fsck", str(mount.root))
    assert result.returncode == 0, result.stdout + result.stderr
    # after a restart (nothing kept in memory) they are served from the store: the tarball
    # is not asked again
    subprocess.run(["fusermount3", "-u", str(mount.root)], check=True)
    assert mount.process is not None
    mount.process.wait(30)
    spans_before = sent_bytes(log, toc_cache.checksum)
    again = mount_cache([url], store=mount.store, root=mount.root)
    for rel in neighbours:
        index = int(rel[len("include/tocapp/h"):-2])
        text = (prefix / rel).read_bytes()
        assert text.startswith(f"/* header {index} */\n".encode())
        assert text.endswith(_data(1000 + index, 900))
    assert sent_bytes(log, toc_cache.checksum) == spans_before, again.log_text()
    assert "Traceback" not in again.log_text() + mount.log_text()


def test_big_files_read_in_order_take_each_window_from_the_span_before(
        toc_cache, nginx_server, mount_cache, tmp_path):
    url = nginx_server(toc_cache.root)
    log = tmp_path / "nginx-access.log"
    mount = mount_cache([url])
    prefix = prefix_in(mount, toc_cache.app)
    for index in range(DATA_FILES):  # spans read ahead while the one before inflates
        assert (prefix / f"share/tocapp/data/part{index}.dat").read_bytes() == \
            _data(index, DATA_BYTES)
    windows = [path for path in requested(log) if f"{TOC_ROOT}/blobs/" in path]
    assert len(windows) <= 2, windows  # the first span's (and the build info's)


def test_fill_whole_completes_an_opened_package_into_a_whole_one(toc_cache, nginx_server,
                                                                 mount_cache):
    mount = mount_cache([nginx_server(toc_cache.root)], extra=("--fill=whole",))
    prefix = prefix_in(mount, toc_cache.app)
    os.listdir(prefix)
    deadline = time.monotonic() + 120
    while "completed" not in mount.log_text():
        assert time.monotonic() < deadline, mount.log_text()
        time.sleep(0.2)
    entry = store_entry(mount, toc_cache.app)
    receipt = json.loads((entry / "receipt.json").read_text())
    assert "partial" not in receipt and receipt["record"]
    assert not (entry / "toc.json").exists()
    assert os.getxattr(prefix, "user.lazymount.status") == b"ready"
    assert status_of(mount)["packages"]["opened"] == []
    result = lazymount("fsck", str(mount.root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (prefix / "share/tocapp/data/part0.dat").read_bytes() == _data(0, DATA_BYTES)


def test_gc_leaves_an_opened_package_in_use_and_evicts_it_after(toc_cache, nginx_server,
                                                                mount_cache):
    mount = mount_cache([nginx_server(toc_cache.root)], extra=("--store-quota=1G",))
    prefix = prefix_in(mount, toc_cache.app)
    with open(prefix / "share/tocapp/data/part1.dat", "rb") as held:
        assert held.read(10) == _data(1, DATA_BYTES)[:10]
        result = lazymount("gc", str(mount.root), "--max-size=0")
        assert result.returncode == 0, result.stderr
        assert (store_entry(mount, toc_cache.app) / "tree").is_dir()
        # another file of the same package is still fetched and read while it is held
        assert (prefix / "share/tocapp/data/part2.dat").read_bytes() == _data(2, DATA_BYTES)
    result = lazymount("gc", str(mount.root), "--max-size=0")
    assert result.returncode == 0, result.stderr
    assert not any(e.name.startswith(toc_cache.app.dag_hash)
                   for e in (mount.store / "pkgs").iterdir())
    # opened again on the next access
    assert (prefix / "share/tocapp/data/part3.dat").read_bytes() == _data(3, DATA_BYTES)


def test_preload_completes_an_opened_package(toc_cache, nginx_server, mount_cache):
    mount = mount_cache([nginx_server(toc_cache.root)])
    prefix = prefix_in(mount, toc_cache.app)
    assert os.getxattr(prefix, "user.lazymount.status") == b"absent"
    result = lazymount("preload", str(mount.root), "tocapp")
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 120
    while os.getxattr(prefix, "user.lazymount.status") != b"ready":
        assert time.monotonic() < deadline, mount.log_text()
        time.sleep(0.2)
    assert "tocapp-1.0-" in mount.log_text() and "completed (" in mount.log_text()
    assert "partial" not in json.loads((store_entry(mount, toc_cache.app)
                                        / "receipt.json").read_text())


# ---- an OCI registry ---------------------------------------------------------------------


def test_an_oci_cache_is_opened_with_blob_ranges_and_a_toc_from_elsewhere(
        toc_cache, nginx_server, mount_cache, tmp_path, public):
    from ocicache import OciPusher
    from ociregistry import Registry

    registry = Registry(tmp_path / "registry").start()
    pusher = OciPusher(registry.base, "lazymount/toc")
    try:
        pusher.push_cache(toc_cache.root)
        # the TOCs of the same tarballs, published beside the cache: --toc names them
        tocs = _readable(public("tocs"))
        shutil.copytree(toc_cache.root / "lazymount", tocs / "lazymount")
        mount = mount_cache([registry.mirror("lazymount/toc")],
                            extra=("--unsigned", f"--toc={nginx_server(tocs)}"))
        prefix = prefix_in(mount, toc_cache.app)
        run = subprocess.run([str(prefix / "bin/tocapp")], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr + mount.log_text()
        assert "opened through its table of contents" in mount.log_text()
        gets = [r for r in registry.requests() if r.startswith("GET ")]
        tarball = f"/blobs/sha256:{toc_cache.checksum}"
        assert any(tarball in r and r.endswith(" 206") for r in gets), gets
        assert not any(tarball in r and r.endswith(" 200") for r in gets), gets
    finally:
        pusher.close()
        registry.stop()


@pytest.fixture
def oci_toc_cache(toc_cache, tmp_path):
    """The cache pushed into a real registry, and its TOCs published into the same
    repository (no --output): (registry, pusher, mirror URL, what publish printed)."""
    from ocicache import OciPusher
    from ociregistry import Registry

    registry = Registry(tmp_path / "registry").start()
    pusher = OciPusher(registry.base, "lazymount/toc")
    try:
        pusher.push_cache(toc_cache.root)
        url = registry.mirror("lazymount/toc")
        done = publish(url)
        assert done.returncode == 0, done.stdout + done.stderr
        yield registry, pusher, url, done.stdout
    finally:
        pusher.close()
        registry.stop()


def test_an_oci_cache_is_opened_through_the_toc_its_repository_holds(oci_toc_cache, toc_cache,
                                                                      mount_cache):
    registry, _pusher, url, printed = oci_toc_cache
    tag = f"lazymount-toc-{toc_cache.checksum}"
    assert "tables of contents: 1 written" in printed, printed
    assert any(r.startswith(f"PUT /v2/lazymount/toc/manifests/{tag} 201")
               for r in registry.requests())
    again = publish(url)
    assert "tables of contents: 0 written, 1 up to date" in again.stdout, again.stdout
    before = len(registry.requests())  # the publisher read the whole tarball
    mount = mount_cache([url], extra=("--unsigned",))  # no --toc: the registry has it
    prefix = prefix_in(mount, toc_cache.app)
    run = subprocess.run([str(prefix / "bin/tocapp")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr + mount.log_text()
    assert "opened through its table of contents" in mount.log_text()
    assert (prefix / "share/tocapp/data/part1.dat").read_bytes() == _data(1, DATA_BYTES)
    gets = [r for r in registry.requests()[before:] if r.startswith("GET ")]
    assert any(f"/manifests/{tag} 200" in r for r in gets), gets
    tarball = f"/blobs/sha256:{toc_cache.checksum}"
    assert any(tarball in r and r.endswith(" 206") for r in gets), gets
    assert not any(tarball in r and r.endswith(" 200") for r in gets), gets


def test_an_oci_toc_signed_by_an_unknown_key_is_not_used(oci_toc_cache, toc_cache,
                                                         mount_cache):
    registry, pusher, url, _printed = oci_toc_cache
    tag = f"lazymount-toc-{toc_cache.checksum}"
    manifest = pusher.client.get(f"{pusher.api}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    envelope = pusher.client.get(f"{pusher.api}/blobs/{manifest['layers'][0]['digest']}")
    other = sc.Signer.generate()
    try:
        plain = sc.verify_clearsigned(envelope.content,
                                      sc.Signer(FIXTURE_SECRET_KEY).public_key_armor)
        forged = other.clearsign(plain.plaintext)
    finally:
        other.close()
    manifest["layers"][0].update(digest=pusher.put_blob(forged), size=len(forged))
    pusher.put_manifest(tag, manifest)
    mount = mount_cache([url], extra=("--unsigned",))
    prefix = prefix_in(mount, toc_cache.app)
    assert (prefix / "lib/pkgconfig/tocapp.pc").read_text().startswith(f"prefix={prefix}")
    text = mount.log_text()
    assert "opened through" not in text
    assert "table of contents is not used" in text


# ---- fleets ------------------------------------------------------------------------------


def test_through_squid_the_origin_sends_the_blob_once_for_a_fleet(toc_cache, nginx_server,
                                                                  mount_cache, tmp_path):
    from squid import start_squid

    squid = start_squid()
    try:
        url = nginx_server(toc_cache.root)
        nodes = [mount_cache([url], extra=(f"--proxy={squid.url}",), store=tmp_path / name)
                 for name in ("node1", "node2", "node3")]
        for node in nodes:
            prefix = prefix_in(node, toc_cache.app)
            assert (prefix / "share/tocapp/data/part2.dat").read_bytes() == _data(2, DATA_BYTES)
            run = subprocess.run([str(prefix / "bin/tocapp")], capture_output=True, text=True,
                                 timeout=60)
            assert run.returncode == 0, run.stderr
            assert "opened through its table of contents" in node.log_text()
    finally:
        squid.stop()
    log = tmp_path / "nginx-access.log"
    blob = f"/blobs/sha256/{toc_cache.checksum[:2]}/{toc_cache.checksum}"
    asked = [path for path in requested(log) if path == blob]
    assert len(asked) == 1, requested(log)  # one fetch for every node's spans
    assert sent_bytes(log, blob) <= toc_cache.tarball.stat().st_size


def test_an_opened_package_growing_past_the_quota_evicts_what_is_not_in_use(
        toc_cache, nginx_server, mount_cache):
    mount = mount_cache([nginx_server(toc_cache.root), str(FIXTURE_CACHE)],
                        extra=("--store-quota=16M",))
    hello = mount.prefix()  # a package materialized whole, then left alone
    assert (hello / "bin").is_dir()
    prefix = prefix_in(mount, toc_cache.app)
    for index in range(DATA_FILES):  # 24 MiB in all: past the quota, file by file
        assert (prefix / f"share/tocapp/data/part{index}.dat").read_bytes() == \
            _data(index, DATA_BYTES)
    deadline = time.monotonic() + 60
    while os.getxattr(hello, "user.lazymount.status") != b"absent":
        assert time.monotonic() < deadline, mount.log_text()
        time.sleep(0.2)
    assert "lmhello-1.0-3vgakfz: evicted from the store" in mount.log_text()
    # the opened package, in use while it grew, is still there
    assert os.getxattr(prefix, "user.lazymount.status").startswith(b"opened: ")


# ---- a cache the real Spack wrote ----------------------------------------------------------


def test_the_real_spack_cache_opened_runs_and_matches_its_whole_tree(nginx_server, mount_cache,
                                                                     tmp_path, public):
    cache = _readable(public("real")) / "cache"
    shutil.copytree(FIXTURE_CACHE, cache)
    done = subprocess.run(
        [sys.executable, "-m", "lazymount", "publish", str(cache),
         f"--signing-key={FIXTURE_SECRET_KEY}", f"--trust-key={FIXTURE_KEY}", "--min-size=1"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "tables of contents: 2 written" in done.stdout, \
        done.stdout + done.stderr
    opened = mount_cache([nginx_server(cache)], store=tmp_path / "opened")
    whole = mount_cache([str(FIXTURE_CACHE)], store=tmp_path / "whole")
    run = subprocess.run([str(opened.prefix() / "bin" / "hello"), "-v"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr + opened.log_text()
    assert "Hello from lmgreet, world!" in run.stdout
    for name in ("lmhello", "lmgreet"):  # both opened, the library too
        assert re.search(rf"{name}-1\.0-\w+: opened through its table of contents",
                         opened.log_text()), opened.log_text()
    for name in (LMHELLO, LMGREET):
        assert (tree_of(opened.root / "linux-x86_64" / name, opened.root)
                == tree_of(whole.root / "linux-x86_64" / name, whole.root))
