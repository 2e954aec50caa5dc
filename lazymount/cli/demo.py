"""``lazymount demo``: the whole product in one command, on an embedded build cache.

Serves a small signed cache made by Spack (lmhello, which links lmgreet) over loopback HTTP,
mounts it at a short path, runs the relocated ``hello -v`` through the mount cold and warm,
remounts on the same store, and unmounts, printing what each step took.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

PACKAGE = "linux-x86_64/lmhello-1.0-3vgakfze5q7cw5gke5wbrfotzhh2tstq"
BUILD_ROOT_LENGTH = 17  # /tmp/lm/opt/spack: the demo cache is not padded


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _timed(label: str, command: list[str]) -> str:
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"demo: {label} failed ({result.returncode}):\n{result.stdout}"
                         f"{result.stderr}")
    print(f"  {label:<38} {elapsed * 1000:8.1f} ms")
    return result.stdout


def _mount(url: str, key: Path, store: Path, root: Path, label: str) -> None:
    command = [sys.executable, "-m", "lazymount", "--mirror", url, "--trust-key", str(key),
               "--store", str(store), str(root)]
    _timed(label, command)


def _unmount(root: Path) -> None:
    _timed("unmount", [sys.executable, "-m", "lazymount", "umount", str(root)])
    deadline = time.monotonic() + 10
    while os.path.ismount(root) and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lazymount demo",
        description="Serve the embedded demo build cache on loopback, mount it at a short "
                    "path, run a relocated binary through the mount, and unmount.")
    parser.parse_args(argv)
    data = resources.files("lazymount").joinpath("data")
    work = Path(tempfile.mkdtemp(prefix="lazymount-demo-"))
    work.chmod(0o755)  # started as root, the daemon runs as the lazymount account
    root = Path(tempfile.mkdtemp(prefix="lmd", dir="/tmp"))  # short: fits the build root
    assert len(str(root)) <= BUILD_ROOT_LENGTH
    with resources.as_file(data.joinpath("demo-mirror")) as mirror, \
            resources.as_file(data.joinpath("demo-key.pub.asc")) as key:
        server, url = _serve(Path(mirror))
        store = work / "store"
        hello = root / PACKAGE / "bin" / "hello"
        try:
            print(f"demo: serving the demo cache at {url}, mounting at {root}")
            _mount(url, Path(key), store, root, "mount (index fetched, tree shown)")
            listing = sorted(os.listdir(root / "linux-x86_64"))
            print("  packages: " + ", ".join(listing))
            out = _timed("first run of hello -v (cold store)", [str(hello), "-v"])
            _timed("second run of hello -v (warm)", [str(hello), "-v"])
            _unmount(root)
            _mount(url, Path(key), store, root, "remount (stored catalog, tree shown)")
            _timed("hello -v after remount (warm store)", [str(hello), "-v"])
            print("demo: output of the relocated binary:")
            print("    " + out.strip().replace("\n", "\n    "))
        finally:
            if os.path.ismount(root):
                subprocess.run(["fusermount3", "-u", "-z", str(root)], check=False)
            server.shutdown()
            shutil.rmtree(work, ignore_errors=True)
            if not os.path.ismount(root):
                os.rmdir(root)
    print("demo: done")
    return 0
