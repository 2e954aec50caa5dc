"""A store shared by several nodes: daemons in separate mount namespaces (standing in for
nodes) mount the same path and share one store directory."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    LMGREET,
    LMHELLO,
    MOUNT_WAIT,
    lazymount_command,
    short_dir,
)

from lazymount.store.shared import SharedStore, host_tag

TARBALLS = {  # the fixture's two package tarballs
    LMHELLO: "/blobs/sha256/ff/ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f",
    LMGREET: "/blobs/sha256/2d/2dc5ac5054b7b63d66540ec8560cbd775f7c753810e48bb32574e8e4ca634ead",
}


@dataclass
class Node:
    """A daemon in a mount namespace of its own."""

    process: subprocess.Popen[bytes]
    root: Path
    store: Path
    log: Path

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--target={self.process.pid}", "--mount", "--",
                               *command], capture_output=True, text=True, timeout=120)

    def mounted(self) -> bool:
        try:
            text = Path(f"/proc/{self.process.pid}/mountinfo").read_text()
        except OSError:
            return False
        return any(line.split()[4] == str(self.root) and "lazymount" in line
                   for line in text.splitlines())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator:
    """Factory: start a daemon in a new mount namespace (optionally with the shared store
    made read-only there); stopped with SIGTERM after the test."""
    started: list[Node] = []
    root = short_dir()

    def start(url: str, shared: Path, read_only: bool = False) -> Node:
        name = f"node{len(started)}"
        store, log = tmp_path / name, tmp_path / f"{name}.log"
        args = lazymount_command(
            f"--mirror={url}", f"--trust-key={FIXTURE_KEY}", f"--store={store}",
            f"--keyring={tmp_path / 'no-keys'}", f"--shared-store={shared}", "--foreground",
            "--timeout=5", str(root))
        command = ["unshare", "--mount", "--propagation", "private", "--", *args]
        if read_only:
            script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && '
                      'exec "$@"')
            command = ["unshare", "--mount", "--propagation", "private", "--",
                       "sh", "-c", script, "sh", str(shared), *args]
        with open(log, "ab") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=handle)
        node = Node(process, root, store, log)
        started.append(node)
        deadline = time.monotonic() + MOUNT_WAIT
        while not node.mounted():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not mount:\n{node.log_text()}")
            time.sleep(0.05)
        return node

    yield start
    for node in started:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(20)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
    shutil.rmtree(root, ignore_errors=True)
    for node in started:
        assert "Traceback" not in node.log_text(), node.log_text()


def hello(node: Node) -> subprocess.CompletedProcess[str]:
    return node.run(str(node.root / "linux-x86_64" / LMHELLO / "bin" / "hello"), "-v")


def packages(store: Path) -> list[str]:
    pkgs = store / "pkgs"
    return sorted(p.name.split(".")[0] for p in pkgs.iterdir()) if pkgs.is_dir() else []


def test_two_nodes_sharing_a_store_materialize_once_and_both_serve(
        http_server, nodes, tmp_path):
    origin = http_server(FIXTURE_CACHE)
    shared = tmp_path / "shared"
    first, second = nodes(origin.url, shared), nodes(origin.url, shared)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def start(name: str, node: Node) -> None:
        results[name] = hello(node)

    threads = [threading.Thread(target=start, args=(name, node))
               for name, node in (("first", first), ("second", second))]
    for thread in threads:  # both nodes start the tool at the same moment
        thread.start()
    for thread in threads:
        thread.join()
    for result in results.values():
        assert result.returncode == 0, result.stderr
        assert "Hello from lmgreet, world!" in result.stdout
    fetched = Counter(r for r in origin.requests if r in TARBALLS.values())
    assert fetched == Counter(TARBALLS.values()), origin.requests  # each tarball once
    # in the shared store, under the same keys; nothing in the nodes' own stores
    assert packages(shared) == sorted(h.rsplit("-", 1)[1] for h in TARBALLS)
    assert packages(first.store) == packages(second.store) == []
    assert not list((shared / "claims").iterdir()) and not list((shared / "staging").iterdir())
    fetching = [f"{LMHELLO.split('-')[0]}" in line and ": fetching" in line
                for node in (first, second) for line in node.log_text().splitlines()]
    assert fetching.count(True) == 1


def test_a_read_only_node_uses_the_shared_store_and_keeps_what_it_lacks_locally(
        http_server, nodes, tmp_path):
    origin = http_server(FIXTURE_CACHE)
    shared = tmp_path / "shared"
    writer = nodes(origin.url, shared)
    assert hello(writer).returncode == 0
    # the shared store loses lmhello (as if it was never materialized there)
    hello_hash = LMHELLO.rsplit("-", 1)[1]
    [entry] = [p for p in (shared / "pkgs").iterdir() if p.name.startswith(hello_hash)]
    shutil.move(str(entry), str(tmp_path / "removed"))
    before = len(origin.requests)
    reader = nodes(origin.url, shared, read_only=True)
    result = hello(reader)
    assert result.returncode == 0, result.stderr + reader.log_text()
    assert "read-only here" in reader.log_text()
    fetched = [r for r in origin.requests[before:] if r in TARBALLS.values()]
    assert fetched == [TARBALLS[LMHELLO]]  # lmgreet came from the shared store
    assert packages(reader.store) == [hello_hash]
    assert packages(shared) == [LMGREET.rsplit("-", 1)[1]]


def test_sweeping_keeps_other_hosts_work_and_a_dead_claim_is_broken(tmp_path):
    shared = SharedStore(tmp_path / "shared", host="node-a.example.org")
    other = SharedStore(tmp_path / "shared", host="node-b")
    assert shared.host == host_tag("node-a.example.org") == "node-a-example-org"
    theirs = other.new_staging("abc.0123456789")
    dead = shared.staging_dir / f"abc.0123456789.{shared.host}.999999999.x1y2z3"
    dead.mkdir()
    assert shared.sweep() == 1
    assert theirs.is_dir() and not dead.exists()
    # claims: one node gets it; the other sees it held, then standing still, and breaks it
    assert shared.claim("k") and not other.claim("k")
    stamp = other.claim_stamp("k")
    assert stamp is not None
    other.break_claim("k", stamp + 1)  # not the claim it saw standing still: kept
    assert other.claim_stamp("k") == stamp
    other.break_claim("k", stamp)
    assert other.claim_stamp("k") is None and other.claim("k")
    other.release("k")
    assert other.claim_stamp("k") is None
