"""Unit tests of the materialization pipeline without FUSE: verify, transport, fetch, store,
and the materializer's state machine, against the real Spack cache."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import DATA, FIXTURE_CACHE, FIXTURE_KEY, FIXTURE_SECRET_KEY

from lazymount.buildcache.fetch import fetch_bytes, stream_blob
from lazymount.buildcache.manifest import BlobRecord
from lazymount.catalog.installtree import InstallTree
from lazymount.catalog.loader import load_catalog
from lazymount.errors import (
    IntegrityError,
    MirrorError,
    NotInMirror,
    SignatureError,
    StoreError,
    UsageError,
)
from lazymount.materialize import Materializer, MirrorSource
from lazymount.mirror.transport import LocalMirror, Timeouts, open_mirror
from lazymount.store.content import Store
from lazymount.system import libc
from lazymount.trust.policy import Trust
from lazymount.trust.verify import Verifier, read_key_file

HELLO_HASH = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET_HASH = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
MANIFEST = FIXTURE_CACHE / f"v3/manifests/spec/lmhello/lmhello-1.0-{HELLO_HASH}.spec.manifest.json"
TARBALL = "ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f"


@pytest.fixture
def verifier():
    v = Verifier([read_key_file(FIXTURE_KEY)])
    yield v
    v.close()


# ---- verify ---------------------------------------------------------------------------

def test_verify_returns_the_signed_plaintext(verifier):
    plaintext = verifier.verify(MANIFEST.read_bytes(), "lmhello")
    assert plaintext.startswith(b'{\n"version":3,')
    assert verifier.fingerprints == ["1556299A23063ADC6D944541DF5162CFF05DB8B3"]


def test_verify_refuses_an_altered_text(verifier):
    altered = MANIFEST.read_bytes().replace(b"9978", b"9977")
    with pytest.raises(SignatureError, match="lmhello: BAD signature"):
        verifier.verify(altered, "lmhello")


def test_verify_refuses_a_key_it_does_not_trust():
    other = Verifier([read_key_file(DATA / "keys" / "other.pub.asc")])
    try:
        with pytest.raises(SignatureError, match="not trusted"):
            other.verify(MANIFEST.read_bytes(), "lmhello")
    finally:
        other.close()


def test_verify_refuses_plain_text(verifier):
    with pytest.raises(SignatureError, match="unreadable"):
        verifier.verify(b'{"version": 3}', "lmhello")


def test_trusted_key_files_must_be_public_keys(tmp_path):
    with pytest.raises(UsageError, match="secret key"):
        Verifier([read_key_file(FIXTURE_SECRET_KEY)])
    junk = tmp_path / "junk.asc"
    junk.write_text("hello")
    with pytest.raises(UsageError, match="not an ASCII-armored public key"):
        Verifier([read_key_file(junk)])
    with pytest.raises(UsageError, match="cannot read key file"):
        read_key_file(tmp_path / "missing.asc")


def test_verifier_leaves_the_users_gnupg_alone(tmp_path, verifier):
    home = Path(verifier.home)
    assert home.is_dir() and str(home) != os.path.expanduser("~/.gnupg")
    verifier.close()
    assert not home.exists()


# ---- transport and fetch --------------------------------------------------------------

def _record(data: bytes, length: int | None = None) -> BlobRecord:
    return BlobRecord("m", "none", hashlib.sha256(data).hexdigest(),
                      len(data) if length is None else length)


def _blob_cache(tmp_path: Path, data: bytes, checksum: str | None = None) -> Path:
    checksum = checksum or hashlib.sha256(data).hexdigest()
    path = tmp_path / "cache" / "blobs" / "sha256" / checksum[:2] / checksum
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return tmp_path / "cache"


def test_stream_blob_hands_bytes_to_a_consumer_and_checks_them(tmp_path, http_server):
    data = os.urandom(3 << 20)
    server = http_server(_blob_cache(tmp_path, data))
    mirror = open_mirror(server.url)
    got = trio.run(stream_blob, mirror, _record(data), "pkg", lambda r: r.read())
    assert got == data


def test_stream_blob_checksum_error_wins_over_the_consumers_error(tmp_path, http_server):
    good = b"x" * 100_000
    bad = b"y" * 100_000
    server = http_server(_blob_cache(tmp_path, bad, hashlib.sha256(good).hexdigest()))

    def consumer(reader: io.BufferedReader) -> None:
        reader.read(10)
        raise ValueError("consumer gave up")

    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        trio.run(stream_blob, open_mirror(server.url), _record(good), "pkg", consumer)


def test_stream_blob_stops_at_bytes_past_the_promised_length(tmp_path):
    data = b"z" * 5000
    mirror = LocalMirror(_blob_cache(tmp_path, data))
    with pytest.raises(IntegrityError, match="longer than the 100 bytes"):
        trio.run(stream_blob, mirror, _record(data, length=100), "pkg", lambda r: r.read())


def test_fetch_bytes_refuses_blobs_over_the_limit(tmp_path):
    data = b"a" * 1000
    mirror = LocalMirror(_blob_cache(tmp_path, data))
    with pytest.raises(IntegrityError, match="over the 10 limit"):
        trio.run(fetch_bytes, mirror, _record(data), "pkg", 10)


def test_missing_file_is_not_in_mirror(http_server, tmp_path):
    server = http_server(tmp_path)
    with pytest.raises(NotInMirror, match="HTTP 404"):
        trio.run(open_mirror(server.url).read, "v3/nothing", 100)
    with pytest.raises(NotInMirror):
        trio.run(LocalMirror(tmp_path).read, "v3/nothing", 100)


def test_unreachable_mirror_fails_within_its_deadline():
    mirror = open_mirror("http://127.0.0.1:9", Timeouts(connect=1, read=1, base=3, retries=1))
    with pytest.raises(MirrorError, match="127.0.0.1:9"):
        trio.run(mirror.read, "x", 10)


def test_local_mirror_refuses_paths_that_climb_out(tmp_path):
    with pytest.raises(MirrorError, match="refusing"):
        trio.run(LocalMirror(tmp_path).read, "../etc/passwd", 10)


def test_unknown_scheme_is_a_usage_error():
    with pytest.raises(UsageError, match="unsupported scheme"):
        open_mirror("ftp://example.org/cache")


# ---- store ----------------------------------------------------------------------------

def test_store_publishes_atomically_and_keeps_the_first_publisher(tmp_path):
    store = Store(tmp_path / "store")
    assert store.tree("k") is None
    first = store.new_staging("k")
    (first / "tree").mkdir()
    (first / "tree" / "file").write_text("one")
    published = store.publish(first, first / "tree", "k", {"hash": "k"})
    assert published.joinpath("file").read_text() == "one"
    assert store.tree("k") == published and store.receipt("k")["hash"] == "k"
    second = store.new_staging("k")
    (second / "tree").mkdir()
    (second / "tree" / "file").write_text("two")
    assert store.publish(second, second / "tree", "k", {}) == published
    assert published.joinpath("file").read_text() == "one"


def test_publishes_at_once_share_their_flushes_and_each_is_covered(tmp_path, monkeypatch):
    """Packages published at the same time share syncfs calls (a group commit), yet each
    publish returns only after a syncfs that began after it was called has ended; a failed
    flush fails the publishes that waited on it, and publishes nothing."""
    store = Store(tmp_path / "store")
    spans: list[tuple[float, float]] = []
    failing = threading.Event()
    real_syncfs = libc.syncfs_fd

    def syncfs(fd: int) -> None:  # the real call, made slow enough for publishes to meet
        start = time.monotonic()
        time.sleep(0.05)
        real_syncfs(fd)
        spans.append((start, time.monotonic()))
        if failing.is_set():
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(libc, "syncfs_fd", syncfs)

    def publish(key: str, calls: list[tuple[float, float]]) -> None:
        staging = store.new_staging(key)
        (staging / "tree").mkdir()
        (staging / "tree" / "file").write_text(key)
        called = time.monotonic()
        try:
            store.publish(staging, staging / "tree", key, {"hash": key})
        finally:
            calls.append((called, time.monotonic()))

    calls: list[tuple[float, float]] = []
    threads = [threading.Thread(target=publish, args=(f"k{n}", calls)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(store.tree(f"k{n}") is not None for n in range(12))
    assert len(spans) < len(calls) == 12  # shared
    for called, returned in calls:  # and each covered by a flush that began after it
        assert any(called <= start and end <= returned for start, end in spans)
    failing.set()
    with pytest.raises(StoreError, match="cannot publish k12 in the store: Input/output"):
        publish("k12", [])
    assert store.tree("k12") is None


def test_store_sweep_removes_leftovers_of_dead_processes_only(tmp_path):
    store = Store(tmp_path / "store")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store.staging_dir / f"k.{dead.pid}.abc").mkdir()
    live = store.new_staging("k")  # ours: a sweep at start-up would remove it, others' stay
    (store.staging_dir / f"k.{os.getppid()}.abc").mkdir()
    assert store.sweep() == 2
    assert not live.exists()
    assert (store.staging_dir / f"k.{os.getppid()}.abc").exists()


# ---- materializer ---------------------------------------------------------------------

async def _materializer(root: str, store: Path, mirror_url: str, verifier) -> Materializer:
    mirror = open_mirror(mirror_url)
    catalog = await load_catalog([mirror])
    return Materializer(InstallTree(root, catalog),
                        [MirrorSource(mirror, Trust(verifier).for_mirror())], Store(store))


def test_concurrent_ensures_share_one_attempt(tmp_path, http_server, verifier):
    server = http_server(FIXTURE_CACHE)

    async def main() -> list[Path]:
        materializer = await _materializer("/tmp/lmu", tmp_path / "store", server.url, verifier)
        results: list[Path] = []

        async def one() -> None:
            results.append(await materializer.ensure(HELLO_HASH))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        assert materializer.status(HELLO_HASH) == "ready"
        return results

    results = trio.run(main)
    assert len(set(results)) == 1
    tree = results[0]
    assert (tree / "bin" / "hello").is_file()
    assert os.readlink(tree / "share/lmhello/message-abs.txt").startswith("/tmp/lmu/")
    assert server.requests.count(f"/blobs/sha256/ff/{TARBALL}") == 1


def test_a_cancelled_first_caller_leaves_the_package_to_the_next(tmp_path, http_server,
                                                                 verifier):
    """Without a nursery the first caller runs the attempt: cancelling it must neither fail
    the callers waiting on it nor leave the package stuck."""
    server = http_server(FIXTURE_CACHE)

    async def main() -> tuple[list[Path], Materializer]:
        materializer = await _materializer("/tmp/lmu", tmp_path / "store", server.url, verifier)
        first = trio.CancelScope()
        results: list[Path] = []

        async def run_first() -> None:
            with first:
                await materializer.ensure(HELLO_HASH)

        async def run_second() -> None:
            results.append(await materializer.ensure(HELLO_HASH))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_first)
            await trio.testing.wait_all_tasks_blocked()
            assert materializer.status(HELLO_HASH) == "materializing"
            nursery.start_soon(run_second)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
        return results, materializer

    results, materializer = trio.run(main)
    assert len(results) == 1 and (results[0] / "bin" / "hello").is_file()
    assert materializer.status(HELLO_HASH) == "ready"


def test_a_failure_is_remembered_and_published_nothing(tmp_path, verifier):
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE_CACHE, cache)
    blob = cache / "blobs/sha256/ff" / TARBALL
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")

    async def main() -> Materializer:
        materializer = await _materializer("/tmp/lmu", tmp_path / "store", str(cache), verifier)
        for _ in range(2):
            with pytest.raises(IntegrityError, match="sha256 mismatch"):
                await materializer.ensure(HELLO_HASH)
        return materializer

    materializer = trio.run(main)
    assert materializer.status(HELLO_HASH).startswith("failed: lmhello-1.0-3vgakfz: sha256")
    assert not any((tmp_path / "store" / "pkgs").iterdir())
