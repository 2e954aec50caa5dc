"""The test cache writer against the real Spack 1.1 cache in tests/data/v3-own-only.

lmgreet and lmhello are rebuilt from the real tarball contents and spec nodes with the same
build root; every blob, manifest (signatures included, with the real signature time) and
metadata file must come out byte-identical. Further tests cover what the real cache does not
exercise (hardlinks, padding, externals, compiled packages, attack hooks).

Byte identity of gzip streams relies on zlib's deflate (checked with zlib 1.2.13), and of
signatures on gpg emitting the same packet (checked with GnuPG 2.2.40; RSA signing is
deterministic once the time is fixed with --faked-system-time).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import spackcache as sc
import yaml
from conftest import FIXTURE_CACHE, FIXTURE_KEY, FIXTURE_SECRET_KEY

REAL = FIXTURE_CACHE
SECRET_KEY = FIXTURE_SECRET_KEY
PUBLIC_KEY = FIXTURE_KEY
FPR = "1556299A23063ADC6D944541DF5162CFF05DB8B3"
BUILD_ROOT = "/tmp/lm/opt/spack"
HASHES = {
    "lmhello": "3vgakfze5q7cw5gke5wbrfotzhh2tstq",
    "lmgreet": "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml",
}

needs_gpg = pytest.mark.skipif(
    not (shutil.which("gpg") and shutil.which("gpgconf")), reason="gpg not installed"
)
needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")


# ---------------------------------------------------------------------------------------------
# Reading the real cache
# ---------------------------------------------------------------------------------------------


def real_blob(checksum: str) -> bytes:
    return (REAL / sc.blob_relpath(checksum)).read_bytes()


def clearsigned_body(text: bytes) -> bytes:
    """The signed JSON between the armor headers (Spack's CLEARSIGN_FILE_REGEX)."""
    return text.split(b"Hash: SHA512\n\n", 1)[1].split(b"\n-----BEGIN PGP SIGNATURE", 1)[0]


def tar_members(gz: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Members of a gzip'd tarball with the contents of regular files."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(gz))) as tar:
        return [
            (m, tar.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
            for m in tar.getmembers()
        ]


@dataclass
class RealPackage:
    """One package of the real cache: its manifest, records, nodes and tarball."""

    name: str
    manifest: bytes
    tarball: dict
    spec: dict
    nodes: list[dict]


def read_real(name: str) -> RealPackage:
    path = REAL / f"v3/manifests/spec/{name}/{name}-1.0-{HASHES[name]}.spec.manifest.json"
    manifest = path.read_bytes()
    tar_rec, spec_rec = json.loads(clearsigned_body(manifest))["data"]
    nodes = json.loads(gzip.decompress(real_blob(spec_rec["checksum"])))["spec"]["nodes"]
    return RealPackage(name, manifest, tar_rec, spec_rec, nodes)


def files_from_tarball(gz: bytes, prefix: str) -> tuple[dict[str, sc.FileValue], set[str]]:
    """The prefix contents of a real tarball as a Package files dict + executable set."""
    base = prefix.lstrip("/") + "/"
    files: dict[str, sc.FileValue] = {}
    execs: set[str] = set()
    for m, data in tar_members(gz):
        rel = m.name[len(base) :]
        if not m.name.startswith(base) or rel == ".spack/binary_distribution":
            continue
        if m.issym():
            files[rel] = sc.Symlink(m.linkname)
        elif m.isreg():
            files[rel] = data  # type: ignore[assignment]
            if m.mode & 0o100:
                execs.add(rel)
    return files, execs


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> dict[str, RealPackage]:
    return {name: read_real(name) for name in ("lmgreet", "lmhello")}


@dataclass
class Rebuilt:
    writer: sc.CacheWriter
    pkgs: dict[str, sc.Package]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, signer, real) -> Rebuilt:
    """lmgreet then lmhello pushed again from the real contents, signed at the real time."""
    nodes = {n["hash"]: n for r in real.values() for n in r.nodes}
    by_name = {p.name: p for p in sc.packages_from_nodes(list(nodes.values())).values()}
    writer = sc.CacheWriter(tmp_path_factory.mktemp("rebuilt"), BUILD_ROOT, signer)
    pkgs = {}
    for name in ("lmgreet", "lmhello"):
        pkg = by_name[name]
        gz = real_blob(real[name].tarball["checksum"])
        pkg.files, pkg.executable = files_from_tarball(gz, writer.prefix_of(pkg))
        when = sc.verify_clearsigned(real[name].manifest, PUBLIC_KEY.read_bytes()).timestamp
        writer.add(pkg, sign_time=when)
        pkgs[name] = pkg
    writer.finish()
    return Rebuilt(writer, pkgs)


# ---------------------------------------------------------------------------------------------
# DAG hashes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lmhello", "lmgreet"])
def test_dag_hash_recomputed_from_real_spec_blob(real, name):
    root = real[name].nodes[0]
    assert root["name"] == name
    node = {k: v for k, v in root.items() if k != "hash"}
    assert sc.b32_hash(sc.compact_json(node)) == HASHES[name]


def test_only_external_hashes_are_not_reproducible(real):
    nodes = {n["hash"]: n for r in real.values() for n in r.nodes}
    pkgs = sc.packages_from_nodes(list(nodes.values()))
    for h, pkg in pkgs.items():
        assert pkg.dag_hash == h
        assert (pkg.hash_override is not None) == pkg.is_external
        assert pkg.node() == nodes[h]  # key order included
    recomputed = {
        p.name: sc.b32_hash(sc.compact_json(p.node_without_hash())) for p in pkgs.values()
    }
    assert recomputed["gcc"] != nodes_by_name(nodes)["gcc"]["hash"]  # Spack quirk, documented


def nodes_by_name(nodes: dict[str, dict]) -> dict[str, dict]:
    return {n["name"]: n for n in nodes.values()}


# ---------------------------------------------------------------------------------------------
# Field-by-field and byte-by-byte comparison with the real cache
# ---------------------------------------------------------------------------------------------

TAR_FIELDS = ("name", "type", "mode", "uid", "gid", "uname", "gname", "mtime", "size")


@pytest.mark.parametrize("name", ["lmgreet", "lmhello"])
def test_tarball_members_field_by_field(rebuilt, real, name):
    ours = tar_members(
        rebuilt.writer.blob_path(entry(rebuilt, name).tarball["checksum"]).read_bytes()
    )
    theirs = tar_members(real_blob(real[name].tarball["checksum"]))
    assert [m.name for m, _ in ours] == [m.name for m, _ in theirs]
    for (a, da), (b, db) in zip(ours, theirs, strict=True):
        for f in (*TAR_FIELDS, "linkname", "pax_headers"):
            assert getattr(a, f) == getattr(b, f), (a.name, f)
        assert da == db, a.name
    assert ours[-1][0].name.endswith("/.spack/binary_distribution")


@pytest.mark.parametrize("name", ["lmgreet", "lmhello"])
def test_tarball_bytes_identical(rebuilt, real, name):
    ours = rebuilt.writer.blob_path(entry(rebuilt, name).tarball["checksum"]).read_bytes()
    theirs = real_blob(real[name].tarball["checksum"])
    assert gzip.decompress(ours) == gzip.decompress(theirs)  # the tar stream
    assert ours == theirs  # and the gzip stream (level 6, mtime 0, no name)
    assert entry(rebuilt, name).tarball == real[name].tarball


@pytest.mark.parametrize("name", ["lmgreet", "lmhello"])
def test_binary_distribution_identical(rebuilt, real, name):
    theirs = next(
        d
        for m, d in tar_members(real_blob(real[name].tarball["checksum"]))
        if m.name.endswith(".spack/binary_distribution")
    )
    assert entry(rebuilt, name).buildinfo == theirs
    assert list(yaml.safe_load(theirs)) == [
        "sbang_install_path",
        "buildpath",
        "spackprefix",
        "relative_prefix",
        "hardlinks_deduped",
        "hash_to_prefix",
        "relocate_binaries",
        "relocate_links",
        "relocate_textfiles",
    ]


@pytest.mark.parametrize("name", ["lmgreet", "lmhello"])
def test_spec_blob_identical(rebuilt, real, name):
    ours = rebuilt.writer.blob_path(entry(rebuilt, name).spec["checksum"]).read_bytes()
    theirs = real_blob(real[name].spec["checksum"])
    assert gzip.decompress(ours) == gzip.decompress(theirs)
    assert ours == theirs
    # Spack's TextIOWrapper flushes the GzipFile once: a plain gzip stream is not identical.
    assert sc.gzip_bytes(gzip.decompress(theirs)) != theirs


@pytest.mark.parametrize("name", ["lmgreet", "lmhello"])
def test_prefix_spec_json_is_spec_blob_without_layout_version(rebuilt, real, name):
    spec_json = next(
        d
        for m, d in tar_members(real_blob(real[name].tarball["checksum"]))
        if m.name.endswith(".spack/spec.json")
    )
    assert spec_json == sc.compact_json(rebuilt.pkgs[name].spec_dict()).encode()


@pytest.mark.parametrize("name", ["lmgreet", "lmhello"])
def test_manifest_identical(rebuilt, real, name):
    ours = entry(rebuilt, name).manifest.read_bytes()
    records = [entry(rebuilt, name).tarball, entry(rebuilt, name).spec]
    verified = sc.verify_clearsigned(real[name].manifest, PUBLIC_KEY.read_bytes())
    assert verified.fingerprint == FPR
    assert verified.plaintext == sc.manifest_text(records) + b"\n"  # gpg adds the newline
    assert clearsigned_body(real[name].manifest) == sc.manifest_text(records)
    assert ours == real[name].manifest  # signature too: same key, same faked time


def test_index_identical(rebuilt):
    rec = json.loads((rebuilt.writer.root / "v3/manifests/index/index.manifest.json").read_bytes())
    real_manifest = (REAL / "v3/manifests/index/index.manifest.json").read_bytes()
    assert rec == json.loads(real_manifest)
    theirs = real_blob(rec["data"][0]["checksum"])
    assert sc.index_bytes(rebuilt.writer.index_records()) == theirs
    assert sc.index_bytes(json.loads(theirs)["database"]["installs"]) == theirs


def test_index_records_field_by_field(rebuilt):
    rec = json.loads((REAL / "v3/manifests/index/index.manifest.json").read_bytes())
    theirs = json.loads(real_blob(rec["data"][0]["checksum"]))
    ours = rebuilt.writer.index_records()
    assert list(ours) == list(theirs["database"]["installs"])
    for h, rec in theirs["database"]["installs"].items():
        assert ours[h] == rec


@pytest.mark.parametrize(
    "relpath",
    [
        "v3/layout.json",
        "v3/manifests/index/index.manifest.json",
        "v3/manifests/key/keys.manifest.json",
        f"v3/manifests/key/{FPR}.key.manifest.json",
    ],
)
def test_metadata_files_identical(rebuilt, relpath):
    assert (rebuilt.writer.root / relpath).read_bytes() == (REAL / relpath).read_bytes()


def test_key_blobs_identical(rebuilt):
    key_index = json.loads((REAL / "v3/manifests/key/keys.manifest.json").read_bytes())
    blob = real_blob(key_index["data"][0]["checksum"])
    assert blob == b'{"keys":{"%s":{}}}' % FPR.encode()
    key_rec = json.loads((REAL / f"v3/manifests/key/{FPR}.key.manifest.json").read_bytes())
    assert real_blob(key_rec["data"][0]["checksum"]) == PUBLIC_KEY.read_bytes()


def test_whole_cache_identical(rebuilt):
    assert tree_bytes(rebuilt.writer.root) == tree_bytes(REAL)


def entry(rebuilt: Rebuilt, name: str) -> sc.Entry:
    return rebuilt.writer.entries[rebuilt.pkgs[name].dag_hash]


# ---------------------------------------------------------------------------------------------
# Fresh caches
# ---------------------------------------------------------------------------------------------


def small_dag() -> dict[str, sc.Package]:
    """app -> lib (link) -> base (link); app -> tool (run); compiler build-only; external."""
    libc = sc.external("glibc", "2.36", "/usr")
    wrapper = sc.Package("compiler-wrapper")
    base = sc.Package("base", files={"share/base/x.txt": b"x\n"}, deps=[(libc, ["link"])])
    lib = sc.Package("lib", deps=[(base, ["build", "link"]), (wrapper, ["build"])])
    tool = sc.Package("tool", files={"bin/tool": b"#!/bin/sh\n"})
    app = sc.Package("app", deps=[lib, (tool, ["run"]), (wrapper, ["build"])])
    return {p.name: p for p in (libc, wrapper, base, lib, tool, app)}


@needs_gpg
def test_fresh_signed_cache_verifies_with_public_key_only(tmp_path, signer):
    dag = small_dag()
    w = sc.CacheWriter(tmp_path, signer=signer)
    for name in ("base", "lib", "tool", "app"):
        w.add(dag[name])
    w.finish()
    public = (tmp_path / sc.blob_relpath(key_blob_checksum(tmp_path))).read_bytes()
    assert public == signer.public_key_armor == PUBLIC_KEY.read_bytes()
    for e in w.entries.values():
        gpg_verify(e.manifest, public, tmp_path / "gnupg")
        v = sc.verify_clearsigned(e.manifest.read_bytes(), public)
        assert json.loads(v.plaintext)["data"] == [e.tarball, e.spec]


def key_blob_checksum(root: Path) -> str:
    return json.loads((root / f"v3/manifests/key/{FPR}.key.manifest.json").read_bytes())["data"][0][
        "checksum"
    ]


def gpg_verify(path: Path, public_key: bytes, home: Path) -> None:
    """Plain ``gpg --verify`` in a keyring holding only ``public_key``."""
    home.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "GNUPGHOME": str(home)}
    gpg = ["gpg", "--batch", "--no-autostart"]
    subprocess.run([*gpg, "--import"], input=public_key, env=env, check=True, capture_output=True)
    subprocess.run([*gpg, "--verify", str(path)], env=env, check=True, capture_output=True)


@needs_gpg
def test_other_key_and_unsigned_manifest_hooks(tmp_path, signer):
    dag = small_dag()
    w = sc.CacheWriter(tmp_path, signer=signer)
    with sc.Signer.generate() as other:
        w.add(dag["base"], sign=other)
        w.add(dag["tool"], sign=False)
        w.finish()
        assert other.fingerprint != FPR
        assert not (tmp_path / f"v3/manifests/key/{other.fingerprint}.key.manifest.json").exists()
    bad = w.manifest_path(dag["base"]).read_bytes()
    assert bad.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")
    with pytest.raises(subprocess.CalledProcessError):
        sc.verify_clearsigned(bad, PUBLIC_KEY.read_bytes())
    plain = w.manifest_path(dag["tool"]).read_bytes()
    assert json.loads(plain)["version"] == 3


def test_unsigned_cache_layout(tmp_path):
    dag = small_dag()
    w = sc.CacheWriter(tmp_path)
    w.add(dag["base"])
    w.finish()
    assert not (tmp_path / "v3/manifests/key").exists()
    assert (tmp_path / "v3/layout.json").read_bytes() == b'{"signing": "gpg"}'
    m = json.loads(w.manifest_path(dag["base"]).read_bytes())
    assert [r["mediaType"] for r in m["data"]] == [sc.MEDIA_TARBALL, sc.MEDIA_SPEC]
    for r in m["data"]:
        assert sc.blob_record(w.blob_path(r["checksum"]).read_bytes(), r["mediaType"], "gzip") == r


def test_index_records_ref_counts_and_in_buildcache(tmp_path):
    dag = small_dag()
    w = sc.CacheWriter(tmp_path)
    w.add(dag["lib"])
    w.add(dag["app"])
    recs = w.index_records()
    names = [r["spec"]["name"] for r in recs.values()]
    assert names == ["glibc", "base", "compiler-wrapper", "lib", "tool", "app"]  # post-order
    by_name = {r["spec"]["name"]: r for r in recs.values()}
    assert {n: r["ref_count"] for n, r in by_name.items()} == {
        "compiler-wrapper": 2,
        "glibc": 1,
        "base": 1,
        "lib": 1,
        "tool": 1,
        "app": 0,
    }
    assert {n for n, r in by_name.items() if r["in_buildcache"]} == {"lib", "app"}
    assert by_name["glibc"]["spec"]["external"]["path"] == "/usr"


def test_hash_to_prefix_is_link_closure_plus_direct_run(tmp_path):
    dag = small_dag()
    w = sc.CacheWriter(tmp_path)
    w.add(dag["app"])
    info = yaml.safe_load(w.entries[dag["app"].dag_hash].buildinfo)
    assert list(info["hash_to_prefix"]) == [dag[n].dag_hash for n in ("app", "lib", "base", "tool")]
    assert info["hash_to_prefix"][dag["base"].dag_hash] == w.prefix_of(dag["base"])
    assert info["relative_prefix"] == sc.projection(dag["app"])
    assert info["sbang_install_path"] == "/tmp/lmt/opt/spack/bin/sbang"


def test_files_links_modes_and_relocation_lists(tmp_path):
    w = sc.CacheWriter(tmp_path)
    pkg = sc.Package("demo")
    prefix = w.prefix_of(pkg)
    pkg.files = {
        "bin/run": f"#!/bin/sh\nexec {prefix}/bin/real\n",
        "bin/real": b"\x7fELF\x02\x01\x01" + b"\0" * 57,
        "bin/same": sc.Hardlink("bin/real"),
        "share/abs": sc.Symlink(f"{prefix}/share/data"),
        "share/rel": sc.Symlink("data"),
        "share/out": sc.Symlink("/etc/passwd"),
        "share/data": b"no prefix here\n",
        "share/latin1": f"caf\xe9 {w.build_root}/x\n".encode("latin-1"),
        "share/other": f"/x{prefix}/not-at-a-boundary\n",
        "share/empty": sc.Dir(),
        ".spack/notes": f"{prefix}\n",
    }
    w.add(pkg)
    e = w.entries[pkg.dag_hash]
    info = yaml.safe_load(e.buildinfo)
    assert info["relocate_binaries"] == ["bin/real"]
    assert info["relocate_textfiles"] == ["bin/run", "share/latin1"]
    assert info["relocate_links"] == ["share/abs"]
    members = {
        m.name[len(prefix) - 1 :]: m
        for m, _ in tar_members(w.blob_path(e.tarball["checksum"]).read_bytes())
    }
    assert members["/bin/real"].isreg() and members["/bin/real"].mode == 0o755
    assert (
        members["/bin/same"].islnk() and members["/bin/same"].linkname == f"{prefix[1:]}/bin/real"
    )
    assert members["/share/data"].mode == 0o644
    assert members["/share/rel"].issym() and members["/share/rel"].mode == 0o755
    assert members["/share/empty"].isdir()
    assert members["/.spack/spec.json"].size > 0
    names = list(members)
    assert names.index("/.spack/notes") < names.index("/bin")  # .spack sorts first
    assert names.index("/bin/real") < names.index("/bin/run") < names.index("/bin/same")


def test_add_prefix_dir_matches_files_dict(tmp_path):
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "a.so").write_bytes(b"\x7fELF" + b"\0" * 60)
    (src / "lib" / "a.so").chmod(0o755)
    os.link(src / "lib" / "a.so", src / "lib" / "b.so")
    os.symlink("a.so", src / "lib" / "c.so")
    pkg_a = sc.Package("same")
    a = sc.CacheWriter(tmp_path / "a")
    a.add_prefix_dir(pkg_a, src)
    pkg_b = sc.Package(
        "same",
        files={
            "lib/a.so": b"\x7fELF" + b"\0" * 60,
            "lib/b.so": sc.Hardlink("lib/a.so"),
            "lib/c.so": sc.Symlink("a.so"),
        },
    )
    b = sc.CacheWriter(tmp_path / "b")
    b.add(pkg_b)
    assert a.entries[pkg_a.dag_hash].tarball == b.entries[pkg_b.dag_hash].tarball


