"""The mount as the real Spack 1.1 sees it: an upstream install tree whose database Spack
reads, whose packages ``spack find``/``location``/``load`` reach and ``spack install`` reuses.

The mixed mount holds the four mirrors of mixedcaches.py (v2, migrated, v3, and a DAG across
mirrors and spec formats). Needs LAZYMOUNT_TEST_SPACK (see realspack.py);
skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import yaml
from conftest import FIXTURE_CACHE, LMHELLO, lazymount_command
from mixedcaches import REPO

HELLO_HASH = LMHELLO.rsplit("-", 1)[1]


def find_lines(spack) -> list[str]:
    return spack("find", "--format", "{name}-{version}-{hash} {prefix}").stdout.splitlines()


def test_spack_finds_and_locates_the_packages_of_a_v3_mount(spack, mount_cache):
    mount = mount_cache([str(FIXTURE_CACHE)])
    spack.upstream("lazymount", mount.root)
    assert f"{LMHELLO} {mount.prefix()}" in find_lines(spack)
    located = spack("location", "-i", f"/{HELLO_HASH}").stdout.strip()
    assert located == str(mount.prefix())
    assert not any((mount.store / "pkgs").iterdir())  # reading the database fetched nothing


def test_spack_reads_a_v2_mount(spack, mount_cache, caches):
    mount = mount_cache([str(caches.v2)])
    spack.upstream("lazymount", mount.root)
    lines = find_lines(spack)
    for pkg in (caches.v2_hello, caches.v2_greet):
        name = f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"
        assert f"{name} {mount.prefix(name)}" in lines, lines


# Re-serializes every record of the upstream database the way Spack writes its own.
REWRITE = textwrap.dedent("""
    import json, sys
    import spack.store
    upstream, = spack.store.STORE.db.upstream_dbs
    upstream._read()  # an upstream has no lock: it is read as it is
    records = {h: {"spec": r.spec.node_dict_with_hashes(), "path": r.path,
                   "installed": r.installed} for h, r in upstream._data.items()}
    json.dump(records, sys.stdout)
