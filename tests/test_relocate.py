"""Relocation of real Spack-built packages (tests/data) and of hand-made prefixes."""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from lazymount.errors import FormatError, MountPathTooLong, RelocationError
from lazymount.install import relocate
from lazymount.install.buildinfo import BuildInfo, parse_buildinfo
from lazymount.install.sbang import add_sbang

BLOBS = Path(__file__).parent / "data" / "v3-own-only" / "blobs" / "sha256"
TARBALLS = {
    "lmhello": BLOBS / "ff" / "ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f",
    "lmgreet": BLOBS / "2d" / "2dc5ac5054b7b63d66540ec8560cbd775f7c753810e48bb32574e8e4ca634ead",
}
OLD_ROOT = "/tmp/lm/opt/spack"  # the fixtures' build root, 17 characters
HELLO = "linux-x86_64/lmhello-1.0-3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET = "linux-x86_64/lmgreet-1.0-2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
GREET_HASH = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
RUNTIME_HASH = "oe3jjjgkiiftiqrrr7neyq75fjxluf3n"


# ------------------------------------------------------------------------------- helpers


def extract(name: str, dest: Path) -> BuildInfo:
    """Extract a fixture tarball into ``dest`` as Spack does (build prefix stripped); returns
    its buildinfo."""
    with tarfile.open(TARBALLS[name]) as tar:
        members = tar.getmembers()
        info = min((m.name for m in members if m.name.endswith(".spack/binary_distribution")),
                   key=len)
        strip = posixpath.dirname(posixpath.dirname(info)) + "/"
        picked = []
        for m in members:
            if m.name.startswith(strip):
                m.name = m.name[len(strip):]
                picked.append(m)
        kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        tar.extractall(dest, members=picked, **kwargs)
    return parse_buildinfo((dest / ".spack" / "binary_distribution").read_bytes(), name)


def relocate_fixtures(new_root: str, base: Path) -> dict[str, tuple[Path, dict, object]]:
    """Extract both fixture packages under ``base`` and relocate them to ``new_root``."""
    out = {}
    for name, rel in (("lmgreet", GREET), ("lmhello", HELLO)):
        prefix = base / rel
        prefix.mkdir(parents=True)
        info = extract(name, prefix)
        mapping = relocate.prefix_map(info, new_root, lambda h, i=info: new_prefix(i, h, new_root),
                                      new_root + "/bin/sbang")
        out[name] = (prefix, info, relocate.relocate_prefix(prefix, info, mapping, name))
    return out


def new_prefix(info: BuildInfo, dag_hash: str, new_root: str) -> str:
    return new_root + info.hash_to_prefix[dag_hash][len(info.buildpath):]


def rpath_of(path: Path) -> str:
    with path.open("rb") as f:
        dynamic = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_DYNAMIC")
        return next(t.rpath for t in dynamic.iter_tags() if t.entry.d_tag == "DT_RPATH")


def make_prefix(tmp_path: Path, files: dict[str, bytes], mode: int = 0o644) -> Path:
    prefix = tmp_path / "prefix"
    for rel, data in files.items():
        path = prefix / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (0, 0))
    return prefix


def info_for(texts=(), binaries=(), links=(), deduped=True) -> BuildInfo:
    return BuildInfo(sbang_install_path=None, buildpath="/old/root", relative_prefix="p",
                     hash_to_prefix={}, relocate_textfiles=tuple(texts),
                     relocate_binaries=tuple(binaries), relocate_links=tuple(links),
                     hardlinks_deduped=deduped)


# ------------------------------------------------------------------------ the mapping


def test_prefix_map_order_and_identity(tmp_path):
    info = extract("lmhello", tmp_path / "p")
    own_not_first = dict(reversed(list(info.hash_to_prefix.items())))
    info = dataclasses.replace(info, hash_to_prefix=own_not_first)
    mapping = relocate.prefix_map(
        info, "/n", lambda h: None if h == RUNTIME_HASH else f"/n/{h}", "/n/bin/sbang")
    assert mapping == [
        (OLD_ROOT + "/bin/sbang", "/n/bin/sbang"),
        (f"{OLD_ROOT}/{HELLO}", "/n/3vgakfze5q7cw5gke5wbrfotzhh2tstq"),  # own prefix first
        (f"{OLD_ROOT}/{GREET}", f"/n/{GREET_HASH}"),  # then file order; runtime: None, skipped
        (OLD_ROOT, "/n"),
    ]
    same = relocate.prefix_map(info, OLD_ROOT, lambda h: info.hash_to_prefix[h],
                               OLD_ROOT + "/bin/sbang")
    assert same == []  # identity mappings dropped: nothing to do