def test_padded_root_like_spack():
    padded = sc.padded_root("/tmp/lm-padded/opt/spack", 128)
    assert len(padded) == 128
    assert padded == (
        "/tmp/lm-padded/opt/spack/__spack_path_placeholder__/__spack_path_placeholder__/"
        "__spack_path_placeholder__/__spack_path_placehold"
    )
    assert sc.padded_root("/tmp/lm", None) == "/tmp/lm"
    # exact multiples leave a trailing '/' in Spack, which path normalization drops
    assert sc.padded_root("/tmp/lmp/opt/spack", 100).endswith("placeholder__")


def test_padded_writer(tmp_path):
    w = sc.CacheWriter(tmp_path, "/tmp/lmp/opt/spack", padded_length=110)
    pkg = sc.Package("p", files={"bin/x": "#!/bin/sh /tmp/lmp/opt/spack/bin/sbang\n"})
    w.add(pkg)
    info = yaml.safe_load(w.entries[pkg.dag_hash].buildinfo)
    assert len(info["buildpath"]) == 110
    assert info["sbang_install_path"] == "/tmp/lmp/opt/spack/bin/sbang"
    assert info["relocate_textfiles"] == ["bin/x"]
    assert w.prefix_of(pkg).startswith(info["buildpath"] + "/linux-x86_64/p-1.0-")


