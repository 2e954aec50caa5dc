"""Shared fixtures: loopback HTTP servers (Python and nginx) and real FUSE mounts."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from spackcache import Signer

# the real Spack tier (real_spack, spack) and the caches of the mixed mount (caches)
pytest_plugins = ("realspack", "mixedcaches")

DATA = Path(__file__).parent / "data"
FIXTURE_CACHE = DATA / "v3-own-only"
FIXTURE_KEY = DATA / "keys" / "lazymount-fixtures.pub.asc"
FIXTURE_SECRET_KEY = DATA / "keys" / "lazymount-fixtures.secret.asc"
LMHELLO = "lmhello-1.0-3vgakfze5q7cw5gke5wbrfotzhh2tstq"
LMGREET = "lmgreet-1.0-2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
MOUNT_WAIT = 60.0
INDEX_MANIFEST = Path("v3/manifests/index/index.manifest.json")

# Python before 3.11.4 (Debian 12 ships 3.11.2) holds the GIL while a vfork()ed child execs
# (CPython gh-104372): running a program from a mount whose mirror is served by a thread of
# this process then stalls that thread until the daemon times out. Plain fork() avoids it.
if sys.version_info < (3, 11, 4):
    subprocess._USE_VFORK = False  # type: ignore[attr-defined]

# Started as root, a daemon runs as the lazymount account; pytest's folders are root's alone
# (mode 0700), so the daemons of the tests keep root unless a test says otherwise (--user,
# or this variable: tests/test_privileges.py).
os.environ["LAZYMOUNT_DEFAULT_USER"] = "root"


# fixtures that start a lazymount daemon, mount something or run a whole `lazymount publish`
# over a built cache: a test that uses one is end-to-end (``pytest -m "not e2e"`` leaves it
# out; docs/TESTING.md)
E2E_FIXTURES = frozenset({"mount_cache", "daemon", "nodes", "tmpfs", "spack", "published"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def signer() -> Iterator[Signer]:
    """The throw-away fixture key, ready to sign manifests (a private GNUPGHOME)."""
    with Signer(FIXTURE_SECRET_KEY) as trusted:
        yield trusted


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@dataclass
class HttpServer:
    url: str
    requests: list[str] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None


@pytest.fixture
def http_server() -> Iterator[functools.partial[HttpServer]]:
    """Factory: serve a directory on 127.0.0.1 with Python's HTTP server."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path) -> HttpServer:
        record = HttpServer(url="")

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                record.requests.append(self.path)
                super().do_GET()

        handler = functools.partial(Handler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        record.url = f"http://127.0.0.1:{server.server_address[1]}"

        def stop() -> None:
            server.shutdown()
            server.server_close()

        record.stop = stop
        return record

    yield functools.partial(start)
    for server in servers:
        if server.socket.fileno() != -1:
            server.shutdown()
            server.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[[Path], object]]:
    """Factory of ``hostile.FaultyServer`` mirrors (chosen paths answered badly), all
    stopped at the end."""
    from hostile import FaultyServer  # it imports this module

    started: list[FaultyServer] = []

    def start(directory: Path) -> FaultyServer:
        server = FaultyServer(directory)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs(size)`` mounts a tmpfs of ``size`` (as mount takes it: "4m") under the test's
    folder and returns it; each is unmounted at the end (lazily, in case a daemon still
    holds it)."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        path = tmp_path / f"tmpfs-{len(mounted)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(path)], check=True)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server that takes a port
    number rather than a socket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nginx_server(tmp_path: Path) -> Iterator[functools.partial[str]]:
    """Factory: serve a directory with a real nginx on loopback, as sites serve mirrors."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (apt-get install nginx); .ci/run installs it")
    processes: list[subprocess.Popen[bytes]] = []

    def start(directory: Path) -> str:
        port = free_port()
        conf = tmp_path / f"nginx-{port}.conf"
        # nginx hands its temporary folders to its worker user: not the test's own folder,
        # which holds the store (that must stay root's)
        temp = tmp_path / f"nginx-temp-{port}"
        temp.mkdir()
        conf.write_text(
            f"daemon off; worker_processes 1; error_log {tmp_path}/nginx-error.log; "
            f"pid {tmp_path}/nginx-{port}.pid;\n"
            "events { worker_connections 64; }\n"
            f"http {{ access_log {tmp_path}/nginx-access.log; "
            f"client_body_temp_path {temp}; proxy_temp_path {temp}; "
            f"fastcgi_temp_path {temp}; uwsgi_temp_path {temp}; "
            f"scgi_temp_path {temp};\n"
            f"  server {{ listen 127.0.0.1:{port}; root {directory}; }} }}\n"
        )
        process = subprocess.Popen([nginx, "-c", str(conf), "-e", f"{tmp_path}/nginx-error.log"])
        processes.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.05)
        pytest.fail("nginx did not start")

    yield functools.partial(start)
    for process in processes:
        process.terminate()
        process.wait(10)


def served_cache(directory: Path, names: set[str]) -> Path:
    """A copy of the fixture cache whose index lists only the packages ``names`` (and the
    records they need); call again to change what it lists."""
    if not directory.exists():
        shutil.copytree(FIXTURE_CACHE, directory)
    manifest = json.loads((FIXTURE_CACHE / INDEX_MANIFEST).read_text())
    checksum = manifest["data"][0]["checksum"]
    index = json.loads((FIXTURE_CACHE / "blobs/sha256" / checksum[:2] / checksum).read_text())
    installs = index["database"]["installs"]
    for dag_hash in [h for h, r in installs.items()
                     if r["in_buildcache"] and r["spec"]["name"] not in names]:
        del installs[dag_hash]
    blob = json.dumps(index).encode()
    digest = hashlib.sha256(blob).hexdigest()
    (directory / "blobs/sha256" / digest[:2]).mkdir(parents=True, exist_ok=True)
    (directory / "blobs/sha256" / digest[:2] / digest).write_bytes(blob)
    manifest["data"][0].update(checksum=digest, contentLength=len(blob))
    temporary = directory / INDEX_MANIFEST.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, directory / INDEX_MANIFEST)
    return directory


def ensure_user(name: str, system: bool) -> pwd.struct_passwd:
    """The account ``name``, made (without a home) when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        flags = ["--system", "--no-create-home"] if system else ["--no-create-home"]
        subprocess.run(["useradd", *flags, "--user-group", "--shell", "/usr/sbin/nologin",
                        name], check=True)
        return pwd.getpwnam(name)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user may enter (pytest's own are root's alone), removed after."""
    path = Path(tempfile.mkdtemp(prefix="lmsec", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def short_dir(prefix: str = "lm") -> Path:
    """A mount point under /tmp with a path no longer than the fixture's 17-character root."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    assert len(str(path)) <= 17, path
    return path


