"""The choice of the best build for a CPU, from the index alone (archspec's real graph), and
what status says of it."""

from __future__ import annotations

import json
from pathlib import Path

import archspec.cpu
import pytest
import trio

from lazymount.buildcache.index import parse_index
from lazymount.catalog.hosttarget import (
    Build,
    HostTarget,
    HostView,
    microarchitecture,
    runnable_tree,
    unknown_target,
    version_key,
)
from lazymount.catalog.installtree import InstallTree
from lazymount.errors import UsageError
from lazymount.serve.hostdir import HostDirs
from lazymount.service.statustext import render_status


def build(target: str, version: str = "1.0", name: str = "app", mirror: int = 0,
          dag_hash: str | None = None) -> Build:
    return Build(dag_hash or f"{target}-{version}-{mirror}", name, version, target, mirror)


def test_a_build_runs_on_its_target_and_its_descendants_only():
    zen3 = HostTarget("zen3")
    assert zen3.runs("x86_64_v3") and zen3.runs("x86_64") and zen3.runs("zen3")
    assert not zen3.runs("x86_64_v4") and not zen3.runs("zen4")
    v3 = HostTarget("x86_64_v3")
    assert not v3.runs("x86_64_v4") and not v3.runs("haswell")
    assert HostTarget("zen2").why_not("x86_64_v4") == "built for x86_64_v4; this CPU is zen2"
    assert zen3.why_not("x86_64_v3") is None


def test_another_family_never_runs():
    host = HostTarget("zen2")
    assert not host.runs("aarch64") and not host.runs("neoverse_v1")
    assert host.why_not("neoverse_v1") == ("built for neoverse_v1 (aarch64); this CPU is zen2 "
                                           "(x86_64)")
    assert not HostTarget("neoverse_v1").runs("x86_64")
    assert "archspec does not know" in (host.why_not("nosuchcpu") or "")
    assert not host.runs("")


def test_most_specific_runnable_target_wins():
    builds = [build("x86_64"), build("x86_64_v3"), build("x86_64_v4"), build("haswell"),
              build("aarch64")]
    assert HostView.choose(HostTarget("zen2"), builds).chosen("app", "1.0").target == "x86_64_v3"
    assert HostView.choose(HostTarget("x86_64"), builds).chosen("app", "1.0").target == "x86_64"
    # icelake descends from both haswell and x86_64_v4: the deeper one in the graph wins
    icelake = HostView.choose(HostTarget("icelake"), builds).chosen("app", "1.0")
    assert icelake.target == max(["haswell", "x86_64_v4"],
                                 key=lambda t: len(archspec.cpu.TARGETS[t].ancestors))


def test_ties_are_broken_by_mirror_order_then_hash():
    host = HostTarget("x86_64_v3")
    builds = [build("x86_64_v3", mirror=1, dag_hash="a" * 32),
              build("x86_64_v3", mirror=0, dag_hash="c" * 32),
              build("x86_64_v3", mirror=0, dag_hash="b" * 32)]
    assert HostView.choose(host, builds).chosen("app", "1.0").dag_hash == "b" * 32
    # the same whatever order the index lists them in
    assert HostView.choose(host, builds[::-1]).chosen("app", "1.0").dag_hash == "b" * 32


def test_alternatives_list_every_build_best_first_with_reasons():
    view = HostView.choose(HostTarget("x86_64_v3"),
                           [build("x86_64"), build("x86_64_v4"), build("x86_64_v3")])
    alternatives = view.alternatives("app", "1.0")
    assert [a.build.target for a in alternatives] == ["x86_64_v3", "x86_64", "x86_64_v4"]
    assert [a.reason for a in alternatives] == [
        None, None, "built for x86_64_v4; this CPU is x86_64_v3"]


def test_names_without_a_runnable_build_are_absent_and_newest_version_is_default():
    view = HostView.choose(HostTarget("x86_64_v2"), [
        build("x86_64_v4", name="fast"), build("x86_64", "1.9"), build("x86_64", "1.10"),
        build("x86_64_v4", "2.0")])
    assert view.names() == ["app"]
    assert view.versions("app") == ["1.10", "1.9"]
    assert view.newest("app") == "1.10"
    assert view.chosen("fast", "1.0") is None


def test_version_order():
    ordered = ["0.9", "1.0", "1.0.1", "1.2", "1.10", "2.0", "develop"]
    assert sorted(reversed(ordered), key=version_key) == ordered


def test_unknown_host_target_lists_close_names():
    with pytest.raises(UsageError) as error:
        microarchitecture("x86_64_v5")
    assert "unknown host target 'x86_64_v5'" in str(error.value)
    assert "x86_64_v4" in str(error.value)
    assert "icelake" in (unknown_target("icelak") or "")
    assert unknown_target("zen2") is None


def test_no_override_is_archspecs_host():
    assert HostTarget().name == archspec.cpu.host().name


def microarch_tree(root: str = "/m") -> InstallTree:
    cache = Path(__file__).parent / "data" / "v3-microarch"
    manifest = json.loads((cache / "v3/manifests/index/index.manifest.json").read_text())
    digest = manifest["data"][0]["checksum"]
    blob = (cache / "blobs" / "sha256" / digest[:2] / digest).read_bytes()
    return InstallTree(root, parse_index(blob))


def test_status_of_a_build_names_its_target_and_the_alternatives():
    host = HostDirs(microarch_tree(), HostTarget("x86_64_v3"))
    v4 = "exfln2zwtmp75cp3zsvdpsahm4vcbn5d"
    info = trio.run(host.status_of, v4)
    assert (info["target"], info["runs_here"], info["chosen_for_host"]) == (
        "x86_64_v4", False, False)
    assert info["why_not"] == "built for x86_64_v4; this CPU is x86_64_v3"
    assert [a["target"] for a in info["alternatives"]] == ["x86_64_v3", "x86_64", "x86_64_v4"]
    assert info["alternatives"][0]["prefix"] == (
        "/m/linux-x86_64_v3/lmisa-1.0-prrygt2dakmpexbzbai7klilta3wmjy6")
    text = "\n".join(render_status(info))
    assert "does not run here: built for x86_64_v4; this CPU is x86_64_v3" in text
    assert "builds of this version, best for x86_64_v3 first:" in text
    chosen = trio.run(host.status_of, "prrygt2dakmpexbzbai7klilta3wmjy6")
    assert chosen["runs_here"] and chosen["chosen_for_host"]
    assert "host/ chooses it" in render_status(chosen)[0]


def test_a_path_hidden_by_targets_host_is_found_in_the_whole_tree():
    tree = microarch_tree()
    host = HostTarget("x86_64_v3")
    shown = runnable_tree(tree, host)
    hidden = "linux-x86_64_v4/lmisa-1.0-exfln2zwtmp75cp3zsvdpsahm4vcbn5d/bin/isa"
    assert "linux-x86_64_v4" not in shown.dirs[""]
    assert HostDirs(tree, host).hidden_at(hidden) == "exfln2zwtmp75cp3zsvdpsahm4vcbn5d"
    assert HostDirs(tree, host).hidden_at("linux-x86_64_v4") is None
    assert len(shown.prefixes) == 5 and len(tree.prefixes) == 7