def test_tamper_blob_and_custom_records(tmp_path):
    w = sc.CacheWriter(tmp_path)
    pkg = sc.Package("t", files={"a": b"payload"})
    w.add(pkg)
    e = w.entries[pkg.dag_hash]
    path = w.tamper_blob(e.tarball["checksum"])
    assert sc.blob_record(path.read_bytes(), sc.MEDIA_TARBALL, "gzip") != e.tarball
    other = sc.Package("other")
    spec_rec = w.write_blob(sc.spec_blob_bytes(other), sc.MEDIA_SPEC, "gzip")
    w.write_spec_manifest(pkg, [e.tarball, spec_rec])
    assert json.loads(w.manifest_path(pkg).read_bytes())["data"][1] == spec_rec
    w.write_index({"bogus": {"spec": {}, "ref_count": 0, "in_buildcache": True}})
    idx = json.loads((tmp_path / "v3/manifests/index/index.manifest.json").read_bytes())
    assert b"bogus" in w.blob_path(idx["data"][0]["checksum"]).read_bytes()


# ---------------------------------------------------------------------------------------------
# Compiled packages
# ---------------------------------------------------------------------------------------------


def rpath(binary: Path) -> str:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if "(RPATH)" in ln or "(RUNPATH)" in ln)
    assert "(RPATH)" in line, "Spack links with DT_RPATH (--disable-new-dtags)"
    return line.split("[", 1)[1].rstrip("]")