""")


def test_spack_reads_a_mixed_mount_as_it_would_write_it(spack, mount_cache, caches, tmp_path):
    mount = mount_cache(caches.mirrors)
    spack.upstream("lazymount", mount.root)
    spack.add_repo(REPO)
    lines = find_lines(spack)
    hellos = [line for line in lines if line.startswith("lmhello-1.0-")]
    v2_name = f"lmhello-1.0-{caches.v2_hello.dag_hash}"
    assert sorted(hellos) == sorted([f"{LMHELLO} {mount.prefix()}",
                                     f"{v2_name} {mount.prefix(v2_name)}"])
    for name in (LMHELLO, v2_name):
        assert spack("location", "-i", f"/{name[-32:]}").stdout.strip() == \
            str(mount.prefix(name))
    for pkg in (caches.migrated_pkg, caches.cross_pkg):
        name = f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"
        assert f"{name} {mount.prefix(name)}" in lines
        assert spack("location", "-i", f"/{pkg.dag_hash}").stdout.strip() == \
            str(mount.prefix(name))

    # what Spack makes of each record is what the mount wrote: same nodes, hashes, paths
    script = tmp_path / "rewrite.py"
    script.write_text(REWRITE)
    rewritten = json.loads(spack("python", str(script)).stdout)
    ours = json.loads((mount.root / ".spack-db" / "index.json").read_text())
    installs = ours["database"]["installs"]
    assert rewritten.keys() == installs.keys()
    for dag_hash, record in installs.items():
        assert rewritten[dag_hash] == {key: record[key] for key in ("spec", "path", "installed")}
    old = rewritten[caches.v2_hello.dag_hash]["spec"]
    assert old["annotations"] == {"original_specfile_version": 4, "compiler": "gcc@=12.2.0"}

    assert not any((mount.store / "pkgs").iterdir())  # reading the database fetched nothing

    # `spack load` looks into the prefix (its bin/, lib/...): that materializes it; then
    # the tools of both builds run from the environment it sets
    for name, command, says in ((LMHELLO, "hello -v", "Hello from lmgreet, world!"),
                                (v2_name, "lmhello", "Hello from lmhello")):
        loaded = spack("load", "--sh", f"/{name[-32:]}").stdout
        assert f"{mount.prefix(name)}/bin" in loaded
        ran = subprocess.run(["bash", "-c", f"{loaded}\n{command}"], capture_output=True,
                             text=True, timeout=60)
        assert says in ran.stdout, ran.stdout + ran.stderr


def test_spack_install_reuses_the_upstream(spack, mount_cache, caches):
    """A downstream install of a package that needs lmhello builds only itself."""
    mount = mount_cache(caches.mirrors)
    spack.upstream("lazymount", mount.root)
    spack.add_repo(REPO)
    installed = spack("install", "--no-check-signature", "lmapp").stdout
    deps = spack("find", "--deps", "--format", "{name} {prefix}", "lmapp").stdout
    prefixes = dict(line.split(None, 1) for line in deps.splitlines() if line.strip())
    why = f"spack install said:\n{installed}\nspack find --deps:\n{deps}"
    assert prefixes.get("lmapp", "").startswith(str(spack.install_root)), why
    assert Path(prefixes.get("lmhello", "/")).parent == mount.root / "linux-x86_64", why


# Writes Spack's own module files for every installed record of the upstream (roots and Lmod's
# core compiler come from modules.yaml) and prints where each went and its name.
SPACK_MODULES = textwrap.dedent("""
    import json, os, sys
    import spack.config, spack.store
    import spack.modules.lmod as lmod, spack.modules.tcl as tcl
    upstream, = spack.store.STORE.db.upstream_dbs
    upstream._read()
    out = {}
    for h, r in upstream._data.items():
        if not r.installed:
            continue
        for kind, writer_class in (("tcl", tcl.TclModulefileWriter),
                                   ("lmod", lmod.LmodModulefileWriter)):
            writer = writer_class(r.spec, "default", explicit=True)
            root = spack.config.get("modules:default:roots")[kind]
            out.setdefault(kind, {})[h] = [os.path.relpath(writer.layout.filename, root),
                                           writer.layout.use_name]
    json.dump(out, sys.stdout)
""")


def test_spack_finds_the_mounts_modules_named_as_it_names_them(spack, mount_cache, caches,
                                                               tmp_path):
    mount = mount_cache(caches.mirrors)
    config = subprocess.run(lazymount_command("spack-config", str(mount.root)),
                            capture_output=True, text=True, timeout=60, check=True).stdout
    (spack.config_dir / "upstreams.yaml").write_text(config)
    spack.add_repo(REPO)
    v2_hash = caches.v2_hello.dag_hash
    loads = spack("module", "tcl", "loads", "lmhello").stdout  # both builds
    assert f"module load lmhello/1.0-gcc-12.2.0-{HELLO_HASH[:7]}\n" in loads
    assert f"module load lmhello/1.0-gcc-12.2.0-{v2_hash[:7]}\n" in loads
    loads = spack("module", "lmod", "loads", f"/{HELLO_HASH}").stdout
    assert f"module load lmhello/1.0-{HELLO_HASH[:7]}\n" in loads
    assert not any((mount.store / "pkgs").iterdir())  # names come from the index files

    # Spack's own layout and names for the same specs, kind by kind
    spack.configure("modules", {"modules": {"default": {
        "roots": {"tcl": str(tmp_path / "tcl"), "lmod": str(tmp_path / "lmod")},
        "lmod": {"core_compilers": ["gcc@12.2.0"]}}}})
    script = tmp_path / "modules.py"
    script.write_text(SPACK_MODULES)
    theirs = json.loads(spack("python", str(script)).stdout)
    for kind in ("tcl", "lmod"):
        index = yaml.safe_load((mount.root / "modules" / kind / "module-index.yaml").read_text())
        ours = {h: [os.path.relpath(e["path"], mount.root / "modules" / kind), e["use_name"]]
                for h, e in index["module_index"].items()}
        assert ours == theirs[kind]