def test_empty_mapping_changes_nothing(tmp_path):
    prefix = make_prefix(tmp_path, {"t.txt": b"/old/root/p\n"})
    report = relocate.relocate_prefix(prefix, info_for(texts=["t.txt"]), [], "pkg")
    assert report == relocate.RelocationReport()


# ---------------------------------------------------------- the real fixture packages


def test_relocate_fixtures_to_a_shorter_root(tmp_path):
    new_root = "/tmp/lmx/spack"  # 14 characters: binaries keep their size, padded with "/"
    done = relocate_fixtures(new_root, tmp_path)
    hello, _, report = done["lmhello"]
    greet, _, greet_report = done["lmgreet"]

    assert rpath_of(hello / "bin/hello") == (
        f"{new_root}/{GREET}/lib:{new_root}/linux-x86_64/gcc-runtime-12.2.0-{RUNTIME_HASH}/lib")
    data = (hello / "bin/hello").read_bytes()
    assert f"////tmp/lmx/spack/{HELLO}/share/lmhello/message.txt\0".encode() in data
    assert OLD_ROOT.encode() not in data
    lib = (greet / "lib/libgreet.so").read_bytes()
    assert f"////tmp/lmx/spack/{GREET}\0".encode() in lib
    assert OLD_ROOT.encode() not in lib

    wrapper = (hello / "bin/hello-wrapper").read_text()
    assert f'exec "{new_root}/{HELLO}/bin/hello"' in wrapper and OLD_ROOT not in wrapper
    assert f'PREFIX = "{new_root}/{HELLO}"' in (hello / "bin/hello.py").read_text()
    assert (hello / "bin/hello-script").read_text().startswith(
        f"#!{new_root}/{HELLO}/bin/hello-interp\n")
    assert f"prefix={new_root}/{GREET}\n" in (greet / "lib/pkgconfig/greet.pc").read_text()

    assert os.readlink(hello / "share/lmhello/message-abs.txt") == (
        f"{new_root}/{HELLO}/share/lmhello/message.txt")
    assert os.readlink(hello / "bin/hi") == "hello"  # relative: untouched

    assert (report.elf, report.links, report.text, report.binaries) == (2, 1, 3, 1)
    assert set(report.changed) == {"bin/hello", "bin/hello-interp", "bin/hello-script",
                                   "bin/hello-wrapper", "bin/hello.py",
                                   "share/lmhello/message-abs.txt"}
    assert greet_report.changed == ["lib/libgreet.so", "lib/pkgconfig/greet.pc"]
    # unchanged files are not rewritten (mtime 0 from the tarball); modes survive rewrites
    assert (hello / "share/lmhello/message.txt").stat().st_mtime == 0
    assert (hello / ".spack/spec.json").stat().st_mtime == 0
    assert OLD_ROOT in (hello / ".spack/install_manifest.json").read_text()
    for rel in ("bin/hello", "bin/hello-wrapper", "bin/hello.py"):
        assert stat.S_IMODE((hello / rel).stat().st_mode) == 0o755
    assert stat.S_IMODE((greet / "lib/pkgconfig/greet.pc").stat().st_mode) == 0o644
    assert add_sbang(hello, new_root + "/bin/sbang", "lmhello") == []  # short shebangs


