"""Metric 9: a package shaped like a real application, lazymount against the real Spack.

The eager way is what a site does today: ``spack buildcache install`` of the package (Spack
fetches the tarball, checks its signature, extracts and relocates it into its install tree),
then the application runs. The lazy way: the mirror is mounted (a standing service) and the
application runs from the mount, which materializes it on first access. Both start cold (a
fresh store or install tree, page cache dropped) and are interleaved.

The real Spack comes from ``LAZYMOUNT_TEST_SPACK`` (the directory the test tier uses:
``spack/``, ``spack-packages/``, ``python/``); without it this part is skipped.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from . import generate
from .harness import drop_caches, median, short_dir, timed

RECIPE = '''from spack.package import *


class {cls}(Package):
    """The application of lazymount's benchmark (no build recipe: the cache has the build)."""

    homepage = "https://example.invalid/lazymount"
    url = "file:///nonexistent/{name}-{version}.tar.gz"

    version("{version}", sha256="0" * 64)
'''


def _package_repo(work: Path, info: dict[str, Any]) -> Path:
    """A one-package Spack repository: Spack's post-install step needs the recipe."""
    repo = work / "spack_repo" / generate.REAL_NAMESPACE
    package = repo / "packages" / info["name"]
    package.mkdir(parents=True, exist_ok=True)
    (repo / "repo.yaml").write_text(
        f"repo:\n  namespace: {generate.REAL_NAMESPACE}\n  api: v2.0\n")
    (package / "package.py").write_text(RECIPE.format(
        cls=info["name"].capitalize(), name=info["name"], version=info["version"]))
    return repo


class EagerSpack:
    """An isolated Spack user that installs the package from the mirror into a fresh, short
    install root each time (relocated C strings cannot grow past the build root)."""

    def __init__(self, real: Any, realspack: ModuleType, work: Path, mirror: str,
                 info: dict[str, Any], later: Any) -> None:
        self.later = later  # deletes a tree once every figure is taken
        self.user = realspack.SpackUser(real, work / "spack-user")
        self.info = info
        # Spack's gpg needs the bootstrap configuration on, even when gpg is on PATH
        self.user.configure("bootstrap", {"bootstrap": {
            "enable": True, "root": str(work / "spack-user" / "bootstrap")}})
        self.user.configure("mirrors", {"mirrors": {"bench": mirror}})
        self.user.add_repo(_package_repo(work, info))
        self._spack("gpg", "trust", str(generate.PUBLIC_KEY))

    def _spack(self, *args: str) -> None:
        result = self.user(*args, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"spack {' '.join(args)} failed:\n{result.stdout}{result.stderr}")

    def install_and_run(self, run: Any) -> float:
        root = self.later(short_dir("lms"))
        self.user.configure("config", {"config": {
            "misc_cache": str(self.user.real.misc_cache),
            "install_tree": {"root": str(root)},
            "build_stage": [str(self.user.home / "stage")],
        }})
        seconds = timed(lambda: self._spack("buildcache", "install", "-o",
                                            f"/{self.info['hash']}"))
        app = root / self.info["projected"] / "bin" / "app"
        return seconds + timed(lambda: run(app, str(root)))


def bench_spack(bench: Any, result_type: Any, run: Any) -> None:
    """Metric 9: cold first run through the mount vs ``spack buildcache install`` + run."""
    realspack = generate.load_test_module("realspack")  # the test tier's Spack helpers
    real = realspack.find_real_spack()
    if real is None:
        bench.log(f"  ({realspack.ENV_VAR} is not set: the comparison with Spack is skipped)")
        return
    info = bench.caches.real
    eager = EagerSpack(real, realspack, bench.work / "spack", bench.url("real"), info,
                       bench.later)
    # an untimed round: Spack's repository cache and the disk settle
    eager.install_and_run(run)
    app = Path(info["projected"]) / "bin" / "app"
    lazy_runs, eager_runs = [], []
    for rep in range(bench.reps):
        drop_caches()
        with bench.mount("real", bench.later(bench.work / f"store-real-{rep}")) as mount:
            lazy_runs.append(timed(lambda m=mount: run(m.root / app, str(m.root))))
        drop_caches()
        eager_runs.append(eager.install_and_run(run))
        bench.log(f"  rep {rep + 1}: lazymount {lazy_runs[-1]:.2f} s, "
                  f"spack buildcache install + run {eager_runs[-1]:.2f} s")
    lazy, spack = median(lazy_runs), median(eager_runs)
    size = f"{info['bytes'] / 2**20:.0f} MiB in {info['files']} files"
    bench.add(result_type(
        "9", f"cold first run of a real-shaped package ({size}): `bin/app`",
        f"{lazy:.2f} s", f"spack buildcache install + run: {spack:.2f} s", spack / lazy,
        "x faster than Spack", "≥ 5x", spack / lazy >= 5.0,
        {"lazy_s": lazy_runs, "spack_s": eager_runs}))
