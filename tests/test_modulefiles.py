"""Module files made from the index: their names and places (as Spack 1.1's defaults make
them; the real-Spack tier compares them with Spack's own), contents, index files, and a
hostile index that must not reach Tcl or Lua."""

from __future__ import annotations

import os

import spackcache as sc
import yaml
from conftest import FIXTURE_CACHE

from lazymount.buildcache.index import merge_indexes, parse_index
from lazymount.catalog.installtree import InstallTree
from lazymount.spack.modulefiles import LMOD, TCL, ModuleTree, installed_hashes

INDEX_SHA = "371e373d1420f06e93b3853bdd35c0b810f8f18913ca67e6999c5c332b61bdb0"
INDEX_BLOB = FIXTURE_CACHE / "blobs/sha256/37" / INDEX_SHA
ROOT = "/tmp/lmx"
HELLO = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
RUNTIME = "oe3jjjgkiiftiqrrr7neyq75fjxluf3n"  # listed, not in the cache: no module
GLIBC = "2dxfl3zus4n6g2gz4iarmmuluwuxaqmn"  # an external at /usr
HELLO_PREFIX = f"{ROOT}/linux-x86_64/lmhello-1.0-{HELLO}"


def fixture_modules(*more: dict) -> ModuleTree:
    catalog = merge_indexes([parse_index(INDEX_BLOB.read_bytes()), *more])
    return ModuleTree.build(InstallTree(ROOT, catalog)).lay_out()


def test_names_and_places_follow_spacks_default_layouts():
    modules = fixture_modules()
    assert set(modules.by_hash[TCL]) == set(installed_hashes(modules.tree))
    assert RUNTIME not in modules.by_hash[TCL]
    tcl, lmod = modules.by_hash[TCL][HELLO], modules.by_hash[LMOD][HELLO]
    assert tcl.use_name == "lmhello/1.0-gcc-12.2.0-3vgakfz"
    assert tcl.relative == "modules/tcl/linux-debian12-x86_64/lmhello/1.0-gcc-12.2.0-3vgakfz"
    assert lmod.use_name == "lmhello/1.0-3vgakfz"
    assert lmod.relative == "modules/lmod/linux-debian12-x86_64/Core/lmhello/1.0-3vgakfz.lua"
    # an external built without a compiler
    assert modules.by_hash[TCL][GLIBC].use_name == "glibc/2.36-none-none-2dxfl3z"
    assert modules.dirs["modules"] == {"tcl", "lmod"}
    assert modules.dirs["modules/tcl"] == {"linux-debian12-x86_64", "module-index.yaml"}
    assert modules.is_dir("modules/lmod/linux-debian12-x86_64/Core/lmhello")
    assert modules.is_file(lmod.relative) and not modules.is_dir(lmod.relative)


def test_a_tcl_module_autoloads_its_direct_run_and_link_deps_and_sets_the_inspections():
    modules = fixture_modules()
    text = modules.text(modules.by_hash[TCL][HELLO].relative).decode()
    assert text.startswith("#%Module1.0\n")
    # gcc-runtime has no module (not in the cache): it is left out, not a failing load
    assert ("    module load glibc/2.36-none-none-2dxfl3z\n"
            "    module load lmgreet/1.0-gcc-12.2.0-2zsd6bn\n") in text
    assert "    depends-on lmgreet/1.0-gcc-12.2.0-2zsd6bn\n" in text
    assert "gcc-runtime" not in text
    assert f"prepend-path PATH {{{HELLO_PREFIX}/bin}}\n" in text
    assert f"prepend-path PKG_CONFIG_PATH {{{HELLO_PREFIX}/lib64/pkgconfig}}\n" in text
    assert f"prepend-path CMAKE_PREFIX_PATH {{{HELLO_PREFIX}/.}}\n" in text
    assert text.endswith("append-path MANPATH {}\n")


def test_a_lua_module_has_the_same_content_for_lmod():
    modules = fixture_modules()
    text = modules.text(modules.by_hash[LMOD][HELLO].relative).decode()
    assert 'depends_on("lmgreet/1.0-2zsd6bn")\n' in text
    assert f'prepend_path("PATH", "{HELLO_PREFIX}/bin", ":")\n' in text
    assert text.endswith('append_path("MANPATH", "", ":")\n')


def test_an_external_gets_its_existing_directories_but_no_system_directory():
    """glibc at /usr: like Spack, no PATH=/usr/bin or CMAKE_PREFIX_PATH=/usr, but the
    inspected directories of /usr that exist and are not system directories."""
    modules = fixture_modules()
    text = modules.text(modules.by_hash[TCL][GLIBC].relative).decode()
    assert "prepend-path PATH" not in text and "CMAKE_PREFIX_PATH" not in text
    for line in text.splitlines():
        if line.startswith("prepend-path"):
            assert os.path.isdir(line.split("{")[1].rstrip("}")), line


