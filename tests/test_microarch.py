"""Mixed clusters: ``host/`` leads each CPU to the best build it runs, ``--targets host`` hides
the rest, and nothing of this fetches a byte.

The cache (``data/v3-microarch``, see its ``.md``) was built by Spack 1.1 for three targets:
lmisa@1.0 and its library lmisalib for x86_64, x86_64_v3 and x86_64_v4, and lmisa@1.1 for
x86_64. Its program prints the level its compiler targeted. Served over loopback HTTP and
mounted with real FUSE.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import archspec.cpu
import pytest
from conftest import DATA, MODULES_INIT, lazymount_command, lmod_executable

CACHE = DATA / "v3-microarch"
LMISA = {  # lmisa@1.0 per target
    "x86_64": "lmisa-1.0-jbbyvew5yw62wys6zcag5xcbafwnagsg",
    "x86_64_v3": "lmisa-1.0-prrygt2dakmpexbzbai7klilta3wmjy6",
    "x86_64_v4": "lmisa-1.0-exfln2zwtmp75cp3zsvdpsahm4vcbn5d",
}
LMISA_11 = "lmisa-1.1-h5kthvszmvxhtnkwfkbx3qidbr4wlrlk"
HOST = archspec.cpu.host()


def this_cpu_runs(target: str) -> bool:
    return HOST.name == target or target in {a.name for a in HOST.ancestors}


def run_isa(path: Path) -> list[str]:
    result = subprocess.run([str(path / "bin" / "isa")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def served(http_server):
    return http_server(CACHE)


def test_x86_64_v3_host_gets_the_v3_build_and_it_runs(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3",))
    link = mount.root / "host" / "lmisa" / "1.0"
    assert os.readlink(link) == f"{mount.root}/linux-x86_64_v3/{LMISA['x86_64_v3']}"
    if not this_cpu_runs("x86_64_v3"):
        pytest.skip(f"this CPU ({HOST.name}) cannot run an x86_64_v3 build")
    own, library = run_isa(link)
    assert own == "lmisa 1.0 built for x86_64_v3"
    assert library.startswith("libisa built for x86_64_v3 at ")
    assert library.split(" at ")[1].lstrip("/") == (
        f"{mount.root}/linux-x86_64_v3/lmisalib-1.0-57y2bf7zoatafcu63nwf5dyp4p6qk26p"
        .lstrip("/"))


def test_generic_host_gets_the_generic_build_and_default_is_the_newest(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64",))
    host = mount.root / "host"
    assert sorted(os.listdir(host)) == ["lmisa", "lmisalib"]
    assert sorted(os.listdir(host / "lmisa")) == ["1.0", "1.1", "default"]
    assert os.readlink(host / "lmisa" / "1.0") == f"{mount.root}/linux-x86_64/{LMISA['x86_64']}"
    assert os.readlink(host / "lmisa" / "1.1") == f"{mount.root}/linux-x86_64/{LMISA_11}"
    assert os.readlink(host / "lmisa" / "default") == "1.1"
    assert run_isa(host / "lmisa" / "1.0")[0] == "lmisa 1.0 built for x86_64"
    assert run_isa(host / "lmisa" / "default")[0] == "lmisa 1.1 built for x86_64"


def test_without_override_archspecs_host_decides(served, mount_cache):
    mount = mount_cache([served.url])
    runnable = [t for t in LMISA if this_cpu_runs(t)]
    best = max(runnable, key=lambda t: len(archspec.cpu.TARGETS[t].ancestors))
    link = mount.root / "host" / "lmisa" / "1.0"
    assert os.readlink(link) == f"{mount.root}/linux-{best}/{LMISA[best]}"
    assert run_isa(link)[0] == f"lmisa 1.0 built for {best}"


def test_listing_host_fetches_and_materializes_nothing(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v4",))
    before = list(served.requests)
    seen = []
    for directory, subdirs, files in os.walk(mount.root / "host"):
        for name in subdirs + files:
            path = Path(directory) / name
            seen.append((path.relative_to(mount.root), os.lstat(path).st_mode,
                         os.readlink(path) if path.is_symlink() else None))
    assert len(seen) == 2 + 3 + 2  # two names; lmisa: 1.0 1.1 default; lmisalib: 1.0 default
    assert served.requests == before
    for target, name in LMISA.items():
        prefix = mount.root / f"linux-{target}" / name
        assert os.getxattr(prefix, "user.lazymount.status") == b"absent"


def test_targets_host_hides_what_this_cpu_cannot_run(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3", "--targets=host"))
    assert "linux-x86_64_v4" not in os.listdir(mount.root)
    assert not (mount.root / "linux-x86_64_v4" / LMISA["x86_64_v4"]).exists()
    assert sorted(os.listdir(mount.root / "linux-x86_64_v3")) == [
        LMISA["x86_64_v3"], "lmisalib-1.0-57y2bf7zoatafcu63nwf5dyp4p6qk26p"]
    assert LMISA["x86_64"] in os.listdir(mount.root / "linux-x86_64")
    # Spack's upstream database is unchanged: it still lists every build
    database = json.loads((mount.root / ".spack-db" / "index.json").read_text())
    paths = {r["path"] for r in database["database"]["installs"].values() if r.get("path")}
    assert f"{mount.root}/linux-x86_64_v4/{LMISA['x86_64_v4']}" in paths


def test_a_build_this_cpu_cannot_run_says_why_and_is_logged_when_used(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3",))
    foreign = mount.root / "linux-x86_64_v4" / LMISA["x86_64_v4"]
    assert os.getxattr(foreign, "user.lazymount.target").decode() == (
        "x86_64_v4: does not run here: built for x86_64_v4; this CPU is x86_64_v3")
    own = mount.root / "linux-x86_64_v3" / LMISA["x86_64_v3"]
    assert os.getxattr(own, "user.lazymount.target").decode() == (
        "x86_64_v3: runs on this CPU (x86_64_v3)")
    assert "bin" in os.listdir(foreign)  # materialized all the same
    assert ("lmisa-1.0-exfln2z: built for x86_64_v4; this CPU is x86_64_v3: materializing it "
            "anyway") in mount.log_text()
    assert "lmisa-1.0-prrygt2: built for" not in mount.log_text()


def test_host_name_directory_lists_the_choice_and_its_alternatives(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3",))
    text = os.getxattr(mount.root / "host" / "lmisa", "user.lazymount.choice").decode()
    assert text.splitlines() == [
        "lmisa@1.1 x86_64 h5kthvszmvxhtnkwfkbx3qidbr4wlrlk: chosen",
        "lmisa@1.0 x86_64_v3 prrygt2dakmpexbzbai7klilta3wmjy6: chosen",
        "lmisa@1.0 x86_64 jbbyvew5yw62wys6zcag5xcbafwnagsg: runs here",
        "lmisa@1.0 x86_64_v4 exfln2zwtmp75cp3zsvdpsahm4vcbn5d: built for x86_64_v4; this CPU "
        "is x86_64_v3",
    ]


def test_no_runnable_build_means_no_name(served, mount_cache):
    # an aarch64 node sees none of these x86_64 builds
    mount = mount_cache([served.url], extra=("--host-target=neoverse_v1",))
    assert os.listdir(mount.root / "host") == []
    with pytest.raises(FileNotFoundError):
        os.lstat(mount.root / "host" / "lmisa")


def test_unknown_host_target_is_refused_with_close_names(tmp_path):
    result = subprocess.run(lazymount_command("--mirror", str(CACHE), "--host-target",
                                              "x86_64_v5", str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown host target 'x86_64_v5'" in result.stderr
    assert "close names: x86_64_v4" in result.stderr


def test_config_file_sets_host_target_and_targets(served, mount_cache, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[defaults]\nhost_target = "x86_64"\ntargets = "host"\n')
    mount = mount_cache([served.url], extra=(f"--config={config}",))
    assert sorted(os.listdir(mount.root)) == [
        ".spack-db", "bin", "host", "linux-x86_64", "modules"]
    assert os.readlink(mount.root / "host" / "lmisa" / "1.0").endswith(LMISA["x86_64"])
    config.write_text('[defaults]\nhost_target = "zen9"\n')
    result = subprocess.run(lazymount_command(f"--config={config}", "--mirror", str(CACHE),
                                              str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "host_target" in result.stderr
    assert "close names: zen" in result.stderr


def test_host_entries_are_read_only(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64",))
    with pytest.raises(OSError) as error:
        os.symlink("x", mount.root / "host" / "lmisa" / "new")
    assert error.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def test_no_host_view_leaves_host_out(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3", "--no-host-view"))
    assert "host" not in os.listdir(mount.root)
    foreign = mount.root / "linux-x86_64_v4" / LMISA["x86_64_v4"]
    assert os.getxattr(foreign, "user.lazymount.target").decode().startswith(
        "x86_64_v4: does not run here")


def test_real_spack_still_sees_every_build_with_targets_host(served, mount_cache, spack):
    """Spack's upstream database is the same with --targets host: a downstream Spack lists the
    x86_64_v4 build the mount hides (needs LAZYMOUNT_TEST_SPACK)."""
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3", "--targets=host"))
    spack.upstream("lazymount", mount.root)
    found = spack("find", "--format", "{name}-{version}-{hash} {arch.target}").stdout
    lines = set(found.split("\n"))
    for target, name in LMISA.items():
        assert f"{name} {target}" in lines, found
    assert f"{LMISA_11} x86_64" in lines


def lazymount_status(*args: str) -> str:
    result = subprocess.run(lazymount_command("status", *args), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_of_a_host_path_names_the_build_and_its_alternatives(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3",))
    before = list(served.requests)
    text = lazymount_status(str(mount.root / "host" / "lmisa" / "1.0" / "bin" / "isa"))
    lines = text.splitlines()
    assert lines[0] == (f"{mount.root}/linux-x86_64_v3/{LMISA['x86_64_v3']}: "
                        "lmisa-1.0-prrygt2: absent")
    assert lines[1] == "  target: x86_64_v3, runs on this CPU (x86_64_v3); host/ chooses it"
    assert lines[2] == "  builds of this version, best for x86_64_v3 first:"
    assert [line.split()[0] for line in lines[3:]] == ["x86_64_v3", "x86_64", "x86_64_v4"]
    assert lines[5].endswith("(built for x86_64_v4; this CPU is x86_64_v3)")
    foreign = lazymount_status(str(mount.root / "linux-x86_64_v4" / LMISA["x86_64_v4"]))
    assert ("target: x86_64_v4, does not run here: built for x86_64_v4; this CPU is x86_64_v3"
            in foreign)
    whole = lazymount_status(str(mount.root))
    assert "host:     x86_64_v3 (--host-target); shows every build, host/ served" in whole
    assert served.requests == before  # all from the index


def test_status_of_a_hidden_build_says_why_it_is_hidden(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3", "--targets=host"))
    text = lazymount_status(str(mount.root / "linux-x86_64_v4" / LMISA["x86_64_v4"] / "bin"))
    assert text.splitlines()[0] == (
        f"{mount.root}/linux-x86_64_v4/{LMISA['x86_64_v4']}: lmisa-1.0-exfln2z: hidden: "
        "targets = host hides it: built for x86_64_v4; this CPU is x86_64_v3")
    assert "shows only the builds it runs" in lazymount_status(str(mount.root))
    metrics = lazymount_status("--prometheus", str(mount.root))
    assert 'host_target="x86_64_v3"' in metrics


def module_shell(kind: str, modulepath: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash with the ``module`` command of Environment Modules (tcl) or
    Lmod (lmod) and only ``modulepath`` on MODULEPATH."""
    if kind == "tcl":
        assert MODULES_INIT.exists(), "apt-get install environment-modules (scripts/setup.sh)"
        setup = f"source {MODULES_INIT}; module purge; export MODULEPATH={modulepath}\n"
    else:
        setup = (f'module() {{ eval "$({lmod_executable()} bash "$@")"; }}; '
                 f"export MODULEPATH={modulepath}\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODULE", "LMOD", "LOADEDMODULES", "_LMFILES_"))}
    return subprocess.run(["bash", "-c", setup + script], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", ["tcl", "lmod"])
def test_module_avail_lists_each_version_once_and_load_takes_the_hosts_build(
        kind, served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3",))
    before = list(served.requests)
    host_tree = mount.root / "modules" / "host" / kind
    avail = module_shell(kind, host_tree, "module -t avail 2>&1")
    assert avail.returncode == 0, avail.stderr
    names = [line.split("(")[0].strip() for line in avail.stdout.splitlines()
             if line.startswith("lmisa") and not line.endswith("/")]
    assert sorted(names) == ["lmisa/1.0", "lmisa/1.1", "lmisalib/1.0"], avail.stdout
    assert served.requests == before  # listing modules fetched nothing
    # the per-target Lmod tree (one folder per family) has three lmisa@1.0 builds
    if kind == "lmod":
        core = mount.root / "modules/lmod/linux-debian12-x86_64/Core"
        every = module_shell(kind, core, "module -t avail 2>&1").stdout
        assert sum(line.startswith("lmisa/1.0-") for line in every.splitlines()) == 3, every
    loaded = module_shell(kind, host_tree, """
        module load lmisa || exit 1
        isa || exit 2
        module purge
        module load lmisa/1.0 || exit 3
        isa || exit 4
        module list 2>&1
    """)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    lines = loaded.stdout.splitlines()
    assert lines[0] == "lmisa 1.1 built for x86_64"  # the default: the newest version
    assert "linux-x86_64/lmisalib-1.0-qhrbeah" in lines[1]  # the library it was linked with
    if this_cpu_runs("x86_64_v3"):
        assert lines[2] == "lmisa 1.0 built for x86_64_v3"
    assert "lmisalib/1.0" in loaded.stdout  # autoloaded: the host's build of the library


def test_host_module_sets_the_paths_of_the_build_it_was_linked_with(served, mount_cache):
    mount = mount_cache([served.url], extra=("--host-target=x86_64_v3",))
    tcl = (mount.root / "modules/host/tcl/lmisa/1.0").read_text()
    assert "module load lmisalib/1.0" in tcl  # the host's choice: its host module
    assert f"{mount.root}/linux-x86_64_v3/{LMISA['x86_64_v3']}/bin" in tcl
    generic = (mount.root / "modules/host/tcl/lmisa/1.1").read_text()
    # lmisa@1.1 is generic; its lmisalib is the generic one, not the host's choice
    assert "module load" not in generic
    assert f"{mount.root}/linux-x86_64/lmisalib-1.0-qhrbeahyp5drfxvooar76ca2ylpy6vej/bin" in (
        generic)
    assert (mount.root / "modules/host/tcl/lmisa/.version").read_text().endswith('"1.1"\n')
    assert os.readlink(mount.root / "modules/host/lmod/lmisa/default") == "1.1.lua"
