"""A real squid on loopback (memory cache only), and a proxy that never answers.

Used by the fleet tests and the scale bench. Squid runs in the foreground (``-N``) with a
configuration written here: a free port, no disk cache, no system service, logs in a
directory of its own (squid drops root to its ``proxy`` user, which must be able to write
there).
"""

from __future__ import annotations

import http.server
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

SQUID = shutil.which("squid") or "/usr/sbin/squid"

# what a site's squid needs for a Spack build cache (docs/SERVICE.md, "On a cluster"):
# objects as large as the biggest tarball, kept in memory here, and content-addressed blobs
# and spec manifests treated as fresh for a long time even when the origin sends no
# Cache-Control; nodes asking at once for one missing object wait for one fetch of it
# (collapsed_forwarding); a range request (a span of an opened package) is answered from the
# whole object, which squid fetches once and keeps even if the client leaves early (squid
# keeps no partial answers: without these every node's span would go to the origin);
# everything else (the index manifest) follows squid's heuristic and is
# revalidated whenever lazymount asks with max-age=0
SITE_RULES = """\
maximum_object_size 4 GB
collapsed_forwarding on
range_offset_limit none
quick_abort_min -1 KB
refresh_pattern /blobs/sha256/ 10080 100% 525600
refresh_pattern \\.spec\\.manifest\\.json$ 10080 100% 525600
refresh_pattern . 0 20% 4320
"""


@dataclass
class Squid:
    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    def access_log(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_squid(memory_mb: int = 512) -> Squid:
    """Start squid on a free loopback port; the caller stops it."""
    if not os.path.exists(SQUID):
        raise RuntimeError("squid is not installed (apt-get install squid; scripts/setup.sh)")
    directory = Path(tempfile.mkdtemp(prefix="lm-squid-"))
    user = "proxy"
    if os.geteuid() == 0:
        account = pwd.getpwnam(user)
        os.chown(directory, account.pw_uid, account.pw_gid)
    else:
        user = pwd.getpwuid(os.geteuid()).pw_name
    port = free_port()
    (directory / "squid.conf").write_text(
        f"http_port 127.0.0.1:{port}\n"
        f"cache_effective_user {user}\n"
        f"pid_filename {directory}/squid.pid\n"
        f"cache_log {directory}/cache.log\n"
        f"access_log stdio:{directory}/access.log squid\n"
        "cache_store_log none\n"
        f"coredump_dir {directory}\n"
        f"cache_mem {memory_mb} MB\n"
        f"maximum_object_size_in_memory {memory_mb // 2} MB\n"
        "memory_cache_mode always\n"
        "http_access allow localhost\n"
        "http_access deny all\n"
        "shutdown_lifetime 0 seconds\n"
        + SITE_RULES)
    process = subprocess.Popen([SQUID, "-N", "-f", str(directory / "squid.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    squid = Squid(f"http://127.0.0.1:{port}", directory, process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return squid
        except OSError:
            time.sleep(0.05)
    log = (directory / "cache.log").read_text(errors="replace") if (
        directory / "cache.log").exists() else ""
    squid.stop()
    raise RuntimeError(f"squid did not start:\n{log}")


@dataclass
class SilentProxy:
    """A proxy that accepts connections and never answers (a hung proxy host)."""

    url: str
    accepted: list[socket.socket] = field(default_factory=list)
    listener: socket.socket | None = None

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for conn in self.accepted:
            conn.close()


def start_silent_proxy() -> SilentProxy:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    proxy = SilentProxy(f"http://127.0.0.1:{listener.getsockname()[1]}", listener=listener)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            proxy.accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return proxy


class _Overloaded(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.answered += 1  # type: ignore[attr-defined]
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def start_overloaded_proxy() -> tuple[str, http.server.ThreadingHTTPServer]:
    """A proxy that answers every request with 503 (an overloaded or broken proxy); the
    caller shuts the server down. ``server.answered`` counts the requests."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Overloaded)
    server.answered = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def refused_proxy() -> str:
    """The URL of a proxy whose port refuses connections (a dead proxy host)."""
    return f"http://127.0.0.1:{free_port()}"
