"""Names an unsigned index chooses: they become paths, module files, log lines and terminal
output, so each is checked once where the index is read. A record that cannot be placed
safely (a lone surrogate, a control character, '/', a leading '.' or '-', too long) is
dropped with one escaped log line; the rest of the index mounts, refreshes and comes back
after a restart; the module systems list and load the good packages; what is printed for a
person and the log carry no control character from the index."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import MODULES_INIT, lazymount_command, lmod_executable, unmount
from hostile import ARCH_DIR, HostileCache, expect_bystander_served
from spackcache import Package

from lazymount.cli.mountcmd import setup_logging
from lazymount.service.statustext import render, render_package
from lazymount.system.printable import EscapingFilter, printable

ANSI = "\x1b]0;owned\x07\x1b[2Jansi"
FORGED = "2026-01-01 00:00:00,000 INFO forged"
# (name, version) pairs an index could hold; those a module system reads as its own or
# that cannot be written are refused, the others are placed under polite names
NAMED = [
    ("\ud800", "1.0"), ("surrogate", "\udfff"), (ANSI, "1.0"), ("ansi", "\x1b[31m1"),
    ("newline", f"1.0\n{FORGED}"), ("nl\nx", "1.0"), ("tab\tx", "1.0"), ("del\x7f", "1.0"),
    ("c1\x9b31m", "1.0"), ("ls\u2028x", "1.0"), (".modulerc", "1.0"), (".modulerc.lua", "1.0"),
    ("modrc", ".modulerc"), ("modrc", ".modulerc.lua"), ("dotver", ".version"),
    (".version", "1.0"), ("-f", "1.0"), ("--force", "1.0"), ("-", "1.0"), ("opt", "-f"),
    ("a" * 101, "1.0"), ("long", "1" * 101), ("..", "1.0"), ("dots", ".."),
]
REFUSED_NAMES = {name for name, _ in NAMED} - {"surrogate", "ansi", "newline", "modrc",
                                              "dotver", "opt", "long", "dots"}
# characters a shell, Tcl, Lua or a module system treat specially, in generated names
SPECIAL = list(" !\"#$%&'()*+,:;<=>?@[\\]^`{|}~") + ["é", "\u202e", "\x1b", "\x00", "\n"]
WORDS = ["default", "Core", "load", "module", "x.lua", "1", "00", "+x", "~x", "x@1",
         "modulerc", "version", "a" * 100, "é"]


def generated() -> list[tuple[str, str]]:
    """A few hundred hostile (name, version) pairs."""
    pairs = []
    for i, char in enumerate(SPECIAL):
        pairs += [(f"g{i}{char}n", "1.0"), (f"{char}g{i}", "1.0"), (f"gv{i}", f"1{char}0"),
                  (f"gw{i}", f"{char}1"), (f"g{i}{char}", f"{char}{char}")]
    for i, word in enumerate(WORDS):
        pairs += [(word, f"{i}.0"), (f"w{i}", word), (f"w{i}-{word}", word)]
    return pairs


def hostile_package(name: str, version: str) -> Package:
    # the stand-in package hash is made of the name's UTF-8: a surrogate has none
    return Package(name, version, package_hash=ascii(f"{name}@{version}"))


def hostile_record(name: str, version: str) -> tuple[str, dict[str, Any]]:
    pkg = hostile_package(name, version)
    return pkg.dag_hash, {"spec": pkg.node(), "ref_count": 0, "in_buildcache": True}


def placeable(name: str) -> bool:
    return 0 < len(name) <= 100 and not name.startswith((".", "-")) and not any(
        c == "/" or ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or 0xd800 <= ord(c) <= 0xdfff
        or c in "\u2028\u2029" for c in name)


def hostile_index(cache: HostileCache, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    records = cache.writer.index_records()
    records.update(hostile_record(name, version) for name, version in pairs)
    return records


def module_shell(kind: str, modulepath: Path) -> str:
    if kind == "tcl":
        return f"source {MODULES_INIT}; module purge; module use {modulepath}\n"
    return (f'module() {{ eval "$({lmod_executable()} bash "$@")"; }}; '
            f"export MODULEPATH={modulepath}\n")


def module_run(kind: str, modulepath: Path, script: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODULE", "LMOD", "LOADEDMODULES", "_LMFILES_"))}
    return subprocess.run(["bash", "-c", module_shell(kind, modulepath) + script], env=env,
                          capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def listed_modules(output: str) -> list[str]:
    """The modules ``module -t avail`` lists (not the folders, headers or markers)."""
    names = []
    for line in output.splitlines():
        line = re.sub(r"\s*\(.*\)$", "", line.strip())
        if "/" in line and not line.endswith(("/", ":")) and not line.startswith("rc="):
            names.append(line)
    return names


def batches(names: list[str]) -> list[list[str]]:
    """The modules in groups that name each package once (two versions of one package
    loaded together conflict by design)."""
    groups: list[list[str]] = []
    for name in names:
        package = name.split("/")[0]
        for group in groups:
            if all(other.split("/")[0] != package for other in group):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def check_module_systems(root: Path, good: HostileCache) -> None:
    """Both module systems list the host tree and the per-target trees without an error,
    load every module they list, and the good packages' modules set their paths."""
    trees = {"tcl": [root / "modules/host/tcl", root / "modules/tcl/linux-debian12-x86_64"],
             "lmod": [root / "modules/host/lmod",
                      root / "modules/lmod/linux-debian12-x86_64/Core"]}
    for kind, paths in trees.items():
        for path in paths:
            listed = module_run(kind, path, "module -t avail 2>&1; echo rc=$?")
            out = listed.stdout + listed.stderr
            assert "rc=0" in out and "error" not in out.lower(), f"{kind} {path}:\n{out}"
            names = listed_modules(out)
            assert any(n.startswith("bystander/") for n in names), out
            script = "".join(
                f"module purge; module load {' '.join(group)} >/dev/null 2>&1 "
                f"|| echo 'FAILED {' '.join(group)}'\n" for group in batches(names))
            loaded = module_run(kind, path, script)
            assert "FAILED" not in loaded.stdout, f"{kind} {path}:\n{loaded.stdout}"
        ran = module_run(kind, paths[0],
                         "module load bystander && module load victim && echo $PATH")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        for pkg in (good.bystander, good.victim):
            assert f"{root}/{ARCH_DIR}/{pkg.name}-1.0-{pkg.dag_hash}/bin" in ran.stdout


