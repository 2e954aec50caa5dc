"""What the benchmarks stand on: a loopback nginx, lazymount mounts, timers, the machine.

Everything here is blocking and runs in the benchmark's single process (lazymount itself
runs as a child process, exactly as users start it).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOUNT_WAIT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Nginx:
    """nginx serving ``root`` on 127.0.0.1, logging each request's URI, status and bytes."""

    def __init__(self, root: Path, work: Path):
        self.root = root
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "access.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        temp = self.work / "tmp"
        conf.write_text(
            f"daemon off; worker_processes 2; error_log {self.work}/error.log; "
            f"pid {self.work}/nginx.pid;\n"
            "events { worker_connections 256; }\n"
            "http { log_format bench '$request_uri $status $body_bytes_sent';\n"
            f"  access_log {self.log} bench; sendfile on; tcp_nopush on;\n"
            f"  client_body_temp_path {temp}; proxy_temp_path {temp}; "
            f"fastcgi_temp_path {temp}; uwsgi_temp_path {temp}; scgi_temp_path {temp};\n"
            f"  server {{ listen 127.0.0.1:{self.port}; root {self.root}; }} }}\n")
        self.process = subprocess.Popen([nginx, "-c", str(conf), "-e", f"{self.work}/error.log"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def mark(self) -> int:
        """A position in the access log; ``requests_since`` lists what came after it."""
        return self.log.stat().st_size if self.log.exists() else 0

    def requests_since(self, mark: int) -> list[tuple[str, int, int]]:
        """(uri, status, body bytes) of each request logged after ``mark``."""
        with open(self.log, "rb") as handle:
            handle.seek(mark)
            lines = handle.read().decode().splitlines()
        out = []
        for line in lines:
            uri, status, size = line.rsplit(" ", 2)
            out.append((uri, int(status), int(size)))
        return out


def short_dir(prefix: str) -> Path:
    """A mount point or install root at most 17 characters long (the caches' build root is
    18, and relocated binaries cannot grow)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    assert len(str(path)) <= 17, path
    return path


@dataclass
class Mount:
    """A foreground lazymount serving ``mirror`` at a fresh short path."""

    mirror: str
    store: Path
    key: Path
    root: Path = field(default_factory=lambda: short_dir("lmb"))
    extra: tuple[str, ...] = ()  # more lazymount options
    log: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    seconds: float = 0.0  # from starting the command to the mount being there
    log_start: int = 0  # this mount's part of the (shared) log file

    def __enter__(self) -> Mount:
        self.log = self.store.parent / f"{self.store.name}.log"
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        command = [sys.executable, "-m", "lazymount", f"--mirror={self.mirror}",
                   f"--trust-key={self.key}", f"--store={self.store}", "--foreground",
                   *self.extra, str(self.root)]
        with open(self.log, "ab") as handle:
            started = time.perf_counter()
            self.process = subprocess.Popen(command, stdout=handle, stderr=handle)
        deadline = time.monotonic() + MOUNT_WAIT
        while not os.path.ismount(self.root):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lazymount did not mount:\n{self.log_text()}")
            time.sleep(0.002)
        self.seconds = time.perf_counter() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def unmount(self) -> None:
        if os.path.ismount(self.root):
            subprocess.run(["fusermount3", "-u", "-z", str(self.root)], check=False)
        if self.process is not None:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        if not os.path.ismount(self.root):
            shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        """What this mount logged."""
        if self.log is None or not self.log.exists():
            return ""
        with open(self.log, "rb") as handle:
            handle.seek(self.log_start)
            return handle.read().decode(errors="replace")

    def cpu_seconds(self) -> float:
        """CPU time the daemon and its reaped children (tar, gpg) have used so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def memory(self) -> dict[str, float]:
        """The daemon's resident set now and at its peak, in MiB."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
        return {"rss_mib": int(values["VmRSS"]) / 1024, "peak_mib": int(values["VmHWM"]) / 1024}

    def logged_seconds(self, pattern: str) -> list[float]:
        """Every number of seconds the daemon logged in lines matching ``pattern``
        (a regex with one group around the number)."""
        return [float(m) for m in re.findall(pattern, self.log_text())]


def wait_ready(prefixes: list[Path], timeout: float = 300) -> None:
    """Wait until the background prefetch of every prefix is done (its status xattr)."""
    deadline = time.monotonic() + timeout
    for prefix in prefixes:
        while True:
            status = os.getxattr(prefix, "user.lazymount.status").decode()
            if status == "ready" or status.startswith("failed"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{prefix} still {status}")
            time.sleep(0.05)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def drop_caches() -> bool:
    """Write back and drop the page, dentry and inode caches (root only); False if we may
    not, and then 'cold' figures are only as cold as the machine allows."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def remove_tree(path: Path) -> None:
    """Delete a large tree now and flush it, so the next measurement does not pay for it."""
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    subprocess.run(["sync"], check=False)


def machine() -> dict[str, str]:
    """What the figures were measured on."""

    def first(path: str, pattern: str) -> str:
        try:
            found = re.search(pattern, Path(path).read_text(), re.M)
        except OSError:
            return "?"
        return found.group(1).strip() if found else "?"

    device = os.stat(REPO).st_dev
    disk = "?"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        major, minor = parts[2].split(":")
        if os.makedev(int(major), int(minor)) == device:
            source = line.split(" - ")[1].split()
            disk = f"{source[1]} ({source[0]})"
            name = Path(source[1]).name.rstrip("0123456789") if source[1].startswith("/dev/") \
                else ""
            rotational = Path(f"/sys/block/{name}/queue/rotational")
            if name and rotational.exists():
                kind = "rotational" if rotational.read_text().strip() == "1" else "SSD"
                disk += f", {kind} per the kernel"
    memory = first("/proc/meminfo", r"^MemTotal:\s*(\d+)")
    fuse = subprocess.run(["pkg-config", "--modversion", "fuse3"], capture_output=True,
                          text=True).stdout.strip() or "?"
    return {
        "cpu": first("/proc/cpuinfo", r"^model name\s*:\s*(.*)$"),
        "nproc": str(os.cpu_count()),
        "memory": f"{round(int(memory) / 2**20)} GiB" if memory.isdigit() else "?",
        "kernel": platform.release(),
        "os": first("/etc/os-release", r'^PRETTY_NAME="?([^"\n]*)'),
        "disk": disk,
        "python": platform.python_version(),
        "libfuse": fuse,
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
