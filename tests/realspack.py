"""The real Spack, run by tests that must agree with what Spack really does.

Set ``LAZYMOUNT_TEST_SPACK`` to a directory laid out as the release notes of the test tier say
(``spack/`` with ``bin/spack``, ``spack-packages/`` with the builtin repository, ``python/``
with clingo); ``.ci/run`` unpacks one and sets it. Unset, every test that asks for the
``real_spack`` or ``spack`` fixture is skipped.

Each test gets its own Spack user (:class:`SpackUser`): every configuration scope, the user
cache, the GnuPG home and the install tree live in the test's temporary directory, so nothing
reads or writes ``~/.spack`` or the Spack checkout's own ``etc/``. Bootstrapping is off
(clingo comes from ``python/``, gpg and patchelf from PATH), so no network is needed.
Spack's ``misc_cache`` is one fixed directory per Spack tree, shared by every test and run:
the first command that reads the package repository builds its cache there (about a minute
on two cores), later ones reuse it.

Typical use::

    def test_find(spack, mount_cache):
        mount = mount_cache([...])
        spack.upstream("lazymount", mount.root)
        assert "lmhello" in spack("find").stdout
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ENV_VAR = "LAZYMOUNT_TEST_SPACK"
BUILTIN_REPO = Path("spack-packages/repos/spack_repo/builtin")
SPACK_TIMEOUT = 600  # a hang must end the test, not the CI run; not a speed limit


@dataclass(frozen=True)
class RealSpack:
    """An unpacked Spack release with its package repository and Python."""

    root: Path
    misc_cache: Path

    @property
    def executable(self) -> Path:
        return self.root / "spack" / "bin" / "spack"

    @property
    def python(self) -> Path:
        return self.root / "python" / "bin" / "python"

    @property
    def builtin_repo(self) -> Path:
        return self.root / BUILTIN_REPO


def find_real_spack() -> RealSpack | None:
    """The Spack named by LAZYMOUNT_TEST_SPACK, or None when the variable is unset.
    A set variable that names no usable Spack is an error, not a skip."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    root = Path(value).resolve()
    for needed in (root / "spack" / "bin" / "spack", root / BUILTIN_REPO / "repo.yaml",
                   root / "python" / "bin" / "python"):
        if not needed.exists():
            raise RuntimeError(f"{ENV_VAR}={value}: {needed} is missing")
    return RealSpack(root, _misc_cache(root))


def _misc_cache(root: Path) -> Path:
    """Beside the Spack tree when it is writable (kept between runs), else in /tmp."""
    for candidate in (root / "misc-cache", Path(tempfile.gettempdir()) / "lazymount-spack-misc"):
        try:
            candidate.mkdir(exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise RuntimeError("no writable place for Spack's misc_cache")


class SpackUser:
    """One isolated Spack user: its own configuration, caches and install tree under ``home``.

    Calling it runs ``spack ARGS...`` and returns the completed process (text output); a
    non-zero exit fails the test with Spack's output unless ``check=False``.
    """

    def __init__(self, real: RealSpack, home: Path) -> None:
        self.real = real
        self.home = home
        self.config_dir = home / "config"
        self.install_root = home / "opt"
        self.config_dir.mkdir(parents=True)
        (home / "system").mkdir()
        self.configure("repos", {"repos": {"builtin": str(real.builtin_repo)}}, replace=True)
        self.configure("config", {"config": {
            "misc_cache": str(real.misc_cache),
            "install_tree": {"root": str(self.install_root)},
            "build_stage": [str(home / "stage")],
            "source_cache": str(home / "sources"),
        }})
        self.configure("bootstrap", {"bootstrap": {"enable": False}})

    def configure(self, section: str, data: dict[str, Any], replace: bool = False) -> Path:
        """Write ``data`` as the user scope's ``SECTION.yaml``. ``replace`` writes the section
        key with Spack's ``::`` (override lower scopes instead of merging)."""
        if replace:
            ((key, value),) = data.items()
            data = {f"{key}:": value}
        path = self.config_dir / f"{section}.yaml"
        text = yaml.safe_dump(data, default_flow_style=False, sort_keys=False)
        path.write_text(text.replace(f"'{section}::':", f"{section}::"))
        return path

    def upstream(self, name: str, install_tree: Path,
                 modules: dict[str, Path] | None = None) -> None:
        """Make ``install_tree`` (a mount) this user's only upstream."""
        entry: dict[str, Any] = {"install_tree": str(install_tree)}
        if modules:
            entry["modules"] = {kind: str(path) for kind, path in modules.items()}
        self.configure("upstreams", {"upstreams": {name: entry}})

    def add_repo(self, path: Path) -> None:
        """Put the repository at ``path`` before the builtin one."""
        self.configure("repos", {"repos": {path.name: str(path),
                                           "builtin": str(self.real.builtin_repo)}},
                       replace=True)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPACK_")}
        env.update(
            SPACK_ROOT=str(self.real.root / "spack"),
            SPACK_PYTHON=str(self.real.python),
            SPACK_USER_CONFIG_PATH=str(self.config_dir),
            SPACK_SYSTEM_CONFIG_PATH=str(self.home / "system"),
            SPACK_USER_CACHE_PATH=str(self.home / "cache"),
            SPACK_GNUPGHOME=str(self.home / "gnupg"),
            HOME=str(self.home),
        )
        return env

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.real.executable), *args], env=self.env,
                                capture_output=True, text=True, timeout=SPACK_TIMEOUT,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            pytest.fail(f"spack {' '.join(args)} exited {result.returncode}:\n"
                        f"{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture(scope="session")
def real_spack() -> RealSpack:
    """The real Spack of LAZYMOUNT_TEST_SPACK; skips the test when it is unset."""
    found = find_real_spack()
    if found is None:
        pytest.skip(f"{ENV_VAR} is not set (the real Spack tier; .ci/run sets it)")
    return found


@pytest.fixture
def spack(real_spack: RealSpack, tmp_path: Path) -> SpackUser:
    """A fresh isolated Spack user for this test (see SpackUser)."""
    return SpackUser(real_spack, tmp_path / "spack-user")