def status_output(root: Path, *targets: Path) -> str:
    out = []
    for target in (root, *targets):
        result = subprocess.run(lazymount_command("status", str(target)), capture_output=True,
                                text=True, timeout=60)
        out.append(result.stdout + result.stderr)
    return "".join(out)


def check_clean_output(mount, good: HostileCache, parsed: bool = True) -> None:
    """No control character from the index on a terminal or in the log: every prefix of
    the mount is touched (the hostile ones fail: they have no manifest), then status is
    asked for the mount and each failed path."""
    arch = mount.root / ARCH_DIR
    failed = []
    for entry in os.listdir(arch):
        try:
            os.listdir(arch / entry)
        except OSError:
            failed.append(arch / entry)
    assert failed  # the hostile records the index keeps are listed, and fail
    text = status_output(mount.root, *failed[:5])
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text, text
    log = mount.log_text()
    assert "\x1b" not in log and "\x07" not in log
    assert not any(line.startswith(FORGED) for line in log.splitlines()), log
    if parsed:  # not when the catalog comes from the store: the index was not read again
        assert "\\ud800" in log and "\\x1b]0;owned\\x07" in log  # dropped, shown escaped
    expect_bystander_served(mount, good)


@pytest.fixture
def caches(tmp_path: Path, signer) -> tuple[HostileCache, HostileCache]:
    """A good mirror, and a second whose index holds the hostile records with its own good
    packages."""
    good = HostileCache(tmp_path / "good", signer)
    good.finish()
    second = HostileCache(tmp_path / "second", signer)
    second.finish(hostile_index(second, NAMED + generated()))
    return good, second


def test_hostile_names_mount_refresh_and_restart_with_both_module_systems(
        caches, mount_cache, tmp_path):
    good, second = caches
    mirrors = [str(good.root), str(second.root)]
    mount = mount_cache(mirrors)
    listing = os.listdir(mount.root / ARCH_DIR)
    for name in REFUSED_NAMES:
        assert not any(entry.startswith(name) for entry in listing), (name, listing)
    check_module_systems(mount.root, good)
    check_clean_output(mount, good)

    # the index changes: one more hostile record, and a good package is added
    newcomer = Package("newcomer", files={"share/newcomer/ok.txt": "new\n"})
    second.writer.add(newcomer)
    second.finish(hostile_index(second, [("\ud801late", "1.0"), *NAMED, *generated()]))
    refreshed = subprocess.run(lazymount_command("refresh", str(mount.root)),
                               capture_output=True, text=True, timeout=120)
    assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
    assert "the index changed" in refreshed.stdout
    prefix = mount.root / ARCH_DIR / f"newcomer-1.0-{newcomer.dag_hash}"
    assert (prefix / "share/newcomer/ok.txt").read_text() == "new\n"
    assert "\\ud801late" in mount.log_text()

    # a restart on the same store comes up from the stored catalog, as good as before
    unmount(mount.root)
    assert mount.process is not None
    mount.process.wait(30)
    again = mount_cache(mirrors, store=mount.store)
    assert (again.root / ARCH_DIR / f"newcomer-1.0-{newcomer.dag_hash}").is_dir()
    check_module_systems(again.root, good)
    check_clean_output(again, good, parsed=False)