def test_module_index_is_what_spack_reads():
    modules = fixture_modules()
    for kind in (TCL, LMOD):
        index = yaml.safe_load(modules.text(f"modules/{kind}/module-index.yaml"))
        assert set(index["module_index"]) == set(modules.by_hash[kind])
        entry = index["module_index"][HELLO]
        module = modules.by_hash[kind][HELLO]
        assert entry == {"path": f"{ROOT}/{module.relative}", "use_name": module.use_name}


def test_an_old_spec_names_its_own_compiler(tmp_path):
    old = sc.Package("oldapp", compiler=("gcc", "9.4.0"))
    writer = sc.V2CacheWriter(tmp_path / "cache")
    writer.add_record(old, in_buildcache=True)
    modules = fixture_modules(parse_index(writer.write_v2_index(), mirror=1))
    assert modules.by_hash[TCL][old.dag_hash].use_name == \
        f"oldapp/1.0-gcc-9.4.0-{old.dag_hash[:7]}"


def test_a_selector_chooses_the_modules_and_autoloads_follow_it():
    catalog = parse_index(INDEX_BLOB.read_bytes())
    modules = ModuleTree.build(InstallTree(ROOT, catalog), lambda tree: [HELLO]).lay_out()
    assert set(modules.by_hash[TCL]) == {HELLO}
    text = modules.text(modules.by_hash[TCL][HELLO].relative).decode()
    assert "module load" not in text  # no module of its dependencies to load


def test_a_hostile_index_cannot_write_code_into_a_module(tmp_path):
    """Names become polite file names; an external path with Tcl/Lua syntax is not used.
    (A version with a newline is refused when the index is read: test_hostile_names.py.)"""
    evil = sc.Package('x"}]; exec', version="1;", compiler=("gcc", "1"),
                      external={"path": '/opt/a}; exec rm -rf ~; set {b', "module": None,
                                "extra_attributes": {}})
    writer = sc.V2CacheWriter(tmp_path / "cache")
    writer.add_record(evil)
    modules = fixture_modules(parse_index(writer.write_v2_index(), mirror=1))
    module = modules.by_hash[TCL][evil.dag_hash]
    assert module.use_name == f"x_____exec/1_-gcc-1-{evil.dag_hash[:7]}"
    for kind in (TCL, LMOD):
        text = modules.text(modules.by_hash[kind][evil.dag_hash].relative).decode()
        assert "rm -rf" not in text and "prepend" not in text
        assert '"}' not in text and "}]" not in text and "\n\n\n" not in text


def test_an_external_path_that_would_split_a_search_path_is_not_used(tmp_path):
    (tmp_path / "x:").mkdir()
    (tmp_path / "x:" / "bin").mkdir()
    ext = sc.external("sneaky", "1", f"{tmp_path}/x:")
    writer = sc.V2CacheWriter(tmp_path / "cache")
    writer.add_record(ext)
    modules = fixture_modules(parse_index(writer.write_v2_index(), mirror=1))
    text = modules.text(modules.by_hash[TCL][ext.dag_hash].relative).decode()
    assert "prepend-path" not in text


def test_module_files_are_laid_out_only_when_asked():
    """A mount lists modules/ at once; the files below wait for the first look there."""
    modules = ModuleTree.build(InstallTree(ROOT, parse_index(INDEX_BLOB.read_bytes())))
    assert not modules.laid_out and modules.by_hash[TCL] == {}
    assert modules.dirs[""] == {"modules"}
    assert modules.lay_out().laid_out and HELLO in modules.by_hash[TCL]


def test_a_module_whose_file_name_would_be_too_long_is_left_out(tmp_path):
    """A compiler name the index makes long would give a Tcl module file name past 255
    bytes (the index bounds names and versions, not every placing field)."""
    long = sc.Package("longcc", version="1", compiler=("gcc" * 60, "1" * 90))
    writer = sc.V2CacheWriter(tmp_path / "cache")
    writer.add_record(long, in_buildcache=True)
    modules = fixture_modules(parse_index(writer.write_v2_index(), mirror=1))
    assert long.dag_hash not in modules.by_hash[TCL]
    assert long.dag_hash in modules.by_hash[LMOD]  # its Lmod name has no compiler
    for relative in modules.files:
        assert all(len(part) <= 255 for part in relative.split("/"))