@dataclass
class Mount:
    """A running lazymount serving ``root``; its log is read by the tests."""

    root: Path
    store: Path
    log: Path
    process: subprocess.Popen[bytes] | None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def prefix(self, name: str = LMHELLO) -> Path:
        return self.root / "linux-x86_64" / name


MODULES_INIT = Path("/usr/share/modules/init/bash")  # Debian's environment-modules
LMOD_EXEC = "usr/share/lmod/lmod/libexec/lmod"


def lmod_executable() -> Path:
    """Lmod unpacked into the virtual environment by scripts/setup.sh, or a system one."""
    for candidate in (Path(sys.prefix) / "lmod" / LMOD_EXEC, Path("/") / LMOD_EXEC):
        if candidate.exists():
            return candidate
    pytest.fail("Lmod is not installed (scripts/setup.sh unpacks it into .venv/lmod)")


def lazymount_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazymount", *args]


def unmount(root: Path) -> None:
    """Detach ``root`` if it is in the mount table, even when its daemon is dead (then
    os.path.ismount, which stats it, says no)."""
    if any(line.split()[4] == str(root) for line in open("/proc/self/mountinfo")):
        subprocess.run(["fusermount3", "-u", "-z", str(root)], check=False)


def touch(path: Path, limit: float = 60.0) -> int:
    """List ``path`` in a child process; its errno (0 for success). Fails the test if the
    listing has not ended within ``limit`` seconds (a bound on a hang, not a speed check)."""
    code = ("import os, sys\n"
            "try:\n    os.listdir(sys.argv[1]); print(0)\n"
            "except OSError as e:\n    print(e.errno)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            text=True, timeout=limit)
    return int(result.stdout)


def write_config(path: Path, mountpoint: Path, **keys: object) -> Path:
    """A config file with one [mounts."MOUNTPOINT"] table of ``keys`` (TOML by hand: the
    values here are strings, lists of strings and booleans)."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f'[mounts."{mountpoint}"]'] + [f"{k} = {value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def expect_refusal(mount: Mount, wanted_errno: int, message: str, name: str = LMHELLO) -> None:
    """Touching the package fails with ``wanted_errno``; the log names it and the reason."""
    with pytest.raises(OSError) as info:
        os.listdir(mount.prefix(name))
    assert info.value.errno == wanted_errno, info.value
    log = mount.log_text()
    package = name.split("-")[0]
    lines = [line for line in log.splitlines() if message in line and package in line]
    assert lines, f"no log line naming {package} with {message!r}:\n{log}"
    pkgs = mount.store / "pkgs"
    assert not any(entry.name.startswith(name.rsplit("-", 1)[1]) for entry in pkgs.iterdir())
    deadline = time.monotonic() + 5  # staging is discarded in the background
    while any((mount.store / "staging").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any((mount.store / "staging").iterdir())


@pytest.fixture
def mount_cache(tmp_path: Path) -> Iterator[functools.partial[Mount]]:
    """Factory: mount mirrors with a foreground lazymount process; always unmounted after.

    Fails the test if the daemon logged a traceback (an unexpected error).
    """
    mounts: list[Mount] = []

    def start(mirrors: list[str], keys: tuple[Path, ...] = (FIXTURE_KEY,),
              extra: tuple[str, ...] = (), store: Path | None = None,
              root: Path | None = None) -> Mount:
        root = root or short_dir()
        store = store or tmp_path / "store"
        log = tmp_path / f"lazymount-{len(mounts)}.log"
        args = [f"--mirror={m}" for m in mirrors] + [f"--trust-key={k}" for k in keys]
        # an empty keyring of the test's own, so no system keyring is trusted
        # an empty configuration file: no /etc/lazymount/config.toml of the machine counts
        empty_config = tmp_path / "empty-config.toml"
        empty_config.touch()
        args += [f"--config={empty_config}"]
        args += [f"--store={store}", f"--keyring={tmp_path / 'no-keys'}", "--foreground",
                 "--timeout=5", *extra, str(root)]
        with open(log, "ab") as handle:
            process = subprocess.Popen(lazymount_command(*args), stdout=handle, stderr=handle)
        mount = Mount(root, store, log, process)
        mounts.append(mount)
        deadline = time.monotonic() + MOUNT_WAIT
        while not os.path.ismount(root):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"lazymount did not mount:\n{mount.log_text()}")
            time.sleep(0.05)
        return mount

    yield functools.partial(start)
    for mount in mounts:
        unmount(mount.root)
        if mount.process is not None:
            try:
                mount.process.wait(20)
            except subprocess.TimeoutExpired:
                mount.process.send_signal(signal.SIGKILL)
                mount.process.wait()
        if not os.path.ismount(mount.root):
            shutil.rmtree(mount.root, ignore_errors=True)
    for mount in mounts:
        text = mount.log_text()
        assert "Traceback" not in text, f"the daemon hit an unexpected error:\n{text}"