def materialize(pkg: sc.Package, prefix: str) -> None:
    sc.stage_files(pkg, Path(prefix))


@needs_gcc
def test_build_c_package_runs_at_its_build_prefix(tmp_path):
    root = str(tmp_path / "root")
    w = sc.CacheWriter(tmp_path / "cache", root)
    base = w.build_c_package("cbase", message="base here")
    app = w.build_c_package("capp", deps=[base])
    for pkg in (base, app):
        materialize(pkg, w.prefix_of(pkg))
    exe = Path(w.prefix_of(app)) / "bin" / "capp"
    assert rpath(exe).split(":") == [f"{w.prefix_of(app)}/lib", f"{w.prefix_of(base)}/lib"]
    out = subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}
    ).stdout.splitlines()
    assert out == [
        "Hello from capp",
        f"prefix: {w.prefix_of(app)}",
        f"data: {w.prefix_of(app)}/share/capp/data.txt",
        f"dep cbase: {w.prefix_of(base)}",
    ]
    w.add(base)
    w.add(app)
    info = yaml.safe_load(w.entries[app.dag_hash].buildinfo)
    assert info["relocate_binaries"] == ["bin/capp", "lib/libcapp.so"]
    assert info["relocate_textfiles"] == ["share/capp/data.txt"]
    assert w.prefix_of(app).encode() in app.files["lib/libcapp.so"]  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------
