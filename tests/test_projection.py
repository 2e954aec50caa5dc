"""Install-tree projections other than Spack's default: where packages appear, that their
dependencies are relocated with the same projection, and ``{compiler.*}`` of spec-v5 nodes
(derived from the c/cxx/fortran dependency, as Spack 1.x does)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURE_CACHE, lazymount_command
from hypothesis import given
from hypothesis import strategies as st
from strategies import FAST

from lazymount.buildcache.index import parse_index
from lazymount.buildcache.layout import project, projector
from lazymount.catalog.installtree import InstallTree
from lazymount.errors import FormatError

INDEX_BLOB = (FIXTURE_CACHE / "blobs/sha256/37"
              / "371e373d1420f06e93b3853bdd35c0b810f8f18913ca67e6999c5c332b61bdb0")
HELLO = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
RUNTIME = "oe3jjjgkiiftiqrrr7neyq75fjxluf3n"


def catalog():
    return parse_index(INDEX_BLOB.read_bytes())


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60)


# ---- the projector (placing many specs) agrees with project ----------------------------------

TOKENS = ["{name}", "{version}", "{hash}", "{hash:7}", "{namespace}", "{architecture}",
          "{architecture.platform}", "{architecture.os}", "{architecture.target}",
          "{compiler.name}", "{compiler.version}"]
texts = st.text(st.sampled_from("aZ9-_.+ /{}é@"), max_size=6)
projections = st.lists(st.lists(st.sampled_from(TOKENS) | texts, min_size=1, max_size=4)
                       .map("".join), min_size=1, max_size=3).map("/".join)
facts = st.fixed_dictionaries({}, optional={
    "namespace": texts,
    "arch": st.fixed_dictionaries({"platform": texts, "platform_os": texts,
                                   "target": texts | st.fixed_dictionaries({"name": texts})}),
    "compiler": st.fixed_dictionaries({"name": texts, "version": texts}),
    "annotations": st.fixed_dictionaries({"compiler": texts}),
    "dependencies": st.lists(st.fixed_dictionaries({
        "name": texts, "hash": st.sampled_from(["a" * 32, "b" * 32]),
        "parameters": st.fixed_dictionaries({"virtuals": st.lists(
            st.sampled_from(["c", "cxx", "fortran", "mpi"]))})}), max_size=2),
})


@FAST
@given(projections, facts, texts, texts)
def test_projector_places_as_project_does(projection, fields, name, version):
    known = {"a" * 32: {"name": "gcc", "version": "12.{2}"}}
    node = {"name": name, "version": version, "hash": "c" * 32, **fields}

    def outcome(place: Callable[[], str]) -> str:
        try:
            return place()
        except FormatError as exc:
            return f"refused: {exc}"

    assert outcome(lambda: projector(projection, fields, known.get)(name, version, "c" * 32)) \
        == outcome(lambda: project(projection, node, known.get))


# ---- {compiler.name} / {compiler.version} ----------------------------------------------------


def test_compiler_of_a_v5_node_is_its_c_dependency():
    records = catalog()
    lookup = InstallTree("/x", records).node_of
    template = "{compiler.name}-{compiler.version}/{name}"
    assert project(template, records[HELLO].node, lookup) == "gcc-12.2.0/lmhello"


def test_a_node_built_without_a_compiler_gets_none():
    """gcc-runtime depends on gcc for building, but not as a c/cxx/fortran provider."""
    records = catalog()
    lookup = InstallTree("/x", records).node_of
    node = records[RUNTIME].node
    assert project("{compiler.name}-{compiler.version}/{name}", node, lookup) == (
        "none-none/gcc-runtime")


def test_cxx_then_fortran_when_there_is_no_c_provider():
    node = {"name": "f", "version": "1", "hash": "f" * 32, "dependencies": [
        {"name": "flang", "hash": "a" * 32, "parameters": {"deptypes": ["build"],
                                                          "virtuals": ["fortran"]}},
        {"name": "clang", "hash": "b" * 32, "parameters": {"deptypes": ["build"],
                                                          "virtuals": ["cxx"]}}]}
    nodes = {"a" * 32: {"name": "flang", "version": "19"},
             "b" * 32: {"name": "clang", "version": "18.1"}}
    assert project("{compiler.name}-{compiler.version}", node, nodes.get) == "clang-18.1"
    # a compiler missing from the catalog still gives its name
    assert project("{compiler.name}-{compiler.version}", node, {}.get) == "clang-"


def test_an_old_spec_keeps_its_own_compiler():
    node = {"name": "z", "version": "1", "hash": "z" * 32,
            "compiler": {"name": "gcc", "version": "12.2.0"},
            "dependencies": [{"name": "clang", "hash": "b" * 32,
                              "parameters": {"deptypes": ["build"], "virtuals": ["c"]}}]}
    assert project("{compiler.name}-{compiler.version}", node,
                   {"b" * 32: {"name": "clang", "version": "18"}}.get) == "gcc-12.2.0"


# ---- mounted with another projection ---------------------------------------------------------


def test_relocated_hello_runs_under_a_short_projection(http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    mount = mount_cache([server.url], extra=("--projection={name}/{version}-{hash:7}",))
    root = mount.root
    assert sorted(p.name for p in root.iterdir()) == [
        ".spack-db", "bin", "host", "lmgreet", "lmhello", "modules"]
    hello_prefix = root / "lmhello" / "1.0-3vgakfz"
    greet_prefix = root / "lmgreet" / "1.0-2zsd6bn"
    result = run(hello_prefix / "bin" / "hello", "-v")
    assert result.returncode == 0, result.stderr + mount.log_text()
    assert "Hello from lmgreet, world!" in result.stdout
    assert "/tmp/lm/opt/spack" not in result.stdout
    # the dependency was relocated to its place under the same projection
    dynamic = subprocess.run(["readelf", "-d", str(hello_prefix / "bin" / "hello")],
                             capture_output=True, text=True, check=True).stdout
    assert f"{greet_prefix}/lib" in dynamic
    greet_pc = (greet_prefix / "lib" / "pkgconfig" / "greet.pc").read_text()
    assert str(greet_prefix) in greet_pc and "/tmp/lm/opt" not in greet_pc
    assert str(hello_prefix) in (hello_prefix / "bin" / "hello-wrapper").read_text()
    # the upstream database and spack-config agree with the projection
    db = json.loads((root / ".spack-db" / "index.json").read_bytes())["database"]["installs"]
    assert db[HELLO]["path"] == str(hello_prefix)
    assert db[RUNTIME]["path"] == f"{root}/gcc-runtime/12.2.0-oe3jjjg"
    config = subprocess.run(lazymount_command("spack-config", str(root)), capture_output=True,
                            text=True, timeout=60)
    assert config.returncode == 0 and config.stderr == ""
    assert "projection {name}/{version}-{hash:7}" in config.stdout
    assert yaml.safe_load(config.stdout) == {"upstreams": {"lazymount": {
        "install_tree": str(root),
        "modules": {"tcl": f"{root}/modules/tcl", "lmod": f"{root}/modules/lmod"}}}}


def test_compiler_projection_places_and_runs_packages(http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    mount = mount_cache([server.url], extra=("--projection={compiler.name}/{name}-{hash:8}",))
    assert sorted(p.name for p in (mount.root / "gcc").iterdir()) == [
        "lmgreet-2zsd6bn2", "lmhello-3vgakfze"]
    result = run(mount.root / "gcc" / "lmhello-3vgakfze" / "bin" / "hello", "-v")
    assert "Hello from lmgreet, world!" in result.stdout, result.stderr + mount.log_text()
    assert f"{mount.root}/gcc/lmgreet-2zsd6bn2" in result.stdout


@pytest.mark.parametrize("projection", ["{nonsense}/{name}", "{name}/../{hash}"])
def test_an_unusable_projection_shows_nothing_and_says_why(http_server, mount_cache,
                                                           projection):
    mount = mount_cache([http_server(FIXTURE_CACHE).url], extra=(f"--projection={projection}",))
    assert sorted(p.name for p in mount.root.iterdir()) == [
        ".spack-db", "bin", "host", "modules"]
    log = mount.log_text()
    assert "not shown" in log and "lmhello" in log
