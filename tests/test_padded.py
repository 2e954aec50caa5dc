"""Caches built with ``padded_length``, and scripts whose shebangs need Spack's ``sbang``.

A padded build root (``/tmp/lmp/opt/spack/__spack_path_placeholder__/...``, 128 characters)
is relocated to a short mount path: RPATHs shrink in place, C strings get leading-'/' padding,
and scripts, whose long shebangs the build already rewrote to ``#!/bin/sh <unpadded
root>/bin/sbang``, get that sbang path rewritten to ``<mount>/bin/sbang``. A script whose
shebang only grows past 127 bytes when relocated gets the sbang line from lazymount, as
Spack's post-install hook would add it. Both kinds run through the mount.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import spackcache as sc

PADDED_ROOT = "/tmp/lmp/opt/spack"
PADDED_LENGTH = 128
SHORT_ROOT = "/b"  # a short build root: relocated shebangs grow
INTERP = "interp-" + "x" * 48  # a long interpreter name (55 characters)


@dataclass
class PaddedCache:
    root: Path
    writer: sc.CacheWriter
    lib: sc.Package
    app: sc.Package


@pytest.fixture(scope="module")
def padded(tmp_path_factory, signer) -> PaddedCache:
    """plib (C library) and papp (C program linked to it + a script with a long shebang)."""
    writer = sc.CacheWriter(tmp_path_factory.mktemp("padded") / "cache", PADDED_ROOT, signer,
                            padded_length=PADDED_LENGTH)
    lib = writer.build_c_package("plib", message="Hello from a padded library")
    app = writer.build_c_package("papp", deps=[lib])
    prefix = writer.prefix_of(app)
    app.files["bin/sh-link"] = sc.Symlink("/bin/sh")
    app.files["bin/papp-script"] = (f"#!{prefix}/bin/sh-link\n"
                                    f'echo "script: $0"\nexec {prefix}/bin/papp "$@"\n')
    writer.add(lib)
    writer.add(app)
    writer.finish()
    return PaddedCache(writer.root, writer, lib, app)


def tar_member(cache: PaddedCache, pkg: sc.Package, rel: str) -> bytes:
    gz = cache.writer.blob_path(cache.writer.entries[pkg.dag_hash].tarball["checksum"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(gz.read_bytes()))) as tar:
        member = tar.extractfile(f"{cache.writer.prefix_of(pkg).lstrip('/')}/{rel}")
        assert member is not None
        return member.read()


def prefix_in(mount, pkg: sc.Package) -> Path:
    return mount.root / "linux-x86_64" / f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60)


def test_padded_cache_is_what_spack_builds(padded):
    root = padded.writer.build_root
    assert len(root) == PADDED_LENGTH and root.startswith(PADDED_ROOT + "/__spack_path_pl")
    script = tar_member(padded, padded.app, "bin/papp-script")
    first, second, _ = script.split(b"\n", 2)
    # the build's sbang hook: sbang at the *unpadded* root, the long line kept as line 2
    assert first == f"#!/bin/sh {PADDED_ROOT}/bin/sbang".encode()
    assert second == f"#!{padded.writer.prefix_of(padded.app)}/bin/sh-link".encode()
    assert len(second) + 1 > 127


def test_padded_cache_relocates_to_a_short_mount_and_runs(padded, http_server, mount_cache):
    mount = mount_cache([http_server(padded.root).url])
    app, lib = prefix_in(mount, padded.app), prefix_in(mount, padded.lib)
    result = run(app / "bin" / "papp")
    assert result.returncode == 0, result.stderr
    hello, prefix_line, data_line, dep_line = result.stdout.splitlines()
    assert hello == "Hello from papp"
    # the 128-character padded prefix became the short one, padded with leading '/'
    own = prefix_line.removeprefix("prefix: ")
    assert own.lstrip("/") == str(app).lstrip("/")
    assert len(own) == len(padded.writer.prefix_of(padded.app))
    assert data_line.endswith(f"{app}/share/papp/data.txt")
    assert dep_line.removeprefix("dep plib: ").lstrip("/") == str(lib).lstrip("/")
    assert "__spack_path_placeholder__" not in result.stdout
    assert (lib / "share" / "plib" / "data.txt").read_text() == f"{lib}/share/plib/data.txt\n"


def test_prebuilt_sbang_line_is_relocated_and_runs(padded, mount_cache):
    mount = mount_cache([str(padded.root)])
    app = prefix_in(mount, padded.app)
    script = app / "bin" / "papp-script"
    first, second, _ = script.read_text().split("\n", 2)
    assert first == f"#!/bin/sh {mount.root}/bin/sbang"
    assert second == f"#!{app}/bin/sh-link"
    result = run(script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"script: {script}"
    assert lines[1] == "Hello from papp"
    assert os.access(mount.root / "bin" / "sbang", os.X_OK)


def test_shebang_that_grows_past_127_bytes_gets_sbang_from_the_mount(tmp_path, signer,
                                                                    mount_cache):
    writer = sc.CacheWriter(tmp_path / "cache", SHORT_ROOT, signer)
    pkg = sc.Package("grows")
    prefix = writer.prefix_of(pkg)
    shebang = f"#!{prefix}/bin/{INTERP}\n"
    pkg.files[f"bin/{INTERP}"] = sc.Symlink("/bin/sh")
    pkg.files["bin/tool"] = shebang + 'echo "tool: $0"\n'
    writer.add(pkg)
    writer.finish()
    mount = mount_cache([str(writer.root)])
    relocated = f"#!{prefix_in(mount, pkg)}/bin/{INTERP}\n"
    assert len(shebang) <= 127 < len(relocated)  # short when built, too long when mounted
    tool = prefix_in(mount, pkg) / "bin" / "tool"
    assert tool.read_text() == f"#!/bin/sh {mount.root}/bin/sbang\n{relocated}echo \"tool: $0\"\n"
    result = run(tool)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tool: {tool}\n"