# Build-time sbang (Spack's post-install hook ran before the push)
# ---------------------------------------------------------------------------------------------


def test_build_time_sbang_rewrites_only_long_executable_shebangs(tmp_path):
    w = sc.CacheWriter(tmp_path, "/tmp/lmp/opt/spack", padded_length=128)
    long_line = f"#!{w.prefix_of(sc.Package('s'))}/bin/python3 -u\n"
    lua_line = "#!" + "/l" * 70 + "/lua\n"
    pkg = sc.Package("s", files={
        "bin/long": long_line + "print(1)\n",
        "bin/lua": lua_line + "print(1)\n",
        "bin/short": "#!/bin/sh\necho hi\n",
        "share/not-executable": long_line,
        "bin/link": sc.Symlink("long"),
    }, executable={"bin/long", "bin/lua", "bin/short"})
    staged = tmp_path / "staged"
    sc.stage_files(pkg, staged)
    changed = sc.filter_shebangs(staged, w.sbang_install_path)
    assert changed == ["bin/long", "bin/lua"]
    sbang = b"#!/bin/sh /tmp/lmp/opt/spack/bin/sbang\n"
    assert (staged / "bin/long").read_bytes() == sbang + long_line.encode() + b"print(1)\n"
    lua = sbang + b"--!" + lua_line[2:].encode() + b"print(1)\n"
    assert (staged / "bin/lua").read_bytes() == lua
    assert (staged / "bin/short").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (staged / "share/not-executable").read_bytes() == long_line.encode()
    assert os.stat(staged / "bin/long").st_mode & 0o777 == 0o755
    assert sc.filter_shebangs(staged, w.sbang_install_path) == []  # idempotent


