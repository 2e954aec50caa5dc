"""The control socket of a shared mount, which every local user may reach: one user holding a
thousand idle connections, or sending thousands of bad requests, neither takes the daemon's
file descriptors nor fills its log; root's reads and `lazymount status` keep working."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURE_CACHE, LMGREET, ensure_user, lazymount_command
from hostile import ARCH_DIR, HostileCache

from lazymount.service import control

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
    reason="needs root (to connect as another user) and /usr/bin/python3")

ATTACKER = "lazymount-test"
CONNECTIONS = 1000

# runs as the attacker, with the system's Python: "idle" opens COUNT connections and holds
# them until its stdin closes; "garbage" sends COUNT bad requests, one per connection
ATTACK = r"""
import resource, socket, sys, time
path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held, answered = [], 0
bad = [b"x" * 70000 + b"\n", b"{not json\n", b"[" * 30000 + b"\n", b"\xff\xfe\n", b"[1]\n"]
deadline = time.monotonic() + 60  # for all the connections: a backlog that stays full
for n in range(count):
    sock = socket.socket(socket.AF_UNIX)
    sock.setblocking(False)
    connected = False
    while not connected and time.monotonic() < deadline:
        try:
            sock.connect(path)
            connected = True
        except BlockingIOError:  # the daemon's backlog is full: it has not accepted yet
            time.sleep(0.01)
        except OSError:
            break
    if not connected:
        sock.close()
        continue
    sock.settimeout(30)
    try:
        if mode == "garbage":
            sock.sendall(bad[n % len(bad)])
            answered += b'"error": "bad request: ' in sock.recv(4096)
    except OSError:
        pass
    if mode == "idle":
        held.append(sock)
    else:
        sock.close()
print(len(held) if mode == "idle" else answered, flush=True)
sys.stdin.read()
"""


def attack(path: Path, mode: str, count: int, uid: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["/usr/bin/python3", "-c", ATTACK, str(path), mode, str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            user=uid, group=uid)


def test_idle_connections_and_bad_requests_of_another_user(http_server, mount_cache):
    attacker = ensure_user(ATTACKER, system=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the usual limit of a daemon
    try:
        mount = mount_cache([http_server(FIXTURE_CACHE).url])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    path = control.runtime_dir() / control.socket_name(str(mount.root))
    idle = attack(path, "idle", CONNECTIONS, attacker.pw_uid)
    try:
        assert idle.stdout is not None
        assert int(idle.stdout.readline()) == CONNECTIONS  # all connected
        # root's first touches (files opened in the store, a download) and status work
        hello = subprocess.run([str(mount.prefix() / "bin" / "hello"), "-v"],
                               capture_output=True, text=True, timeout=120)
        assert "Hello from lmgreet, world!" in hello.stdout, hello.stderr + mount.log_text()
        found = subprocess.run(["find", str(mount.root / "linux-x86_64" / LMGREET), "-type",
                                "f", "-exec", "cat", "{}", "+"], capture_output=True,
                               timeout=120)
        assert found.returncode == 0, found.stderr
        status = subprocess.run(lazymount_command("status", str(mount.root)),
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "2 packages" in status.stdout, status.stderr
    finally:
        idle.communicate(timeout=120)
    before = len(mount.log_text())
    garbage = attack(path, "garbage", 2000, attacker.pw_uid)
    answered, _ = garbage.communicate(timeout=600)
    assert int(answered) >= 1600  # each answered (the over-long ones may be cut short)
    grown = mount.log_text()[before:]
    assert "Traceback" not in mount.log_text()
    assert len(grown) < 4096, grown[:4096]
    # one line for the lot (rate-limited: a minute between two), naming what was refused
    lines = [line for line in mount.log_text().splitlines() if "control socket" in line]
    assert len(lines) == 1 and f"uid {attacker.pw_uid}" in lines[0], lines
    status = subprocess.run(lazymount_command("status", str(mount.root)), capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr


def test_one_fsck_at_a_time(tmp_path, signer, mount_cache):
    """Six users' worth of fsck requests arrive at once (queued while the daemon is stopped):
    one re-hashes the store, the others are told it is running already."""
    cache = HostileCache(tmp_path / "cache", signer, victim_files={
        "share/big.bin": os.urandom(32 << 20), "share/small.txt": "x\n"})
    cache.finish()
    mount = mount_cache([str(cache.root)])
    prefix = mount.root / ARCH_DIR / cache.dirname
    assert (prefix / "share" / "small.txt").read_text() == "x\n"
    path = control.runtime_dir() / control.socket_name(str(mount.root))
    asks = []
    os.kill(mount.process.pid, signal.SIGSTOP)
    try:
        for _ in range(6):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": "fsck"}).encode() + b"\n")
            asks.append(sock)
    finally:
        os.kill(mount.process.pid, signal.SIGCONT)
    answers = []
    for sock in asks:
        with sock, sock.makefile("rb") as answer:
            sock.settimeout(120)
            answers.append(json.loads(answer.readline()))
    checked = [a for a in answers if "packages" in a]
    refused = [a for a in answers if "running already" in a.get("error", "")]
    assert len(checked) >= 1 and len(refused) >= 1, answers
    assert len(checked) + len(refused) == len(answers), answers
    assert all(row["damaged"] == "" for row in checked[0]["packages"])
