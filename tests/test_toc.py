"""The table-of-contents format (``buildcache/toc.py``): a TOC survives its JSON envelope,
anything malformed is refused, and the relocated sizes it predicts are the sizes relocation
and the sbang hook really give."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazymount.buildcache import toc as tocmod
from lazymount.buildcache.published import make_envelope
from lazymount.buildcache.toc import (
    Occurrence,
    Relocation,
    SeekPoint,
    Toc,
    TocMember,
    count_text,
    parse_toc,
    points_for,
    relocated_link,
    relocated_size,
    toc_body,
)
from lazymount.errors import FormatError
from lazymount.install import relocate, sbang
from lazymount.install.buildinfo import BuildInfo

ROOT = "/build/spack"
OWN = "/build/spack/linux/pkg-1.0-aaaa"
DEP = "/build/spack/linux/dep-2.0-bbbb"
SBANG = "/build/spack/bin/sbang"
PREFIXES = (SBANG, OWN, DEP, ROOT)
PREFIX = "build/spack/linux/pkg-1.0-aaaa"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample() -> Toc:
    text = f"path={OWN}/lib:{DEP}/include\n".encode()
    points = (SeekPoint(10, 0, 0, "", sha(b"a")), SeekPoint(5000, 3, 4 << 20, sha(b"w"),
                                                            sha(b"b")))
    members = (
        TocMember("build", "dir", 0o755, 0, "", 0, ""),
        TocMember(PREFIX, "dir", 0o755, 0, "", 512, ""),
        TocMember(f"{PREFIX}/share/x.pc", "file", 0o644, len(text), "", 1536, sha(text),
                  Relocation(text=count_text(text, PREFIXES))),
        TocMember(f"{PREFIX}/bin/run", "file", 0o755, 20, "", 3072, sha(b"r"),
                  Relocation(shebang=b"#!/bin/sh\n")),
        TocMember(f"{PREFIX}/bin/again", "hardlink", 0o755, 0, f"{PREFIX}/bin/run", 4096, ""),
        TocMember(f"{PREFIX}/lib/dep", "symlink", 0o777, 0, f"{DEP}/lib", 4608, "",
                  Relocation(link=True)),
    )
    return Toc(sha(b"tarball"), 9000, 8 << 20, PREFIX, "{buildpath: /build/spack}", PREFIXES,
               points, members)


def envelope(body: dict) -> bytes:
    return make_envelope("toc", body)


def test_a_toc_survives_its_envelope():
    toc = sample()
    assert parse_toc(envelope(toc_body(toc)), "t") == toc


def test_points_for_a_member_name_its_spans():
    toc = sample()
    early = toc.members[2]
    point, last = points_for(toc, early)
    assert point == toc.points[0] and last == toc.points[1].compressed  # shared first byte
    late = TocMember(f"{PREFIX}/big", "file", 0o644, 10, "", 5 << 20, sha(b"x"))
    point, last = points_for(toc, late)
    assert point == toc.points[1] and last == toc.tarball_size - 1
    across = TocMember(f"{PREFIX}/big", "file", 0o644, 5 << 20, "", 1 << 20, sha(b"x"))
    assert points_for(toc, across) == (toc.points[0], toc.tarball_size - 1)


def _broken(change) -> dict:
    body = json.loads(json.dumps(toc_body(sample())))
    change(body)
    return body


@pytest.mark.parametrize("change, message", [
    (lambda b: b["members"][2].__setitem__(0, f"{PREFIX}/../../etc/passwd"), "clean relative"),
    (lambda b: b["members"][2].__setitem__(0, "/etc/passwd"), "clean relative"),
    (lambda b: b["members"][2].__setitem__(0, "build/other/file"), "outside the prefix"),
    (lambda b: b["members"][3].__setitem__(0, f"{PREFIX}/share/x.pc"), "listed twice"),
    (lambda b: b["members"][4].__setitem__(4, f"{PREFIX}/lib/dep"), "hard link"),
    (lambda b: b["members"][2].__setitem__(6, "00" * 31), "sha256"),
    (lambda b: b["members"][2].__setitem__(3, True), "size"),
    (lambda b: b["members"][2].__setitem__(5, (8 << 20) - 1), "ends after the tar"),
    (lambda b: b["members"][2].__setitem__(1, "fifo"), "kind"),
    (lambda b: b["members"][5].__setitem__(4, ""), "link target"),
    (lambda b: b["members"][5].__setitem__(4, "../../../../../etc"), "climbs out"),
    (lambda b: b["members"][0].__setitem__(3, 5), "with content"),
    (lambda b: b["points"].reverse(), "not after"),
    (lambda b: b["points"][1].__setitem__(1, 8), "number from 0 to 7"),
    (lambda b: b["points"][1].__setitem__(3, ""), "window"),
    (lambda b: b["points"][0].__setitem__(2, 1), "first point"),
    (lambda b: b["points"].__setitem__(slice(None), []), "first point"),
    (lambda b: b["points"][1].__setitem__(0, 9000), "number from 0"),
    (lambda b: b["prefixes"].append("relative/path"), "absolute"),
    (lambda b: b["members"][2][7]["text"][0][1][0].__setitem__(0, 9), "prefix index"),
    (lambda b: b["members"][3][7].__setitem__("shebang", "!!"), "base64"),
    (lambda b: b["members"][3][7].__setitem__("extra", 1), "relocation"),
    (lambda b: b["tarball"].__setitem__("sha256", "x"), "sha256"),
    (lambda b: b.__setitem__("members", {}), "not a list"),
])
def test_a_malformed_toc_is_refused(change, message):
    with pytest.raises(FormatError, match=message):
        parse_toc(envelope(_broken(change)), "t")


def test_another_document_is_not_a_toc():
    with pytest.raises(FormatError, match="not a lazymount toc"):
        parse_toc(make_envelope("catalog", {}), "t")


# ------------------------------------------------------------------ relocated sizes

NEW = {SBANG: "/m/bin/sbang", OWN: "/m/linux/pkg-1.0-aaaa", DEP: "/mm/linux/dep",
       ROOT: "/mount/root/longer"}

fragments = st.sampled_from([
    OWN, DEP, ROOT, SBANG, "/", "x", "-", "_", ".", " ", "\n", "=", ":", "a/", OWN + "/lib",
    "w" + ROOT, "/x" + ROOT, ROOT + ".d", "\0", "ü",
])
texts = st.lists(fragments, max_size=30).map(lambda parts: "".join(parts).encode())
mappings = st.lists(st.sampled_from(PREFIXES), unique=True).flatmap(
    lambda olds: st.permutations(olds)).map(lambda olds: [(old, NEW[old]) for old in olds])


@settings(max_examples=400, deadline=None)
@given(texts, mappings)
def test_text_sizes_match_relocation(data, mapping):
    """relocated_size of a text file is the length relocation's own matcher gives, for any
    mapping a client may have (any subset of the prefixes, in any order)."""
    toc = sample()
    member = TocMember(f"{PREFIX}/f", "file", 0o644, len(data), "", 0, sha(data),
                       Relocation(text=count_text(data, PREFIXES)))
    rules = relocate._Rules(mapping)
    replaced = relocate._replace_text(data, rules) if rules.new_of else None
    expected = len(data if replaced is None else replaced)
    assert relocated_size(toc, member, mapping, "/m/bin/sbang") == expected


def test_a_mapping_naming_an_uncounted_prefix_is_refused():
    toc = sample()
    with pytest.raises(FormatError, match="does not count"):
        relocated_size(toc, toc.members[2], [("/elsewhere", "/x")], "/s")


def test_links_are_relocated_like_relocation_does():
    toc = sample()
    link = toc.members[5]
    assert relocated_link(toc, link, [(DEP, "/new/dep")]) == "/new/dep/lib"
    beside = TocMember(link.path, "symlink", 0o777, 0, ROOT + "x/lib", 0, "", link.relocation)
    assert relocated_link(toc, beside, [(ROOT, "/no")]) == ROOT + "x/lib"  # not at a boundary
    unlisted = TocMember(link.path, "symlink", 0o777, 0, link.link, 0, "")
    assert relocated_link(toc, unlisted, [(DEP, "/new/dep")]) == DEP + "/lib"


SCRIPTS = {
    "short": b"#!/bin/sh\necho hi\n",
    "long": b"#!" + OWN.encode() + b"/bin/" + b"p" * 140 + b" -x\nprint(1)\n",
    "lua": b"#!" + OWN.encode() + b"/" + b"d" * 140 + b"/lua\nprint(1)\n",
    "node": b"#!/" + b"n" * 140 + b"/node\n1\n",
    "php": b"#! /" + b"h" * 140 + b"/php\n<?php ?>\n",
    "grows": b"#!" + OWN.encode() + b"/" + b"g" * 100 + b"/python\n",  # long only once moved
    "shrinks": b"#!" + ROOT.encode() + b"/" + b"s" * 110 + b"/python\n",
    "noline": b"#!/" + b"z" * 200,
    "sbanged": b"#!/bin/sh " + SBANG.encode() + b"\n#!" + OWN.encode() + b"/" + b"q" * 150
    + b"\n",
}


@pytest.mark.parametrize("root", ["/mount/root/longer", "/m"])
def test_script_sizes_match_relocation_and_sbang(tmp_path: Path, root: str):
    """Real relocation and sbang over real files: every file's size is what relocated_size
    said before seeing the relocated bytes."""
    prefix = tmp_path / "p"
    (prefix / "bin").mkdir(parents=True)
    for name, data in SCRIPTS.items():
        (prefix / "bin" / name).write_bytes(data)
        os.chmod(prefix / "bin" / name, 0o755)
    new_root = f"{root}/r"
    buildinfo = BuildInfo(buildpath=ROOT, relative_prefix="linux/pkg-1.0-aaaa",
                          sbang_install_path=SBANG, hash_to_prefix={"aaaa": OWN, "bbbb": DEP},
                          relocate_textfiles=tuple(f"bin/{n}" for n in SCRIPTS),
                          relocate_binaries=(), relocate_links=(), hardlinks_deduped=True)
    new_sbang = f"{root}/bin/sbang"
    mapping = relocate.prefix_map(buildinfo, new_root, {"aaaa": f"{new_root}/pkg",
                                                        "bbbb": f"{new_root}/dep"}.get, new_sbang)
    toc = sample()
    expected = {}
    for name, data in SCRIPTS.items():
        member = TocMember(f"{PREFIX}/bin/{name}", "file", 0o755, len(data), "", 0, sha(data),
                           Relocation(count_text(data, PREFIXES),
                                      data[:tocmod.SHEBANG_HEAD]))
        expected[name] = relocated_size(toc, member, mapping, new_sbang)
    relocate.relocate_prefix(prefix, buildinfo, mapping, "pkg")
    sbang.add_sbang(prefix, new_sbang, "pkg", [f"bin/{n}" for n in SCRIPTS])
    sizes = {name: (prefix / "bin" / name).stat().st_size for name in SCRIPTS}
    assert sizes == expected
    sbanged = {n for n in SCRIPTS if (prefix / "bin" / n).read_bytes().startswith(b"#!/bin/sh ")}
    assert {"long", "lua", "node", "php", "sbanged"} <= sbanged  # the cases are what they say
    assert "short" not in sbanged and "noline" in sbanged


def test_a_copy_is_equal():  # frozen data: a client may share a parsed TOC between threads
    toc = sample()
    assert copy.deepcopy(toc) == toc and hash(toc.points[0]) == hash(toc.points[0])
    assert isinstance(toc.members[2].relocation.text[0], Occurrence)


_ = HealthCheck


def _mutations() -> st.SearchStrategy:
    """A path into the sample body and a value to put there (any JSON)."""
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20)
        | st.sampled_from(["", "dir", "file", "hardlink", "..", "/", "a/../b", "0" * 64]),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                    inner, max_size=3),
        max_leaves=8)
    return st.tuples(st.lists(st.integers(0, 12), min_size=1, max_size=4), values)


@settings(max_examples=500, deadline=None)
@given(st.lists(_mutations(), min_size=1, max_size=3))
def test_any_damage_is_a_format_error(mutations):
    """Whatever a TOC body holds, parse_toc gives a Toc or a FormatError: never another
    exception (the body comes from the network; its signature is only as good as the key)."""
    body = json.loads(json.dumps(toc_body(sample())))
    for path, value in mutations:
        node: object = body
        for step in path[:-1]:
            if isinstance(node, list) and node:
                node = node[step % len(node)]
            elif isinstance(node, dict) and node:
                node = node[sorted(node)[step % len(node)]]
        if isinstance(node, list) and node:
            node[path[-1] % len(node)] = value
        elif isinstance(node, dict) and node:
            node[sorted(node)[path[-1] % len(node)]] = value
    try:
        parse_toc(envelope(body), "t")
    except FormatError:
        pass