def test_writer_packs_what_the_build_hook_left(tmp_path):
    long_line = "#!/" + "p" * 140 + "/python\n"
    for build_sbang, expected in ((True, 2), (False, 1)):
        w = sc.CacheWriter(tmp_path / str(build_sbang), build_sbang=build_sbang)
        pkg = sc.Package("hooked", files={"bin/x": long_line + "pass\n"})
        w.add(pkg)
        tarball = w.blob_path(w.entries[pkg.dag_hash].tarball["checksum"]).read_bytes()
        member = dict(tar_members(tarball))
        data = next(d for m, d in member.items() if m.name.endswith("/bin/x"))
        assert data is not None and data.count(b"#!") == expected


# ---------------------------------------------------------------------------------------------
# Layout v2 (Spack 0.23) and migration (spack buildcache migrate)
# ---------------------------------------------------------------------------------------------

V2_ROOT = "/tmp/lm/opt/spack"


def v2_dag() -> tuple[sc.Package, sc.Package, sc.Package]:
    """lmhello -> lmgreet (build, link), lmhello/lmgreet -> gcc-runtime (link): 0.23's DAG."""
    runtime = sc.Package("gcc-runtime", "12.2.0", compiler=sc.DEFAULT_COMPILER,
                         files={"lib/libgcc_s.so.1": b"\x7fELF runtime"})
    greet = sc.Package("lmgreet", deps=[(runtime, ["link"])], compiler=sc.DEFAULT_COMPILER,
                       files={"lib/pkgconfig/greet.pc": f"prefix={V2_ROOT}/x\n"})
    hello = sc.Package("lmhello", deps=[(runtime, ["link"]), greet],
                       compiler=sc.DEFAULT_COMPILER, namespace="lazymount",
                       files={"bin/hello-script": "#!/bin/sh\necho hello\n"})
    return runtime, greet, hello