def test_relocated_fixtures_run_from_their_new_root():
    root = tempfile.mkdtemp(prefix="l", dir="/tmp")  # /tmp/lXXXXXXXX: 14 <= 17 characters
    try:
        assert len(root) <= len(OLD_ROOT)
        relocate_fixtures(root, Path(root))
        bin_dir = Path(root) / HELLO / "bin"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LD_")}
        run = lambda *argv: subprocess.run(  # noqa: E731
            argv, capture_output=True, text=True, check=True, env=env, timeout=30).stdout
        out = run(str(bin_dir / "hello"), "-v")
        assert "Hello from lmgreet, world!" in out
        pad = "/" * (len(OLD_ROOT) - len(root))
        assert f"data: {pad}{root}/{HELLO}/share/lmhello/message.txt" in out
        assert f"greet prefix: {pad}{root}/{GREET}" in out
        assert OLD_ROOT not in out
        assert "Hello from lmgreet, world!" in run(str(bin_dir / "hi"))
        assert "Hello from lmgreet, world!" in run(str(bin_dir / "hello-wrapper"))
        assert f"from {root}/{HELLO}" in run(sys.executable, str(bin_dir / "hello.py"))
        assert "script says hi" in run(str(bin_dir / "hello-script"))
    finally:
        shutil.rmtree(root)


def test_longer_root_fails_clearly(tmp_path):
    with pytest.raises(MountPathTooLong, match="longer"):
        relocate_fixtures("/tmp/lm-much-longer-root/opt/spack", tmp_path)


def test_growing_c_string_fails_with_spacks_message(tmp_path):
    # RPATH as a whole shrinks (gcc-runtime gets short), but lmgreet's compiled-in prefix grows
    info = extract("lmgreet", tmp_path)
    longer = f"{OLD_ROOT}x/{GREET}"
    mapping = [(f"{OLD_ROOT}/{GREET}", longer),
               (f"{OLD_ROOT}/linux-x86_64/gcc-runtime-12.2.0-{RUNTIME_HASH}", "/g")]
    with pytest.raises(MountPathTooLong) as err:
        relocate.relocate_prefix(tmp_path, info, mapping, "lmgreet")
    message = str(err.value)
    assert message.startswith(f"lmgreet: cannot replace '{OLD_ROOT}/{GREET}' with '{longer}' "
                              "in lib/libgreet.so: the new prefix is longer")


def test_elf_paths_match_at_boundaries_first_listed_wins(tmp_path):
    info = extract("lmhello", tmp_path)
    info = dataclasses.replace(info, relocate_links=(), relocate_textfiles=())
    greet_old = f"{OLD_ROOT}/{GREET}"
    # "…/li" is a prefix of "…/lib" as a string, not as a path: the build root matches instead
    relocate.relocate_prefix(tmp_path, info, [(greet_old + "/li", "/z"), (OLD_ROOT, "/r")], "p")
    assert rpath_of(tmp_path / "bin/hello").startswith(f"/r/{GREET}/lib:/r/linux-x86_64/")

    info = extract("lmhello", tmp_path / "again")
    info = dataclasses.replace(info, relocate_links=(), relocate_textfiles=())
    relocate.relocate_prefix(tmp_path / "again", info, [(OLD_ROOT, "/r"), (greet_old, "/g")], "p")
    assert rpath_of(tmp_path / "again/bin/hello").startswith(f"/r/{GREET}/lib:")  # first wins

    info = extract("lmhello", tmp_path / "third")
    info = dataclasses.replace(info, relocate_links=(), relocate_textfiles=())
    relocate.relocate_prefix(tmp_path / "third", info, [(greet_old, "/g"), (OLD_ROOT, "/r")], "p")
    assert rpath_of(tmp_path / "third/bin/hello") == (
        f"/g/lib:/r/linux-x86_64/gcc-runtime-12.2.0-{RUNTIME_HASH}/lib")


needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@needs_cc
def test_runpath_and_interpreter_rewritten_in_place(tmp_path):
    prefix = tmp_path / "p"
    (prefix / "bin").mkdir(parents=True)
    (tmp_path / "m.c").write_text("int main(void) { return 0; }\n")
    exe = prefix / "bin/tool"
    subprocess.run(["cc", str(tmp_path / "m.c"), "-o", str(exe),
                    "-Wl,--enable-new-dtags,-rpath,/old/root/a/lib::/usr/lib:/old/root/b/lib",
                    "-Wl,--dynamic-linker=/old/root/glibc/lib/ld.so"], check=True)
    before = exe.read_bytes()
    mapping = [("/old/root/a", "/n/a"), ("/old/root", "/m")]
    report = relocate.relocate_prefix(prefix, info_for(binaries=["bin/tool"]), mapping, "pkg")
    assert report.elf == 1 and report.changed == ["bin/tool"]
    with exe.open("rb") as f:
        elf_file = ELFFile(f)
        interp = next(s for s in elf_file.iter_segments() if s["p_type"] == "PT_INTERP")
        dynamic = next(s for s in elf_file.iter_segments() if s["p_type"] == "PT_DYNAMIC")
        runpath = next(t.runpath for t in dynamic.iter_tags() if t.entry.d_tag == "DT_RUNPATH")
        assert interp.get_interp_name() == "/m/glibc/lib/ld.so"
        assert runpath == "/n/a/lib:/usr/lib:/m/b/lib"  # empty entries dropped, as Spack does
    after = exe.read_bytes()
    assert len(after) == len(before)
    old_rpath = b"/old/root/a/lib::/usr/lib:/old/root/b/lib\0"
    at = before.index(old_rpath)
    new_rpath = b"/n/a/lib:/usr/lib:/m/b/lib"
    assert after[at:at + len(old_rpath)] == new_rpath.ljust(len(old_rpath), b"\0")  # zero-filled

    with pytest.raises(MountPathTooLong, match="longer"):
        relocate.relocate_prefix(prefix, info_for(binaries=["bin/tool"]),
                                 [("/m", "/a-much-longer-root")], "pkg")
    assert exe.read_bytes() == after  # all or nothing: the interpreter was not written either


# ---------------------------------------------------------------------- text files


def text(data: bytes, mapping: list[tuple[str, str]]) -> bytes:
    out = relocate._replace_text(data, relocate._Rules(mapping))
    return data if out is None else out


@pytest.mark.parametrize(("before", "after"), [
    (b"prefix=/old/root/p\n", b"prefix=/NEW/p\n"),
    (b"-I/old/root/p/include", b"-I/NEW/p/include"),  # word run at a boundary: kept as g1
    (b'"/old/root"', b'"/NEW"'),
    (b"/usr/old/root/p", b"/usr/old/root/p"),  # preceded by a path component: not a prefix
    (b"//old/root/p", b"//old/root/p"),  # preceded by "/"
    (b"a/b/old/root", b"a/b/old/root"),
    (b"/old/rootless/x", b"/NEWless/x"),  # Spack does not check the right-hand boundary
    (b"x /old/root y /old/root/z", b"x /NEW y /NEW/z"),
])
def test_text_boundary_rule(before, after):
    assert text(before, [("/old/root", "/NEW")]) == after


def test_text_first_listed_wins():
    data = b"at /a/b/c\n"
    assert text(data, [("/a/b", "/X"), ("/a", "/Y")]) == b"at /X/c\n"
    assert text(data, [("/a", "/Y"), ("/a/b", "/X")]) == b"at /Y/b/c\n"


