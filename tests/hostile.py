"""Helpers for the attack and fault tests: hostile caches, a misbehaving mirror, assertions.

``HostileCache`` writes a signed layout-v3 cache with two packages, ``victim`` (the one each
attack breaks) and ``bystander`` (which must keep working), and hooks to replace the victim's
tarball, manifest or spec blob. ``FaultyServer`` is an HTTP mirror on 127.0.0.1 that answers
chosen paths badly (404, 500, silence, a trickle, a reset mid-body, a stall, an encoded
body). ``SilentPort`` is a port that accepts connections in the kernel and never says a word.
"""

from __future__ import annotations

import errno
import functools
import gzip
import http.server
import os
import socket
import struct
import tarfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tarfactory as tf
import zstandard
from conftest import DATA, FIXTURE_SECRET_KEY, Mount
from spackcache import (
    MEDIA_SPEC,
    MEDIA_TARBALL,
    CacheWriter,
    Package,
    Signer,
)

SECRET_KEY = FIXTURE_SECRET_KEY
OTHER_SECRET_KEY = DATA / "keys" / "other.secret.asc"
ARCH_DIR = "linux-x86_64"


# ---------------------------------------------------------------------------------------------
# A cache with one package to attack and one that must keep working


class HostileCache:
    """A signed cache holding ``victim`` and ``bystander``; call ``finish()`` before mounting.

    The victim's files mention no build path, so its binary_distribution lists nothing to
    relocate and a hand-made tarball with the same buildinfo is a valid package.
    """

    def __init__(self, root: Path, signer: Signer, victim_files: dict[str, Any] | None = None):
        self.writer = CacheWriter(root, signer=signer)
        self.signer = signer
        self.victim = Package("victim", files=victim_files or {
            "share/victim/data.txt": "victim data\n",
            "bin/victim": "#!/bin/sh\necho victim\n",
        })
        self.bystander = Package("bystander", files={"share/bystander/ok.txt": "still served\n"})
        self.writer.add(self.victim)
        self.writer.add(self.bystander)

    @property
    def root(self) -> Path:
        return self.writer.root

    @property
    def entry(self) -> Any:
        return self.writer.entries[self.victim.dag_hash]

    @property
    def dirname(self) -> str:
        """The victim's directory name under ``<mount>/linux-x86_64``."""
        return f"victim-1.0-{self.victim.dag_hash}"

    @property
    def label(self) -> str:
        """How the daemon names the victim in its log."""
        return f"victim-1.0-{self.victim.dag_hash[:7]}"

    @property
    def member_prefix(self) -> str:
        """The victim's prefix as tar member names spell it (no leading '/')."""
        return self.writer.prefix_of(self.victim).lstrip("/")

    @property
    def buildinfo(self) -> bytes:
        return bytes(self.entry.buildinfo)

    def sign(self, records: list[dict[str, Any]], sign: bool | Signer = True) -> Path:
        """(Re)write the victim's spec manifest with ``records``."""
        return self.writer.write_spec_manifest(self.victim, records, sign=sign)

    def replace_tarball(self, blob: bytes, compression: str = "gzip") -> dict[str, Any]:
        """Store ``blob`` as the victim's tarball, under a manifest the trusted key signs."""
        record = self.writer.write_blob(blob, MEDIA_TARBALL, compression)
        self.sign([record, self.entry.spec])
        return record

    def replace_spec(self, blob: bytes) -> None:
        """Store ``blob`` as the victim's spec blob, under a manifest the trusted key signs."""
        record = self.writer.write_blob(blob, MEDIA_SPEC, "gzip")
        self.sign([self.entry.tarball, record])

    def hostile_tarball(self, *entries: tf.Entry, buildinfo: bytes | None = None,
                        fmt: int = tarfile.PAX_FORMAT) -> None:
        """A Spack-shaped tarball of the victim's prefix with ``entries`` in it, signed."""
        members = tf.package(*entries, prefix=self.member_prefix,
                             buildinfo=self.buildinfo if buildinfo is None else buildinfo)
        self.replace_tarball(tf.gz(tf.tar(members, fmt)))

    def in_prefix(self, relative: str) -> str:
        """A member name inside the victim's prefix."""
        return f"{self.member_prefix}/{relative}"

    def finish(self, records: dict[str, dict[str, Any]] | None = None) -> Path:
        return self.writer.finish(records)


# ---------------------------------------------------------------------------------------------
# What a refusal must look like