def test_spec_v4_nodes_as_spack_023_wrote_them():
    runtime, greet, hello = v2_dag()
    node = hello.node()
    assert list(node) == ["name", "version", "arch", "compiler", "namespace", "parameters",
                          "package_hash", "dependencies", "hash"]
    assert node["compiler"] == {"name": "gcc", "version": "12.2.0"}
    assert hello.dag_hash == sc.b32_hash(sc.compact_json(hello.node_without_hash()))
    assert [n["name"] for n in hello.spec_dict()["spec"]["nodes"]] == [
        "lmhello", "gcc-runtime", "lmgreet"]
    assert hello.spec_dict()["spec"]["_meta"] == {"version": 4}
    up = hello.upgraded_node()
    assert list(up) == ["name", "version", "arch", "namespace", "parameters", "package_hash",
                        "dependencies", "annotations", "hash"]
    assert up["annotations"] == {"original_specfile_version": 4, "compiler": "gcc@=12.2.0"}
    assert up["hash"] == hello.dag_hash  # Spack keeps the stored hash of an old spec
    rebuilt = sc.packages_from_nodes(hello.spec_dict()["spec"]["nodes"])
    assert set(rebuilt) == {p.dag_hash for p in (runtime, greet, hello)}


@pytest.fixture
def v2_cache(tmp_path, signer) -> tuple[sc.V2CacheWriter, tuple[sc.Package, ...]]:
    w = sc.V2CacheWriter(tmp_path / "v2", V2_ROOT, signer)
    dag = v2_dag()
    for pkg in dag:
        w.add(pkg)
    w.finish()
    return w, dag


@needs_gpg
def test_v2_cache_files_and_names(v2_cache):
    w, (runtime, greet, hello) = v2_cache
    stem = f"linux-debian12-x86_64-gcc-12.2.0-lmhello-1.0-{hello.dag_hash}"
    assert sc.v2_specfile_relpath(hello) == f"build_cache/{stem}.spec.json.sig"
    assert sc.v2_tarball_relpath(hello) == (
        f"build_cache/linux-debian12-x86_64/gcc-12.2.0/lmhello-1.0/{stem}.spack")
    assert w.prefix_of(hello) == (
        f"{V2_ROOT}/linux-debian12-x86_64/gcc-12.2.0/lmhello-1.0-{hello.dag_hash}")
    expected = {"build_cache/index.json", "build_cache/index.json.hash",
                f"build_cache/_pgp/{FPR}.pub", "build_cache/_pgp/index.json"}
    for pkg in (runtime, greet, hello):
        expected |= {sc.v2_specfile_relpath(pkg), sc.v2_tarball_relpath(pkg)}
    assert set(tree_bytes(w.root)) == expected  # nothing of layout v3