def test_every_generated_name_is_placed_or_dropped_with_one_escaped_line(caches, mount_cache):
    good, second = caches
    mount = mount_cache([str(second.root)])
    listing = os.listdir(mount.root / ARCH_DIR)
    log = mount.log_text()
    for name, version in NAMED + generated():
        dag_hash = hostile_package(name, version).dag_hash
        shown = any(entry.endswith(dag_hash) for entry in listing)
        assert shown == (placeable(name) and placeable(version)), (name, version)
    assert "\x1b" not in log and "\x00" not in log
    # the first few refusals are logged one by one, the others counted in one line
    assert "more malformed index records not shown" in log


# ---- the helpers every printed line and log record goes through ----------------------------


def test_printable_escapes_control_characters_and_surrogates():
    assert printable(f"{ANSI}\n\ud800\u2028\x9b") == \
        "\\x1b]0;owned\\x07\\x1b[2Jansi\\n\\ud800\\u2028\\x9b"
    assert printable("gcc-12.2.0 é") == "gcc-12.2.0 é"


def test_a_log_record_cannot_forge_another(tmp_path):
    log_file = tmp_path / "lazymount.log"
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # basicConfig adds nothing to a logger that has handlers
    try:
        setup_logging(False, log_file)
        logger = logging.getLogger("lazymount.test")
        logger.warning("version %s of %s", f"1.0\n{FORGED} hello", ANSI)
        try:
            raise ValueError(f"bad\n{FORGED} from an exception")
        except ValueError:
            logger.exception("failed")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved
    lines = log_file.read_text().splitlines()
    assert not any(line.startswith(FORGED) for line in lines), lines
    assert "\x1b" not in log_file.read_text()
    # each record's first line has the timestamp; every further line is indented
    assert all(line[:4].isdigit() or line.startswith("  ") for line in lines), lines


def test_escaping_filter_keeps_a_plain_message_as_it_is():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapingFilter())
    logger = logging.getLogger("lazymount.test.plain")
    logger.addHandler(handler)
    try:
        logger.warning("mounted %s (%d packages)", "/opt/spack", 3)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "mounted /opt/spack (3 packages)\n"


def test_status_renders_values_escaped():
    answer = {"path": "x", "package": ANSI, "prefix": "/opt/p", "state": "failed",
              "reason": f"no\n{FORGED}"}
    text = render_package(answer)
    assert "\x1b" not in text and text.count("\n") == 1, text
    status = {"version": "1", "mountpoint": "/m", "pid": 1, "started": "now",
              "index": {"packages": 1, "refreshed": "now", "age_s": 1},
              "packages": {"ready": 0, "materializing": 0,
                           "failed": [{"name": ANSI, "hash": "a" * 32, "reason": "\x1b[2J"}]},
              "store": {"path": "/s", "bytes": 0, "packages": 0}, "fetched_bytes": 0,
              "mirrors": []}
    assert "\x1b" not in render(status)


# ---- an index external as the real Spack sees it ---------------------------------------------

# What Spack does with an upstream external when it builds against it
# (build_environment.load_external_modules): each name of its module list goes to
# module_cmd.load_module, which runs "module show <name>" and "module load <name>" in bash.
LOAD_EXTERNAL_MODULES = """
import json, sys
import spack.store
from spack.util.module_cmd import load_module
upstream, = spack.store.STORE.db.upstream_dbs
upstream._read()
seen = {}
for h, r in upstream._data.items():
    if r.spec.external:
        seen[h] = [r.spec.external_path, r.spec.external_modules]
        for name in r.spec.external_modules or []:
            load_module(name)
json.dump(seen, sys.stdout)
"""


def test_an_index_external_reaches_spack_without_its_module_list(spack, mount_cache, tmp_path,
                                                                 signer):
    marker = tmp_path / "the-index-ran-this"
    cache = HostileCache(tmp_path / "cache", signer)
    sneaky = Package("lmext", external={"path": "/usr", "extra_attributes": {},
                                        "module": [f"lmext; touch {marker}"]})
    relative = Package("lmrel", external={"path": "usr/../../tmp", "module": None,
                                          "extra_attributes": {}})
    climbing = Package("lmclimb", external={"path": "/usr/../tmp", "module": None,
                                            "extra_attributes": {}})
    records = cache.writer.index_records()
    for pkg in (sneaky, relative, climbing):
        records[pkg.dag_hash] = {"spec": pkg.node(), "ref_count": 0, "in_buildcache": False}
    cache.finish(records)
    mount = mount_cache([str(cache.root)])
    spack.upstream("lazymount", mount.root)
    script = tmp_path / "load_external_modules.py"
    script.write_text(LOAD_EXTERNAL_MODULES)
    result = spack("python", str(script), check=False)
    assert not marker.exists(), result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout)
    assert seen[sneaky.dag_hash] == ["/usr", None]  # kept, without its modules
    assert relative.dag_hash not in seen and climbing.dag_hash not in seen
    for pkg in (relative, climbing):
        lines = [line for line in mount.log_text().splitlines() if pkg.dag_hash in line]
        assert len(lines) == 1 and "is not an absolute path" in lines[0], mount.log_text()