def wait_until_empty(directory: Path, timeout: float = 10.0) -> None:
    """Staging and trash are emptied in the background; give that a bounded moment."""
    deadline = time.monotonic() + timeout
    while directory.exists() and any(directory.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    assert not leftovers, f"{directory} still holds {leftovers}"


def assert_no_trace(store: Path, dag_hash: str) -> None:
    """No published, staged or half-deleted piece of ``dag_hash`` is left in the store."""
    pkgs = store / "pkgs"
    assert not any(e.name.startswith(dag_hash) for e in pkgs.iterdir()), sorted(pkgs.iterdir())
    wait_until_empty(store / "staging")
    wait_until_empty(store / "trash")


def assert_empty(outside: Path) -> None:
    """The directory an attack aimed at is still empty."""
    assert outside.is_dir() and not any(outside.iterdir()), sorted(outside.rglob("*"))


def log_lines(mount: Mount, label: str) -> list[str]:
    return [line for line in mount.log_text().splitlines() if label in line]


def expect_refused(mount: Mount, cache: HostileCache, wanted: int, reason: str) -> str:
    """Touching the victim fails with ``wanted``; one log line names it and ``reason`` (and
    ``getfattr`` shows it); no piece of it is in the store; the bystander is still served.
    Returns the log line."""
    prefix = mount.root / ARCH_DIR / cache.dirname
    for action in (os.listdir, lambda p: open(p / "share" / "victim" / "data.txt", "rb")):
        with pytest.raises(OSError) as info:
            action(prefix)
        assert info.value.errno == wanted, f"{info.value} (wanted {errno.errorcode[wanted]})"
    lines = [line for line in log_lines(mount, cache.label) if reason in line]
    assert len(lines) == 1, f"wanted one line naming {cache.label} and {reason!r}:\n" \
                            f"{mount.log_text()}"
    status = os.getxattr(prefix, "user.lazymount.status").decode()
    assert status.startswith("failed: ") and reason in status, status
    assert_no_trace(mount.store, cache.victim.dag_hash)
    expect_bystander_served(mount, cache)
    return lines[0]


def expect_bystander_served(mount: Mount, cache: HostileCache) -> None:
    ok = mount.root / ARCH_DIR / f"bystander-1.0-{cache.bystander.dag_hash}"
    assert (ok / "share" / "bystander" / "ok.txt").read_text() == "still served\n"


# ---------------------------------------------------------------------------------------------
# A mirror that misbehaves on chosen paths


@dataclass
class Fault:
    """How to answer one path. ``kind``: "404", "500", "silent" (read the request, never
    answer), "trickle" (headers, then one byte a second), "reset" (half the body, then a TCP
    reset), "stall" (``after`` bytes, then nothing until released), "delay" (wait ``seconds``,
    then answer normally), "encoded" (``body`` sent as it is, said to be ``Content-Encoding:
    encoding``, whatever the client asked for)."""

    kind: str
    after: int = 0
    seconds: float = 0.0
    encoding: str = ""
    body: bytes = b""


@dataclass
class FaultyServer:
    """An HTTP mirror of ``directory`` on 127.0.0.1 whose ``faults`` apply per path."""

    directory: Path
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    released: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def __post_init__(self) -> None:
        handler = _handler_for(self)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        """End every silence, trickle and stall now."""
        self.released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _handler_for(owner: FaultyServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(owner.directory), **kwargs)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            owner.requests[path] += 1
            fault = owner.faults.get(path)
            if fault is None:
                super().do_GET()
            elif fault.kind in ("404", "500"):
                self.send_error(int(fault.kind))
            elif fault.kind == "silent":
                owner.released.wait(120)
            elif fault.kind == "delay":
                owner.released.wait(fault.seconds)
                super().do_GET()
            else:
                self._misbehave(path, fault)

        def _misbehave(self, path: str, fault: Fault) -> None:
            encoded = fault.kind == "encoded"
            body = fault.body if encoded else (owner.directory / path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if encoded:
                self.send_header("Content-Encoding", fault.encoding)
            self.end_headers()
            self.wfile.flush()
            if fault.kind == "trickle":
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    if owner.released.wait(1.0):
                        return
            elif fault.kind == "reset":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                # SO_LINGER with a zero timeout: close() sends a RST, not a FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
            elif encoded:
                self.wfile.write(body)
            elif fault.kind == "stall":
                self.wfile.write(body[: fault.after])
                self.wfile.flush()
                owner.released.wait(120)
            else:
                raise ValueError(f"unknown fault {fault.kind}")

        def finish(self) -> None:
            try:
                super().finish()
            except (OSError, ValueError):
                pass  # the connection was reset on purpose

    return Handler


class SilentPort:
    """A listening TCP port on 127.0.0.1 that never accepts: connects succeed, then silence."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


BOMB = 512 << 20  # bytes of zeros each bomb inflates to
RSS_LIMIT_KIB = 200 << 10  # a daemon that decoded a bomb would grow far past this


@functools.cache
def bomb(encoding: str) -> bytes:
    """A body of a few KiB that decodes, as ``encoding`` says, to BOMB bytes of zeros."""
    zeros = bytes(1 << 20)
    if encoding == "zstd":
        zstd = zstandard.ZstdCompressor(level=19).compressobj()
        return b"".join(zstd.compress(zeros) for _ in range(BOMB >> 20)) + zstd.flush()
    assert encoding == "gzip, gzip"
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    inner = b"".join(deflate.compress(zeros) for _ in range(BOMB >> 20)) + deflate.flush()
    return gzip.compress(inner, 9)


def peak_rss_kib(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")