@needs_gpg
def test_v2_spec_file_signs_spec_and_tarball_checksum(v2_cache):
    w, (_, _, hello) = v2_cache
    entry = w.v2_entries[hello.dag_hash]
    signed = entry.specfile.read_bytes()
    assert signed.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n{\n")
    verified = sc.verify_clearsigned(signed, PUBLIC_KEY.read_bytes())
    assert verified.plaintext == entry.spec_text + b"\n"  # gpg ends the last line
    doc = json.loads(entry.spec_text)
    assert list(doc) == ["spec", "buildcache_layout_version", "binary_cache_checksum"]
    assert doc["buildcache_layout_version"] == 2
    tarball = entry.tarball.read_bytes()
    assert doc["binary_cache_checksum"] == {
        "hash_algorithm": "sha256", "hash": hashlib.sha256(tarball).hexdigest()}
    # json.dump(..., indent=0, separators=(",", ":")): one value per line, no indent
    assert entry.spec_text == json.dumps(doc, indent=0, separators=(",", ":")).encode()
    assert entry.spec_text.startswith(b'{\n"spec":{\n"_meta":{\n"version":4\n},\n"nodes":[\n{\n')
    assert doc["spec"] == hello.spec_dict()["spec"]


@needs_gpg
def test_v2_tarball_is_the_v3_format_at_the_023_prefix(v2_cache):
    w, (_, greet, hello) = v2_cache
    entry = w.v2_entries[hello.dag_hash]
    members = tar_members(entry.tarball.read_bytes())
    prefix = w.prefix_of(hello).lstrip("/")
    assert members[0][0].name == "tmp" and members[-1][0].name == (
        f"{prefix}/.spack/binary_distribution")
    spec_json = next(d for m, d in members if m.name == f"{prefix}/.spack/spec.json")
    assert spec_json == sc.compact_json(hello.spec_dict()).encode()
    info = yaml.safe_load(entry.buildinfo)
    assert list(info) == ["sbang_install_path", "buildpath", "spackprefix", "relative_prefix",
                          "relocate_textfiles", "relocate_binaries", "relocate_links",
                          "hardlinks_deduped", "hash_to_prefix"]
    assert info["relative_prefix"] == sc.v2_projection(hello)
    assert info["hash_to_prefix"][greet.dag_hash] == w.prefix_of(greet)
    assert gzip.decompress(entry.tarball.read_bytes())  # one gzip member


@needs_gpg
def test_v2_index_hash_and_keys(v2_cache, signer):
    w, dag = v2_cache
    index = (w.root / "build_cache/index.json").read_bytes()
    assert index.startswith(b'{"database":{"version":"7","installs":{')
    assert json.loads(index)["database"]["installs"] == w.index_records()
    assert [r["spec"]["name"] for r in w.index_records().values()] == [
        "gcc-runtime", "lmgreet", "lmhello"]
    digest = (w.root / "build_cache/index.json.hash").read_bytes()
    assert digest == hashlib.sha256(index).hexdigest().encode()  # no newline
    keys = w.root / "build_cache/_pgp"
    assert (keys / f"{FPR}.pub").read_bytes() == PUBLIC_KEY.read_bytes()
    assert (keys / "index.json").read_bytes() == b'{"keys":{"%s":{}}}' % FPR.encode()


def test_v2_unsigned_spec_files(tmp_path):
    w = sc.V2CacheWriter(tmp_path)
    _, _, hello = v2_dag()
    w.add(hello)
    w.finish()
    entry = w.v2_entries[hello.dag_hash]
    assert entry.specfile == tmp_path / sc.v2_specfile_relpath(hello, signed=False)
    assert entry.specfile.read_bytes() == entry.spec_text
    assert not (tmp_path / "build_cache/_pgp").exists()
    with pytest.raises(ValueError, match="needs a compiler"):
        w.add(sc.Package("nocompiler"))


@needs_gpg
def test_migration_adds_v3_next_to_the_untouched_v2(v2_cache):
    w, (runtime, greet, hello) = v2_cache
    before = tree_bytes(w.root)
    w.migrate()
    after = tree_bytes(w.root)
    assert {k: after[k] for k in before} == before  # build_cache/ untouched
    for pkg in (runtime, greet, hello):
        v2, v3 = w.v2_entries[pkg.dag_hash], w.entries[pkg.dag_hash]
        tarball = v2.tarball.read_bytes()
        assert w.blob_path(v3.tarball["checksum"]).read_bytes() == tarball  # same bytes
        assert v3.tarball == sc.blob_record(tarball, sc.MEDIA_TARBALL, "gzip")
        spec_blob = w.blob_path(v3.spec["checksum"]).read_bytes()
        doc = json.loads(gzip.decompress(spec_blob))
        assert list(doc) == ["spec", "buildcache_layout_version", "archive_size"]
        assert doc["spec"]["_meta"]["version"] == 4 and doc["archive_size"] == len(tarball)
        assert v3.spec["mediaType"] == sc.MEDIA_SPEC
        manifest = sc.verify_clearsigned(v3.manifest.read_bytes(), PUBLIC_KEY.read_bytes())
        assert json.loads(manifest.plaintext)["data"] == [v3.tarball, v3.spec]
    index_manifest = json.loads((w.root / "v3/manifests/index/index.manifest.json").read_bytes())
    index = json.loads(w.blob_path(index_manifest["data"][0]["checksum"]).read_bytes())
    assert index["database"]["version"] == "8"
    node = index["database"]["installs"][hello.dag_hash]["spec"]
    assert "compiler" not in node and node["annotations"]["compiler"] == "gcc@=12.2.0"
    assert (w.root / f"v3/manifests/key/{FPR}.key.manifest.json").exists()
    assert (w.root / "v3/layout.json").exists()
