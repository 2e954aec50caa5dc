"""A mount that lives for weeks: the index refreshed while it is used, SIGHUP reloads, the
status and metrics it reports, the errors users can find, HTTPS mirrors with a site CA."""

from __future__ import annotations

import errno
import functools
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    INDEX_MANIFEST,
    LMGREET,
    LMHELLO,
    free_port,
    lazymount_command,
    served_cache,
    short_dir,
    unmount,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

import lazymount
from lazymount.service import control

pytestmark = pytest.mark.e2e  # these tests start daemons

WAIT = 60.0  # seconds before a condition that should come true is declared broken


@dataclass
class Daemon:
    root: Path
    config: Path
    store: Path
    process: subprocess.Popen[bytes]
    log: Path

    def lazymount(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(lazymount_command(*args), capture_output=True, text=True,
                              timeout=300)

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lazymount("status", *args)

    def json_status(self) -> dict:
        result = self.status(str(self.root), "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def listing(self) -> list[str]:
        return sorted(os.listdir(self.root / "linux-x86_64"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[functools.partial[Daemon]]:
    """Factory: a foreground lazymount mounting what a config file says; always unmounted."""
    started: list[Daemon] = []

    def start(mirrors: list[str], env: dict[str, str] | None = None, **keys: object) -> Daemon:
        root = short_dir()
        store = tmp_path / "store"
        settings: dict[str, object] = {
            "trust_keys": [str(FIXTURE_KEY)], "store": str(store),
            "keyring": str(tmp_path / "no-keys"), "timeout": "5s"}
        config = write_config(tmp_path / f"config-{len(started)}.toml", root, mirrors=mirrors,
                              **{**settings, **keys})
        log = tmp_path / f"daemon-{len(started)}.log"
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                lazymount_command("--config", str(config), "--foreground", str(root)),
                stdout=handle, stderr=handle, env={**os.environ, **(env or {})})
        running = Daemon(root, config, store, process, log)
        started.append(running)
        deadline = time.monotonic() + WAIT
        while not os.path.ismount(root):
            assert process.poll() is None and time.monotonic() < deadline, running.log_text()
            time.sleep(0.05)
        return running

    yield functools.partial(start)
    for running in started:
        unmount(running.root)
        try:
            running.process.wait(20)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()
        if not any(line.split()[4] == str(running.root) for line in open("/proc/self/mountinfo")):
            shutil.rmtree(running.root, ignore_errors=True)
    for running in started:
        assert "Traceback" not in running.log_text(), running.log_text()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def run(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path)], capture_output=True, text=True, timeout=60)


# ---- live index refresh ---------------------------------------------------------------------


def test_refresh_shows_new_packages_while_open_files_keep_reading(http_server, daemon,
                                                                  tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    server = http_server(cache)
    mount = daemon([server.url], index_refresh="off")
    assert mount.listing() == [LMGREET]
    hello = mount.root / "linux-x86_64" / LMHELLO
    assert not hello.exists()  # the kernel now caches "no such entry"
    greet_pc = mount.root / "linux-x86_64" / LMGREET / "lib" / "pkgconfig" / "greet.pc"
    expected = greet_pc.read_bytes()
    database = mount.root / ".spack-db" / "index.json"
    wait_for(lambda: database.exists(), "the Spack database is written")
    assert LMHELLO.rsplit("-", 1)[1] not in database.read_text()

    with open(greet_pc, "rb") as held:
        first = held.read(10)
        served_cache(cache, {"lmgreet", "lmhello"})
        before = len(server.requests)
        result = mount.lazymount("refresh", str(mount.root))
        assert result.returncode == 0, result.stderr
        assert "the index changed: 2 packages (1 new, 0 removed)" in result.stdout
        assert mount.listing() == [LMGREET, LMHELLO]
        assert "Hello from lmgreet" in run(hello / "bin" / "hello").stdout
        assert first + held.read() == expected  # the open file kept reading
    # the Spack upstream database follows the index
    assert LMHELLO.rsplit("-", 1)[1] in database.read_text()
    # an unchanged index costs one small request: the index manifest
    index_requests = [r for r in server.requests[before:] if "index" in r or "/blobs/" in r]
    assert index_requests[0] == f"/{INDEX_MANIFEST}"
    before = len(server.requests)
    result = mount.lazymount("refresh", str(mount.root))
    assert "the index is unchanged (2 packages)" in result.stdout
    assert server.requests[before:] == [f"/{INDEX_MANIFEST}"]


def test_refresh_updates_the_module_files(http_server, daemon, tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    mount = daemon([http_server(cache).url], index_refresh="off")
    tcl = mount.root / "modules" / "tcl"
    hello_hash = LMHELLO.rsplit("-", 1)[1]
    assert "lmhello" not in os.listdir(tcl / "linux-debian12-x86_64")
    assert hello_hash not in (tcl / "module-index.yaml").read_text()  # now in the kernel's cache
    served_cache(cache, {"lmgreet", "lmhello"})
    result = mount.lazymount("refresh", str(mount.root))
    assert result.returncode == 0, result.stderr
    assert "lmhello" in os.listdir(tcl / "linux-debian12-x86_64")
    assert hello_hash in (tcl / "module-index.yaml").read_text()


def test_removed_package_leaves_listings_but_running_one_keeps_being_served(
        http_server, daemon, tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet", "lmhello"})
    server = http_server(cache)
    mount = daemon([server.url], index_refresh="off")
    prefix = mount.root / "linux-x86_64" / LMHELLO
    assert run(prefix / "bin" / "hello").returncode == 0
    # a "running" user of the package: a shell whose working directory is in the prefix
    shell = subprocess.Popen(["sh", "-c", "read line; cat share/lmhello/message.txt"],
                             cwd=prefix, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        served_cache(cache, {"lmgreet"})
        result = mount.lazymount("refresh", str(mount.root))
        assert "(0 new, 1 removed)" in result.stdout, result.stdout + result.stderr
        assert mount.listing() == [LMGREET]
        assert not prefix.exists()
        out, _ = shell.communicate(b"go\n", timeout=60)
        assert shell.returncode == 0 and out.strip()  # read from the removed package
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()


def test_index_is_checked_every_index_refresh(http_server, daemon, tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    server = http_server(cache)
    mount = daemon([server.url], index_refresh="1s")
    assert mount.listing() == [LMGREET]
    with open(mount.root / "linux-x86_64" / LMGREET / "lib" / "pkgconfig" / "greet.pc",
              "rb") as held:
        served_cache(cache, {"lmgreet", "lmhello"})
        wait_for(lambda: mount.listing() == [LMGREET, LMHELLO], "the new package is listed")
        assert held.read()
    assert "periodic check" in mount.log_text()


def stopped(mount: Daemon) -> None:
    unmount(mount.root)
    mount.process.wait(20)


def test_a_remount_serves_the_stored_catalog_then_takes_a_changed_index(http_server, daemon,
                                                                        tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    server = http_server(cache)
    first = daemon([server.url])
    assert first.listing() == [LMGREET]
    stopped(first)
    served_cache(cache, {"lmgreet", "lmhello"})  # changed while nothing was mounted
    second = daemon([server.url])  # the same store; no periodic check for 10 minutes
    wait_for(lambda: second.listing() == [LMGREET, LMHELLO], "the new package is listed")
    log = second.log_text()
    assert f"serving the catalog stored at the last mount; checking {server.url} now" in log
    assert "refresh (the check after mounting): 2 packages now (1 new, 0 removed)" in log


def test_a_remount_with_the_mirror_down_serves_at_once(http_server, daemon, tmp_path):
    server = http_server(FIXTURE_CACHE)
    first = daemon([server.url])
    assert first.listing() == [LMGREET, LMHELLO]
    stopped(first)
    server.stop()
    # the mirror's address now takes connections and never answers: a mount that asked it
    # first would wait for the timeout (and its retries) before serving
    port = int(server.url.rsplit(":", 1)[1])
    with socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", port))
        silent.listen(16)
        second = daemon([server.url], timeout="2s")
        assert second.listing() == [LMGREET, LMHELLO]
        assert "failed" not in second.log_text()  # served before the mirror could answer
        wait_for(lambda: "refresh (the check after mounting) failed, still serving the index"
                 in second.log_text(), "the log says the check failed")
        assert second.json_status()["index"]["last_error"]
        assert second.listing() == [LMGREET, LMHELLO]


def test_gpg_starts_with_the_first_package_not_with_the_mount(http_server, daemon, tmp_path):
    scratch = tmp_path / "scratch"  # where the daemon's throw-away GNUPGHOME goes
    scratch.mkdir()
    mount = daemon([http_server(FIXTURE_CACHE).url], env={"TMPDIR": str(scratch)})
    assert mount.listing() == [LMGREET, LMHELLO]
    assert not list(scratch.glob("lazymount-gpg-*"))  # mounted and listed without gpg
    hello = run(mount.root / "linux-x86_64" / LMHELLO / "bin" / "hello")
    assert "Hello from lmgreet" in hello.stdout  # its manifest's signature was checked
    assert list(scratch.glob("lazymount-gpg-*"))


def test_sighup_reloads_config_and_index_and_keeps_the_mount(http_server, daemon, tmp_path):
    small = http_server(served_cache(tmp_path / "small", {"lmgreet"}))
    full = http_server(served_cache(tmp_path / "full", {"lmgreet", "lmhello"}))
    mount = daemon([small.url], index_refresh="off")
    with open(mount.root / "linux-x86_64" / LMGREET / "lib" / "pkgconfig" / "greet.pc",
              "rb") as held:
        write_config(mount.config, mount.root, mirrors=[full.url],
                     trust_keys=[str(FIXTURE_KEY)], store=str(mount.store),
                     keyring=str(tmp_path / "no-keys"), timeout="5s", index_refresh="off")
        mount.process.send_signal(signal.SIGHUP)
        wait_for(lambda: mount.listing() == [LMGREET, LMHELLO], "the reloaded mirror is used")
        assert held.read()
    assert os.path.ismount(mount.root) and mount.process.poll() is None
    assert "Hello from lmgreet" in run(mount.root / "linux-x86_64" / LMHELLO / "bin" /
                                       "hello").stdout
    assert "got SIGHUP: reloading" in mount.log_text()
    assert [m["url"] for m in mount.json_status()["mirrors"]] == [full.url]


def test_sighup_applies_a_new_refresh_interval(http_server, daemon, tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    server = http_server(cache)
    mount = daemon([server.url], index_refresh="off")
    write_config(mount.config, mount.root, mirrors=[server.url], trust_keys=[str(FIXTURE_KEY)],
                 store=str(mount.store), keyring=str(tmp_path / "no-keys"), timeout="5s",
                 index_refresh="1s")
    mount.process.send_signal(signal.SIGHUP)
    wait_for(lambda: mount.json_status()["index"]["refresh_interval_s"] == 1.0,
             "the reload is in place")
    served_cache(cache, {"lmgreet", "lmhello"})  # only the periodic check can see this now
    wait_for(lambda: mount.listing() == [LMGREET, LMHELLO], "the new interval is used")
    assert "refresh (periodic check)" in mount.log_text()


def test_sighup_reads_the_keyring_again(http_server, daemon, tmp_path):
    keyring = tmp_path / "keyring"
    keyring.mkdir(mode=0o700)
    shutil.copy(FIXTURE_KEY.parent / "other.pub.asc", keyring)  # not the cache's signer
    mount = daemon([http_server(FIXTURE_CACHE).url], trust_keys=[], keyring=str(keyring),
                   index_refresh="off")
    prefix = mount.root / "linux-x86_64" / LMHELLO
    with pytest.raises(PermissionError):  # EACCES: signed by a key the keyring lacks
        os.listdir(prefix)
    added = mount.lazymount("keys", "add", str(FIXTURE_KEY), f"--keyring={keyring}")
    assert added.returncode == 0, added.stderr
    mount.process.send_signal(signal.SIGHUP)
    wait_for(lambda: os.path.exists(prefix / "bin" / "hello"), "the new key is trusted")
    assert "Hello from lmgreet" in run(prefix / "bin" / "hello").stdout


def test_sighup_with_a_broken_config_keeps_serving(http_server, daemon, tmp_path):
    server = http_server(FIXTURE_CACHE)
    mount = daemon([server.url], index_refresh="off")
    mount.config.write_text(mount.config.read_text() + "mirror = 1\n")
    mount.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "mirror: unknown key" in mount.log_text(), "the reload error is logged")
    assert mount.listing() == [LMGREET, LMHELLO] and mount.process.poll() is None
    assert "mirror: unknown key" in mount.json_status()["index"]["last_error"]


# ---- status and metrics ------------------------------------------------------------------------


def test_status_json_and_prometheus(http_server, daemon, tmp_path):
    server = http_server(FIXTURE_CACHE)
    port = free_port()
    mount = daemon([server.url], index_refresh="10m", metrics_listen=f"127.0.0.1:{port}")
    assert run(mount.root / "linux-x86_64" / LMHELLO / "bin" / "hello").returncode == 0
    status = mount.json_status()
    assert status["pid"] == mount.process.pid
    assert status["mountpoint"] == str(mount.root)
    assert status["version"]
    assert status["mirrors"] == [{"url": server.url, "state": "ok", "last_error": None,
                                  "last_error_at": None, "layout": 3,
                                  "fetched_bytes": status["fetched_bytes"]}]
    assert status["index"]["packages"] == 2 and status["index"]["age_s"] >= 0
    assert status["index"]["refreshed"].endswith("Z")
    assert status["packages"]["ready"] == 2  # lmhello and its dependency lmgreet
    assert status["packages"]["materializing"] == 0 and status["packages"]["failed"] == []
    assert status["store"]["path"] == str(mount.store)
    assert status["store"]["packages"] == 2 and status["store"]["bytes"] > 0
    assert "quota_bytes" in status["store"]
    tarballs = sum(len(blob.read_bytes()) for blob in (FIXTURE_CACHE / "blobs").rglob("*")
                   if blob.is_file())
    assert 0 < status["fetched_bytes"] <= tarballs + 100_000

    text = mount.status(str(mount.root), "--prometheus").stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "# TYPE lazymount_index_packages gauge" in text
    assert families["lazymount_index_packages"].samples[0].value == 2
    ready = [s for s in families["lazymount_packages"].samples if s.labels["state"] == "ready"]
    assert ready[0].value == 2
    assert families["lazymount_mirror_up"].samples[0].labels["url"] == server.url
    assert families["lazymount_mirror_up"].samples[0].value == 1
    assert families["lazymount_fetched_bytes"].samples[0].value == status["fetched_bytes"]
    # the same metrics over HTTP
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        served = answer.read().decode()
    assert {f.name for f in text_string_to_metric_families(served)} == set(families)
    # for a person
    human = mount.status(str(mount.root)).stdout
    assert f"at {mount.root}" in human and "2 ready" in human and server.url in human


def test_stopped_mirror_and_failed_package_show_their_reason(http_server, daemon, tmp_path):
    server = http_server(FIXTURE_CACHE)
    mount = daemon([server.url], index_refresh="off")
    prefix = mount.root / "linux-x86_64" / LMHELLO
    server.stop()
    with pytest.raises(OSError) as failure:
        os.listdir(prefix)
    assert failure.value.errno == errno.EIO
    status = mount.json_status()
    assert status["mirrors"][0]["state"] == "failing"
    assert "connection refused" in status["mirrors"][0]["last_error"]
    failed = status["packages"]["failed"]
    assert [f["name"] for f in failed] == ["lmhello"]
    assert failed[0]["hash"] == LMHELLO.rsplit("-", 1)[1]
    reason = failed[0]["reason"]
    assert server.url in reason and "connection refused" in reason
    # the same reason on the package itself, for a path inside it, in one log line
    xattr = os.getxattr(prefix, "user.lazymount.status").decode()
    assert xattr == f"failed: {reason}"
    answer = mount.status(str(prefix / "bin" / "hello"))
    assert answer.returncode == 0, answer.stderr
    assert f"{prefix}: " in answer.stdout and "failed" in answer.stdout
    assert "connection refused" in answer.stdout
    lines = [line for line in mount.log_text().splitlines()
             if "lmhello" in line and "connection refused" in line]
    assert len(lines) == 1, mount.log_text()
    human = mount.status(str(mount.root)).stdout
    assert "failing" in human and "connection refused" in human
    # a refresh against the stopped mirror keeps serving the index it has, and says why
    result = mount.lazymount("refresh", str(mount.root))
    assert result.returncode != 0 and "connection refused" in result.stderr
    assert mount.listing() == [LMGREET, LMHELLO]


def test_credentials_in_mirror_urls_are_never_shown(http_server, daemon, tmp_path):
    server = http_server(FIXTURE_CACHE)
    port = server.url.rsplit(":", 1)[1]
    mount = daemon([f"http://reader:s3cret@127.0.0.1:{port}"], index_refresh="off")
    assert run(mount.root / "linux-x86_64" / LMHELLO / "bin" / "hello").returncode == 0
    status = mount.json_status()
    assert status["mirrors"][0]["url"] == f"http://***@127.0.0.1:{port}"
    shown = (json.dumps(status) + mount.status(str(mount.root), "--prometheus").stdout
             + mount.status(str(mount.root)).stdout + mount.log_text())
    assert "s3cret" not in shown and "reader" not in shown


TOKEN = "SECRET-t0k3n"
ATTACKER = "lazymount-test"  # a second local account (tests/test_security.py makes it)


def tarball_of(package: str) -> Path:
    """The fixture cache's tarball blob of ``package`` (from its signed spec manifest)."""
    manifest = FIXTURE_CACHE / "v3/manifests/spec" / package.split("-")[0] / \
        f"{package}.spec.manifest.json"
    text = manifest.read_text()
    document = json.loads(text[text.index("{"):text.index("-----BEGIN PGP SIGNATURE")])
    (record,) = [r for r in document["data"] if ".tar" in r["mediaType"]]
    return Path("blobs/sha256") / record["checksum"][:2] / record["checksum"]


@pytest.fixture
def token_mirror(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """The fixture cache over HTTP, answering only requests that carry ``?token=TOKEN``
    (403 otherwise), with lmgreet's tarball missing: (its URL, the paths it was asked)."""
    directory = tmp_path / "token-cache"
    shutil.copytree(FIXTURE_CACHE, directory)
    (directory / tarball_of(LMGREET)).unlink()
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)  # type: ignore[misc]

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:
            asked.append(self.path)
            if not self.path.endswith(f"?token={TOKEN}"):
                self.send_error(403)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


SYSTEM_PYTHON = "/usr/bin/python3"


def as_attacker(*args: str) -> str:
    """What ``lazymount ARGS`` prints to another local user: run by the system's Python
    (the test's own may live where that user cannot enter) over this checkout and the
    packages of the test's environment."""
    path = [str(Path(lazymount.__file__).parents[1]), sysconfig.get_paths()["purelib"]]
    result = subprocess.run([SYSTEM_PYTHON, "-m", "lazymount", *args], capture_output=True,
                            text=True, timeout=120, user=ATTACKER, group=ATTACKER, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(path)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def other_user_can_run_lazymount() -> bool:
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        return False
    try:
        pwd.getpwnam(ATTACKER)
    except KeyError:
        return False
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    return version == str(sys.version_info[:2])  # the same compiled packages


def test_a_token_in_a_mirror_url_is_shown_nowhere(token_mirror, daemon):
    if not other_user_can_run_lazymount():
        pytest.skip(f"needs root, the user {ATTACKER} and {SYSTEM_PYTHON} of this Python")
    url, asked = token_mirror
    port = free_port()
    mount = daemon([f"{url}/?token={TOKEN}"], index_refresh="off", allow_other=True,
                   metrics_listen=f"127.0.0.1:{port}")
    # the token goes with every request (the mirror answers nothing without it) ...
    assert os.listdir(mount.root / "linux-x86_64" / LMHELLO)
    with pytest.raises(OSError):  # (its tarball is missing: an error naming the URL)
        os.listdir(mount.root / "linux-x86_64" / LMGREET)
    assert asked and all(path.endswith(f"?token={TOKEN}") for path in asked), asked
    # ... and is shown to no one: status, metrics, log, store
    status = json.loads(as_attacker("status", str(mount.root), "--json"))
    assert status["mirrors"][0]["url"] == f"{url}?token=***"
    (failed,) = status["packages"]["failed"]
    assert "HTTP 404" in failed["reason"] and "?token=***" in failed["reason"]
    shown = [json.dumps(status), as_attacker("status", str(mount.root)),
             as_attacker("status", str(mount.root), "--prometheus"),
             as_attacker("status", str(mount.root / "linux-x86_64" / LMGREET)),
             as_attacker("status", str(mount.root / "linux-x86_64" / LMGREET), "--json"),
             mount.log_text()]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        shown.append(answer.read().decode())
    for text in shown:
        assert TOKEN not in text, text
    stored = [path for path in mount.store.rglob("*")
              if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert not stored, stored


def test_a_password_is_never_on_the_daemons_command_line(http_server, tmp_path):
    server = http_server(FIXTURE_CACHE)
    url = server.url.replace("http://", "http://reader:s3cret@")
    root = short_dir()
    try:
        # every user reads a command line (ps): a URL with a secret is refused there ...
        for option in (f"--mirror={url}", f"--mirror={server.url}/?token=s3cret",
                       "--proxy=http://reader:s3cret@127.0.0.1:3128;DIRECT"):
            result = subprocess.run(  # (to a mount point that is not there: none is made)
                lazymount_command(option, "--foreground", str(tmp_path / "nowhere")),
                capture_output=True, text=True, timeout=120)
            assert result.returncode == 2
            assert "is not taken from the command line" in result.stderr, result.stderr
            assert "configuration file" in result.stderr and "s3cret" not in result.stderr
        # ... and taken from the configuration file, it stays out of the daemon's
        config = write_config(tmp_path / "config.toml", root, mirrors=[url],
                              trust_keys=[str(FIXTURE_KEY)], store=str(tmp_path / "store"),
                              keyring=str(tmp_path / "no-keys"), index_refresh="off")
        result = subprocess.run(lazymount_command("--config", str(config), str(root)),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert run(root / "linux-x86_64" / LMHELLO / "bin" / "hello").returncode == 0
        status = subprocess.run(lazymount_command("status", str(root), "--json"),
                                capture_output=True, text=True, timeout=120)
        pid = json.loads(status.stdout)["pid"]
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert str(root).encode() in command_line  # the daemon's own
        assert b"s3cret" not in command_line and b"reader" not in command_line
    finally:
        subprocess.run(lazymount_command("umount", str(root)), capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_status_of_every_mount_in_one_exposition(http_server, daemon):
    server = http_server(FIXTURE_CACHE)
    first = daemon([server.url], index_refresh="off")
    second = daemon([server.url], index_refresh="off")
    result = first.status("--prometheus")
    assert result.returncode == 0, result.stderr
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    shown = {s.labels["mountpoint"] for s in families["lazymount_index_packages"].samples}
    assert {str(first.root), str(second.root)} <= shown  # (other mounts may run too)
    listed = json.loads(first.status("--json").stdout)
    assert {str(first.root), str(second.root)} <= {s["mountpoint"] for s in listed}


def test_control_socket_goes_with_the_mount(http_server, daemon):
    mount = daemon([http_server(FIXTURE_CACHE).url], index_refresh="off")
    path = control.runtime_dir() / control.socket_name(str(mount.root))
    assert path.exists()
    assert mount.lazymount("umount", str(mount.root)).returncode == 0
    mount.process.wait(60)
    assert not path.exists()


def test_under_systemd_a_failure_is_one_line_with_its_journal_priority(http_server, daemon):
    server = http_server(FIXTURE_CACHE)
    mount = daemon([server.url], env={"JOURNAL_STREAM": "8:12345"}, index_refresh="off")
    server.stop()
    with pytest.raises(OSError):
        os.listdir(mount.root / "linux-x86_64" / LMHELLO)
    lines = mount.log_text().splitlines()
    failures = [line for line in lines if "connection refused" in line]
    assert len(failures) == 1 and failures[0].startswith("<3>lazymount: lmhello-1.0-"), lines
    assert any(line.startswith("<6>lazymount: mounted") for line in lines), lines


def test_status_without_a_daemon_says_so(tmp_path):
    result = subprocess.run(lazymount_command("status", str(tmp_path)), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "is not on a lazymount mount" in result.stderr


ASK_AS = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(json.dumps({"command": sys.argv[2]}).encode() + b"\\n")
print(sock.makefile().readline())
"""


def test_control_socket_refuses_refresh_by_other_users(http_server, daemon, tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root (to ask as another user) and /usr/bin/python3")
    server = http_server(FIXTURE_CACHE)
    mount = daemon([server.url], index_refresh="off", allow_other=True)
    path = control.runtime_dir() / control.socket_name(str(mount.root))
    assert path.stat().st_mode & 0o777 == 0o666  # a shared mount: anyone may ask

    def as_nobody(command: str) -> dict:
        result = subprocess.run(["/usr/bin/python3", "-c", ASK_AS, str(path), command],
                                capture_output=True, text=True, timeout=120, user=65534,
                                group=65534)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert as_nobody("status")["pid"] == mount.process.pid
    assert "only root or the user who mounted it" in as_nobody("refresh")["error"]


# ---- HTTPS mirrors with a site's own CA -------------------------------------------------------


def make_ca_and_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signs for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, request = directory / "server.key", directory / "server.csr"
    cert = directory / "server.pem"
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
            str(ca), "-days", "2", "-subj", "/CN=lazymount test site CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request),
            "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions))
    return ca, cert, key


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The fixture cache over HTTPS on loopback, with a certificate of a private CA:
    (url, the CA's certificate file)."""
    ca, cert, key = make_ca_and_certificate(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(FIXTURE_CACHE))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    # each request's thread makes the handshake: a client that stalls in it stops only itself
    server.socket = context.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca
    server.shutdown()
    server.server_close()


def test_https_mirror_with_a_private_ca(https_server, daemon, tmp_path):
    url, ca = https_server
    mount = daemon([url], ca_certs=str(ca), index_refresh="off")
    assert "Hello from lmgreet" in run(mount.root / "linux-x86_64" / LMHELLO / "bin" /
                                       "hello").stdout


def test_https_mirror_without_its_ca_names_the_certificate_problem(https_server, tmp_path):
    url, ca = https_server
    root = short_dir()
    config = write_config(tmp_path / "config.toml", root, mirrors=[url],
                          trust_keys=[str(FIXTURE_KEY)], store=str(tmp_path / "store"),
                          keyring=str(tmp_path / "no-keys"), timeout="5s")
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    command = lazymount_command("--config", str(config), str(root))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 1
        assert "certificate verify failed" in result.stderr
        assert "ca_certs" in result.stderr and url in result.stderr
        assert not os.path.ismount(root)
        # SSL_CERT_FILE, which other tools honour, works too
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                env={**env, "SSL_CERT_FILE": str(ca)})
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(root)
    finally:
        unmount(root)
    if not os.path.ismount(root):
        shutil.rmtree(root, ignore_errors=True)


def test_an_unusable_ca_bundle_fails_the_mount_naming_it(https_server, tmp_path):
    """The CA bundle is loaded in a worker thread before the first request: a bundle
    OpenSSL cannot read still fails the mount with its name."""
    url, _ = https_server
    root = short_dir()
    bundle = tmp_path / "not-a-ca.pem"
    bundle.write_text("not a certificate\n")
    config = write_config(tmp_path / "config.toml", root, mirrors=[url], ca_certs=str(bundle),
                          trust_keys=[str(FIXTURE_KEY)], store=str(tmp_path / "store"),
                          keyring=str(tmp_path / "no-keys"), timeout="5s")
    try:
        result = subprocess.run(lazymount_command("--config", str(config), str(root)),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert f"cannot use the CA bundle {bundle}" in result.stderr
        assert "Traceback" not in (tmp_path / "store" / "lazymount.log").read_text()
        assert not os.path.ismount(root)
    finally:
        unmount(root)
    if not os.path.ismount(root):
        shutil.rmtree(root, ignore_errors=True)


def test_real_spack_sees_what_a_refresh_added(spack, http_server, daemon, tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    mount = daemon([http_server(cache).url], index_refresh="off")
    spack.upstream("lazymount", mount.root)

    def found() -> str:
        return spack("find", "--format", "{name}-{version}-{hash}").stdout

    assert LMGREET in found() and LMHELLO not in found()
    served_cache(cache, {"lmgreet", "lmhello"})
    assert mount.lazymount("refresh", str(mount.root)).returncode == 0
    assert LMHELLO in found()


def test_keys_of_an_https_mirror_with_a_private_ca(https_server, tmp_path):
    url, ca = https_server
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    command = lazymount_command("keys", "list", url, f"--keyring={tmp_path / 'keys'}")
    listed = subprocess.run([*command, f"--ca-certs={ca}"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "1556299A23063ADC6D944541DF5162CFF05DB8B3" in listed.stdout
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "certificate verify failed" in refused.stderr