PIECES = [b"a", b"Z9", b"-", b"_", b"/", b" ", b"\n", b"\0", b".", b"\xff",
          b"/t", b"/tmp", b"/tmp/a", b"/tmp/ab", b"/tmp/ab/c", b"x/tmp/ab", b"/p q", b"q"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_fast_text_scan_equals_spacks_regex(pieces):
    data = b"".join(pieces)
    for mapping in ([("/tmp/ab/c", "/1"), ("/tmp/a", "/long/er/2"), ("/tmp/ab", "/3")],
                    [("/tmp/ab", ""), ("/tmp", "/q")],
                    [("/p q/p q", "/Z")],  # occurrences overlap; a later one may match
                    [("a", "b"), ("/tmp", "-")]):  # needle in [\w-]: the plain regex path
        rules = relocate._Rules(mapping)
        expected = rules.text.sub(lambda m, r=rules: m[1] + r.new_of[m[2]] + m[3], data)
        assert text(data, mapping) == expected


def test_text_files_rewritten_in_place_keeping_mode(tmp_path):
    prefix = make_prefix(tmp_path, {"bin/run": b"#!/bin/sh\nexec /old/root/p/bin/x\n",
                                    "plain.txt": b"nothing here\n"}, mode=0o555)
    report = relocate.relocate_prefix(prefix, info_for(texts=["bin/run", "plain.txt"]),
                                      [("/old/root", "/new")], "pkg")
    assert (prefix / "bin/run").read_bytes() == b"#!/bin/sh\nexec /new/p/bin/x\n"
    assert stat.S_IMODE((prefix / "bin/run").stat().st_mode) == 0o555  # read-only, restored
    assert (prefix / "plain.txt").stat().st_mtime == 0
    assert report.changed == ["bin/run"] and report.text == 1


def test_hardlinked_text_is_relocated_once(tmp_path):
    prefix = make_prefix(tmp_path, {"a.txt": b"/o/file\n"})
    os.link(prefix / "a.txt", prefix / "b.txt")
    mapping = [("/o", "/o/x")]  # relocating twice would give /o/x/x/file
    report = relocate.relocate_prefix(
        prefix, info_for(texts=["a.txt", "b.txt"], deduped=False), mapping, "pkg")
    assert (prefix / "a.txt").read_bytes() == (prefix / "b.txt").read_bytes() == b"/o/x/file\n"
    assert (prefix / "a.txt").stat().st_ino == (prefix / "b.txt").stat().st_ino
    assert report.changed == ["a.txt"]


# ----------------------------------------------------------------------- C strings

OLD = "/old/root/prefix"  # 16 bytes


def binary(tmp_path: Path, data: bytes, new: str) -> bytes:
    """Relocate ``data`` as a (non-ELF) binary from OLD to ``new``; returns the new bytes."""
    prefix = make_prefix(tmp_path, {"lib/blob.bin": data})
    relocate.relocate_prefix(prefix, info_for(binaries=["lib/blob.bin"]), [(OLD, new)], "pkg")
    out = (prefix / "lib/blob.bin").read_bytes()
    assert len(out) == len(data)
    return out


@pytest.mark.parametrize(("data", "new", "after"), [
    # long C string (suffix >= 7 bytes): pad with leading "/"
    (b"\0/old/root/prefix/share/data.txt\0", "/new/pfx",
     b"\0/////////new/pfx/share/data.txt\0"),
    # no NUL within the look-ahead: assumed long, padded
    (b"/old/root/prefixABCDEFGHIJ", "/new/pfx", b"/////////new/pfxABCDEFGHIJ"),
    # short suffix, but old and new end alike: padded
    (b"x/old/root/prefix\0", "/n/prefix", b"x////////n/prefix\0"),
    # short suffix, different ending, shrinks by more than 7: terminated early, old tail kept
    (b"/old/root/prefix/ab\0", "/new/pfx", b"/new/pfx/ab\0efix/ab\0"),
    # same length, long string: nothing to pad
    (b"/old/root/prefix/lib/x.so\0", "/new/root/prefiy", b"/new/root/prefiy/lib/x.so\0"),
])
def test_c_string_padding_and_shrinking(tmp_path, data, new, after):
    assert binary(tmp_path, data, new) == after


@pytest.mark.parametrize("new", ["/old/root/pfx", "/new/root/prefiy"])
def test_c_string_that_cannot_shrink(tmp_path, new):
    # a short C string whose last bytes change, shrinking by 7 or less (even 0): Spack refuses,
    # since strings the linker merged into its tail would change too
    with pytest.raises(RelocationError, match="in the C string") as err:
        binary(tmp_path, b"/old/root/prefix/ab\0", new)
    assert not isinstance(err.value, MountPathTooLong)


def test_c_string_that_would_grow(tmp_path):
    with pytest.raises(MountPathTooLong, match="the new prefix is longer"):
        binary(tmp_path, b"/old/root/prefix\0", "/old/root/prefix-2")


def test_binary_without_old_prefix_is_not_rewritten(tmp_path):
    prefix = make_prefix(tmp_path, {"lib/x.so": b"\x7fELFnot really\0/other/path\0"})
    report = relocate.relocate_prefix(prefix, info_for(binaries=["lib/x.so"]), [(OLD, "/n")], "p")
    assert report.changed == [] and (prefix / "lib/x.so").stat().st_mtime == 0


# ------------------------------------------------------------------ paths and links


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", "a/../../x", ""])
def test_paths_outside_the_prefix_are_refused(tmp_path, bad):
    prefix = make_prefix(tmp_path, {"a/t.txt": b"/old/root\n"})
    with pytest.raises(RelocationError, match="refusing"):
        relocate.relocate_prefix(prefix, info_for(texts=[bad]), [("/old/root", "/n")], "pkg")


def test_entries_through_symlinks_are_refused_and_symlinks_skipped(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "t.txt").write_bytes(b"/old/root\n")
    prefix = make_prefix(tmp_path, {"keep.txt": b"x\n"})
    (prefix / "dir").symlink_to(outside)
    (prefix / "file-link").symlink_to(outside / "t.txt")
    mapping = [("/old/root", "/n")]
    with pytest.raises(RelocationError, match="symlink"):
        relocate.relocate_prefix(prefix, info_for(texts=["dir/t.txt"]), mapping, "pkg")
    report = relocate.relocate_prefix(prefix, info_for(texts=["file-link"],
                                                       binaries=["file-link"]), mapping, "pkg")
    assert report.changed == []
    assert (outside / "t.txt").read_bytes() == b"/old/root\n"


def test_missing_listed_file_and_bad_lists(tmp_path):
    prefix = make_prefix(tmp_path, {"x": b""})
    with pytest.raises(RelocationError, match="not in the package"):
        relocate.relocate_prefix(prefix, info_for(texts=["gone.txt"]), [("/o", "/n")], "pkg")
    # a list that is not one is refused where build info is read, before any relocation
    with pytest.raises(FormatError):
        parse_buildinfo(b"{buildpath: /old/root, relocate_links: share/link}", "pkg")


def test_links_repointed_at_boundaries_only(tmp_path):
    prefix = make_prefix(tmp_path, {"x": b""})
    (prefix / "abs").symlink_to("/old/root/p/share/f")
    (prefix / "sibling").symlink_to("/old/rootless/f")  # a string prefix, not a path prefix
    (prefix / "rel").symlink_to("share/f")
    report = relocate.relocate_prefix(prefix, info_for(links=["abs", "sibling", "rel", "x"]),
                                      [("/old/root", "/n")], "pkg")
    assert os.readlink(prefix / "abs") == "/n/p/share/f"
    assert os.readlink(prefix / "sibling") == "/old/rootless/f"
    assert os.readlink(prefix / "rel") == "share/f"
    assert report.changed == ["abs"] and report.links == 1
    assert not [p for p in prefix.iterdir() if p.name.startswith(".lazymount")]


# --------------------------------------------------------------------------- sbang


def long_shebang(interpreter: bytes, length: int = 200) -> bytes:
    """A shebang line (without newline) of ``length`` bytes running ``interpreter``."""
    head = b"#!/" + b"d" * (length - 3 - len(interpreter) - 1) + b"/"
    return head + interpreter


def test_add_sbang_to_a_200_byte_shebang(tmp_path):
    first = long_shebang(b"python3")
    assert len(first) == 200
    prefix = make_prefix(tmp_path, {"bin/tool": first + b"\nprint('hi')\n"}, mode=0o755)
    (prefix / "bin/tool-link").symlink_to("tool")
    changed = add_sbang(prefix, "/mnt/root/bin/sbang", "pkg")
    assert changed == ["bin/tool"]
    assert (prefix / "bin/tool").read_bytes() == (
        b"#!/bin/sh /mnt/root/bin/sbang\n" + first + b"\nprint('hi')\n")
    assert stat.S_IMODE((prefix / "bin/tool").stat().st_mode) == 0o755
    assert add_sbang(prefix, "/mnt/root/bin/sbang", "pkg") == []  # idempotent


@pytest.mark.parametrize("told", [False, True], ids=["walked", "told-the-scripts"])
def test_add_sbang_skips_what_spack_skips(tmp_path, told):
    line = long_shebang(b"perl")
    files = {
        "bin/short": b"#!/bin/sh\necho\n",
        "bin/at-limit": long_shebang(b"sh", 126) + b"\n",  # 127 bytes with its newline: fine
        "bin/no-newline-in-4096": long_shebang(b"sh", 5000),
        "share/not-executable": line + b"\n",
        ".spack/hook": line + b"\n",
        "bin/blank": b"#!" + b" " * 200 + b"\n",
    }
    prefix = make_prefix(tmp_path, files, mode=0o755)
    (prefix / "share/not-executable").chmod(0o644)
    (prefix / "bin/over-limit").write_bytes(long_shebang(b"sh", 127) + b"\n")
    (prefix / "bin/over-limit").chmod(0o700)
    # told: every file is named (extraction names those starting with "#!"); the same
    # filters still apply
    scripts = [*files, "bin/over-limit"] if told else None
    assert add_sbang(prefix, "/r/bin/sbang", "pkg", scripts) == ["bin/over-limit"]


@pytest.mark.parametrize(("interpreter", "second"), [
    (b"lua", b"--!"), (b"luajit", b"--!"), (b"node", b"//!"), (b"bash", b"#!")])
def test_add_sbang_comment_variants(tmp_path, interpreter, second):
    first = long_shebang(interpreter)
    prefix = make_prefix(tmp_path, {"bin/s": first + b" -x\nbody\n"}, mode=0o755)
    add_sbang(prefix, "/r/bin/sbang", "pkg")
    lines = (prefix / "bin/s").read_bytes().split(b"\n")
    assert lines == [b"#!/bin/sh /r/bin/sbang", second + first[2:] + b" -x", b"body", b""]


def test_add_sbang_php_variant_as_spack_writes_it(tmp_path):
    first = long_shebang(b"php")
    prefix = make_prefix(tmp_path, {"bin/p": first + b"\n<?php echo 1;\n"}, mode=0o755)
    add_sbang(prefix, "/r/bin/sbang", "pkg")
    assert (prefix / "bin/p").read_bytes() == (
        b"#!/bin/sh /r/bin/sbang\n<?php " + first + b"\n ?><?php echo 1;\n")


def test_add_sbang_refuses_an_overlong_sbang_path(tmp_path):
    prefix = make_prefix(tmp_path, {"bin/s": long_shebang(b"sh") + b"\n"}, mode=0o755)
    with pytest.raises(RelocationError, match="sbang path is longer"):
        add_sbang(prefix, "/" + "s" * 130, "pkg")


# ---------------------------------------------------------------------------------------------
# The struct reader of 64-bit little-endian ELF files agrees with pyelftools


def _both_readers(data: bytes) -> tuple[object, object]:
    import io

    from lazymount.install import elf

    f = io.BytesIO(data)
    return elf.read_elf_paths(f), elf.read_elf_paths_pyelftools(f)


@functools.cache
def _fixture_elves() -> tuple[bytes, ...]:
    """The ELF files of the fixture packages, extracted once for the tests below."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("lmhello", "lmgreet"):
            extract(name, Path(tmp) / name)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file() and not path.is_symlink() and path.read_bytes()[:4] == b"\x7fELF":
                found.append(path.read_bytes())
    return tuple(found)


def test_both_elf_readers_agree_on_real_binaries():
    system = [Path(sys.executable).resolve(), Path("/bin/sh").resolve()]
    elves = [*_fixture_elves(), *(p.read_bytes() for p in system if p.is_file())]
    assert len(elves) >= 4
    for data in elves:
        fast, reference = _both_readers(data)
        assert fast == reference
    assert any(_both_readers(data)[0].rpath is not None for data in elves)


@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_both_elf_readers_agree_on_damaged_headers(data):
    damaged = bytearray(data.draw(st.sampled_from(_fixture_elves())))
    # damage the header, the program headers or the dynamic array: where the readers look
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, min(len(damaged), 4096) - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    fast, reference = _both_readers(bytes(damaged))
    if reference is not None:  # pyelftools also gives up on damaged section headers
        assert fast == reference
