"""The mount's module files in the real module systems: Environment Modules (Tcl) and Lmod
(Lua). ``module avail`` lists the packages of a v2 and a v3 cache mounted together without
fetching anything; ``module load`` and running the tool materializes it and it runs.

scripts/setup.sh installs Environment Modules and unpacks Lmod into .venv/lmod (Debian's
lmod package conflicts with environment-modules).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FIXTURE_CACHE, LMHELLO, MODULES_INIT, lmod_executable

ARCH = "linux-debian12-x86_64"  # the caches' platform, os and target
HELLO7 = LMHELLO.rsplit("-", 1)[1][:7]


@dataclass(frozen=True)
class ModuleSystem:
    """How a shell gets the `module` command and sees a mount's modules."""

    kind: str  # the mount's module root: tcl or lmod

    def setup(self, mount: Path) -> str:
        if self.kind == "tcl":
            if not MODULES_INIT.exists():
                pytest.fail("Environment Modules is not installed (apt-get install "
                            "environment-modules; scripts/setup.sh does)")
            return (f"source {MODULES_INIT}; module purge; "
                    f"module use {mount}/modules/tcl/{ARCH}\n")
        # Debian's Lmod init script names its own install path: call lmod itself
        return (f'module() {{ eval "$({lmod_executable()} bash "$@")"; }}; '
                f"export MODULEPATH={mount}/modules/lmod/{ARCH}/Core\n")

    def hello_name(self, short_hash: str, compiler: str = "gcc-12.2.0") -> str:
        if self.kind == "tcl":
            return f"lmhello/1.0-{compiler}-{short_hash}"
        return f"lmhello/1.0-{short_hash}"

    def run(self, mount: Path, script: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MODULE", "LMOD", "LOADEDMODULES", "_LMFILES_"))}
        return subprocess.run(["bash", "-c", self.setup(mount) + script], env=env,
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(params=["tcl", "lmod"])
def modules(request) -> ModuleSystem:
    return ModuleSystem(request.param)


def test_module_avail_lists_both_builds_without_fetching(modules, mount_cache, caches):
    mount = mount_cache([str(caches.v2), str(FIXTURE_CACHE)])
    result = modules.run(mount.root, "module avail 2>&1")
    assert result.returncode == 0, result.stderr
    v2_hash7 = caches.v2_hello.dag_hash[:7]
    for short in (HELLO7, v2_hash7):
        assert modules.hello_name(short) in result.stdout, result.stdout
    assert not any((mount.store / "pkgs").iterdir())  # listing modules fetched nothing


def test_module_load_then_run_materializes_and_runs(modules, mount_cache, caches):
    mount = mount_cache([str(caches.v2), str(FIXTURE_CACHE)])
    v2_name = modules.hello_name(caches.v2_hello.dag_hash[:7])
    result = modules.run(mount.root, f"""
        module load {modules.hello_name(HELLO7)} || exit 1
        hello -v || exit 2
        module purge
        module load {v2_name} || exit 3
        lmhello || exit 4
        module list 2>&1
        echo "PKG_CONFIG_PATH=$PKG_CONFIG_PATH"
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from lmgreet, world!" in result.stdout  # the v3 build, relocated
    assert "Hello from lmhello" in result.stdout  # the v2 build
    assert "lmgreet/1.0-" in result.stdout  # autoloaded with the v2 lmhello
    v2_greet = mount.prefix(f"lmgreet-1.0-{caches.v2_greet.dag_hash}")
    assert f"{v2_greet}/lib/pkgconfig" in result.stdout
