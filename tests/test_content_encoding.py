"""Bodies a mirror sends compressed in transit (``Content-Encoding``), through real mounts.

lazymount asks for ``identity`` and refuses any other encoding: Spack's blobs are compressed
already, and a stacked ``gzip, gzip`` or a ``zstd`` body of a few KiB would inflate to
gigabytes in one decoding step, before any size limit could look at it. A mirror (or a proxy,
or anyone on the path of plain HTTP) that sends one fails the one document it was asked for:
the daemon stays small, keeps serving the rest, and asks the next mirror.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    LMGREET,
    LMHELLO,
    lazymount_command,
    short_dir,
    touch,
)
from hostile import RSS_LIMIT_KIB, Fault, bomb, log_lines, peak_rss_kib

pytestmark = pytest.mark.e2e  # these tests start daemons

HELLO = "Hello from lmgreet, world!"
INDEX = "/v3/manifests/index/index.manifest.json"
TARGETS = {
    "spec manifest": f"/v3/manifests/spec/lmhello/{LMHELLO}.spec.manifest.json",
    "tarball": "/blobs/sha256/ff/ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f",
}
ENCODINGS = ("gzip, gzip", "zstd")
LABEL = LMHELLO[:len("lmhello-1.0-") + 7]  # how the daemon names lmhello in its log


def encoded(encoding: str) -> Fault:
    return Fault("encoded", encoding=encoding, body=bomb(encoding))


def hello(mount) -> str:
    result = subprocess.run([str(mount.prefix() / "bin" / "hello"), "-v"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def expect_small(mount) -> None:
    """The daemon's peak resident memory (VmHWM) stayed under RSS_LIMIT_KIB."""
    peak = peak_rss_kib(mount.process.pid)
    assert peak < RSS_LIMIT_KIB, f"the daemon grew to {peak >> 10} MiB"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_an_encoded_index_is_refused_and_the_next_mirror_mounts(servers, mount_cache,
                                                                tmp_path, encoding):
    bad, good = servers(FIXTURE_CACHE), servers(FIXTURE_CACHE)
    bad.faults[INDEX] = encoded(encoding)
    mount = mount_cache([bad.url, good.url])
    expect_small(mount)
    skipped = [line for line in mount.log_text().splitlines() if "skipping mirror" in line]
    assert len(skipped) == 1 and bad.url in skipped[0], mount.log_text()
    assert f"Content-Encoding {encoding}" in skipped[0], skipped[0]
    assert HELLO in hello(mount)
    assert good.requests[TARGETS["tarball"]] == 1 and bad.requests[TARGETS["tarball"]] == 0

    # alone, the mirror fails the mount with the reason, not the daemon with its memory
    root = short_dir()
    try:
        result = subprocess.run(
            lazymount_command(f"--mirror={bad.url}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={tmp_path / 'alone'}", f"--keyring={tmp_path / 'none'}",
                              f"--config={tmp_path / 'empty-config.toml'}", "--foreground",
                              str(root)),
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and not os.path.ismount(root)
        assert f"Content-Encoding {encoding}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        os.rmdir(root)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_an_encoded_package_fails_alone_and_the_next_mirror_serves_it(servers, mount_cache,
                                                                      tmp_path, encoding,
                                                                      target):
    bad, good = servers(FIXTURE_CACHE), servers(FIXTURE_CACHE)
    bad.faults[TARGETS[target]] = encoded(encoding)

    alone = mount_cache([bad.url])
    assert touch(alone.prefix()) == errno.EIO
    expect_small(alone)
    lines = [line for line in log_lines(alone, LABEL) if "Content-Encoding" in line]
    assert len(lines) == 1 and f"refusing Content-Encoding {encoding}" in lines[0], \
        alone.log_text()
    assert bad.requests[TARGETS[target]] == 1  # a refusal is not retried
    assert os.listdir(alone.prefix(LMGREET))  # the rest of the mount is served
    assert HELLO not in alone.log_text()

    both = mount_cache([bad.url, good.url], store=tmp_path / "second")
    assert HELLO in hello(both)
    assert any("trying the next mirror" in line for line in log_lines(both, LABEL))
    assert good.requests[TARGETS[target]] == 1
    expect_small(both)
