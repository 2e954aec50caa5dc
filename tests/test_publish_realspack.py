"""``lazymount publish`` over a cache the real Spack built and pushed: executables
and a library with an RPATH, a hard link, a symlink, a script and text naming the prefix. Every
file reads back from the published spans and windows, and the sizes the TOC predicts are the
ones relocation gives."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

from conftest import DATA, FIXTURE_KEY, lazymount_command

from lazymount.buildcache.published import blob_path, toc_path
from lazymount.buildcache.toc import parse_toc, points_for, relocated_size
from lazymount.install import relocate, sbang
from lazymount.install.buildinfo import parse_buildinfo
from lazymount.install.extract import extract_tarball
from lazymount.install.tocread import read_member
from lazymount.trust.verify import Verifier, read_key_file

REPO = DATA / "toc-spack" / "repo" / "spack_repo" / "lmtoc"
SITE_KEY = DATA / "keys" / "other.secret.asc"
SITE_PUBLIC = DATA / "keys" / "other.pub.asc"


def test_a_cache_the_real_spack_pushed_is_described(spack, signer, tmp_path: Path):
    spack.add_repo(REPO)
    spack("install", "lmtocbig")
    mirror = tmp_path / "mirror"
    spack("buildcache", "push", "--unsigned", "--update-index", str(mirror), "lmtocbig")
    # signed as `spack buildcache push --key` signs (a clearsigned manifest): Spack's own gpg
    # needs bootstrapping, which the test tier turns off
    (manifest,) = mirror.rglob("*.spec.manifest.json")
    manifest.write_bytes(signer.clearsign(manifest.read_bytes()))
    output = tmp_path / "site"
    result = subprocess.run(
        lazymount_command("publish", str(mirror), "--signing-key", str(SITE_KEY),
                          "--trust-key", str(FIXTURE_KEY), "--output", str(output),
                          "--min-size", "1M"),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tables of contents: 1 written" in result.stdout

    (signed,) = (output / "lazymount/v1/toc").iterdir()
    verifier = Verifier([read_key_file(SITE_PUBLIC)])
    try:
        toc = parse_toc(verifier.verify(signed.read_bytes(), "toc"), "toc")
    finally:
        verifier.close()
    (tarball_path,) = (p for p in mirror.rglob("*") if p.is_file()
                       and hashlib.sha256(p.read_bytes()).hexdigest() == toc.tarball_sha256)
    assert signed.name == Path(toc_path(toc.tarball_sha256)).name
    tarball = tarball_path.read_bytes()
    assert len(toc.points) >= 4

    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore
                    if m.isreg()}
        kinds = {m.name: m.type for m in tar.getmembers()}
    assert [m.path for m in toc.members] == list(kinds)
    by_path = {m.path: m for m in toc.members}
    assert by_path[f"{toc.prefix}/bin/lmtoc-again"].kind == "hardlink"
    assert by_path[f"{toc.prefix}/lib/liblmtoc.so.1"].kind == "symlink"
    for member in toc.members:
        if member.kind != "file":
            continue
        point, last = points_for(toc, member)
        window = (output / blob_path(point.window)).read_bytes() if point.window else b""
        got = read_member(toc, member, tarball[point.compressed:last + 1], window)
        assert got == contents[member.path], member.path

    staging = tmp_path / "staging"
    staging.mkdir()
    extracted = extract_tarball(io.BytesIO(tarball), "gzip", staging, what="lmtocbig")
    info = parse_buildinfo(toc.buildinfo.encode(), "toc")
    assert info == extracted.buildinfo
    assert "bin/lmtoc" in info.relocate_binaries and info.relocate_textfiles
    mapping = relocate.prefix_map(info, "/m/r", lambda h: f"/m/r/{h[:7]}", "/m/sbang")
    relocate.relocate_prefix(extracted.root, info, mapping, "lmtocbig")
    sbang.add_sbang(extracted.root, "/m/sbang", "lmtocbig", extracted.scripts)
    inside = len(toc.prefix) + 1
    shrunk = 0
    for member in toc.members:
        if member.kind in ("file", "hardlink") and member.path.startswith(toc.prefix + "/"):
            target = by_path[member.link] if member.kind == "hardlink" else member
            size = (extracted.root / member.path[inside:]).stat().st_size
            assert relocated_size(toc, target, mapping, "/m/sbang") == size, member.path
            shrunk += size < target.size
    assert shrunk > 200  # the headers, paths.txt, the script
