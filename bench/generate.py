"""Synthetic but realistic Spack build caches for the benchmarks, written with the test writer.

Three caches, each a layout-v3 mirror directory under ``bench/out/caches/``:

* ``big``:   one package of about 200 MB (``Sizes.full``): hundreds of ELF shared libraries
  and executables with RPATHs into the prefix, tens of thousands of headers and Python
  files, text files that mention the prefix, one large data file;
* ``stack``: about 200 small compiled packages whose link/run/build dependencies form a DAG;
  one of them (``app``) is the application the benchmark runs;
* ``index``: an index of 100,000 realistic specs (no tarballs: it is only mounted and listed);
* ``real``:  one package shaped like a real application (about 60 MB in 2,000 files: an
  executable, its library, a Python tree, data files), for the comparison with the real
  Spack's ``buildcache install``.

Everything is deterministic (seeded). A cache is rebuilt only when its recipe changed
(``stamp.json``). Content is built from a shuffled vocabulary mixed with random bytes, so it
compresses about as well as real packages (2-3x). Blocking, single process (gcc runs in a
few threads).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KEYS = REPO / "tests" / "data" / "keys"
SECRET_KEY = KEYS / "lazymount-fixtures.secret.asc"
PUBLIC_KEY = KEYS / "lazymount-fixtures.pub.asc"
RECIPE = 3  # bump when the generated content changes, so stale caches are rebuilt
BUILD_ROOT = "/tmp/lmt/opt/spack"  # 18 characters: mounts at short /tmp paths fit


def load_test_module(name: str) -> ModuleType:
    """A helper module of the test suite, imported by path (tests/ is not a package; the
    helpers import one another, and conftest, by name)."""
    if str(REPO / "tests") not in sys.path:
        sys.path.append(str(REPO / "tests"))
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sc = load_test_module("spackcache")  # the test suite's cache writer


@dataclass(frozen=True)
class Sizes:
    """How big the generated caches are."""

    libs: int = 300  # ELF shared libraries in the big package
    exes: int = 60  # ELF executables in the big package
    headers: int = 20_000
    pyfiles: int = 10_000
    big_file_mb: int = 48  # one large data file, for the re-read benchmark
    stack: int = 200  # packages in the stack
    specs: int = 100_000  # specs in the large index

    @classmethod
    def full(cls) -> Sizes:
        return cls()

    @classmethod
    def quick(cls) -> Sizes:
        return cls(libs=100, exes=20, headers=10_000, pyfiles=4_000, big_file_mb=32,
                   stack=80, specs=100_000)


# ---------------------------------------------------------------------------------------------
# Content


class Content:
    """Deterministic filler: text from a shuffled vocabulary, binary with random runs."""

    def __init__(self, seed: int, size: int = 8 << 20):
        self.rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz_"
        vocab = ["".join(self.rng.choices(letters, k=self.rng.randint(2, 11)))
                 for _ in range(6000)]
        words = self.rng.choices(vocab, k=size // 6)
        lines = [" ".join(words[i:i + 11]) for i in range(0, len(words), 11)]
        self.text = ("\n".join(lines) + "\n").encode()[:size]
        self.noise = self.rng.randbytes(1 << 20)

    def text_slice(self, size: int) -> bytes:
        start = self.rng.randrange(0, len(self.text) - size - 1)
        return self.text[start:start + size]

    def binary(self, size: int) -> bytes:
        """About 2x compressible: 3/4 text, 1/4 random bytes, in 4 KiB blocks."""
        out = bytearray()
        while len(out) < size:
            if self.rng.random() < 0.25:
                start = self.rng.randrange(0, len(self.noise) - 4096)
                out += self.noise[start:start + 4096]
            else:
                out += self.text_slice(4096)
        return bytes(out[:size])


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def _compile_big_elves(prefix: str, content: Content, lib_sizes: list[int]) -> dict[str, bytes]:
    """``libbigcore.so``, a ``tool`` executable linked to it, and one template library per
    size in ``lib_sizes`` (each carries that many bytes of data and the prefix as a C string).
    All have RPATH ``<prefix>/lib``, like Spack's compiler wrapper sets it."""
    rpath = f"-Wl,--disable-new-dtags,-rpath,{prefix}/lib"
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="lmbcc-") as tmp:
        work = Path(tmp)
        (work / "core.c").write_text(
            "#include <stdio.h>\n"
            f"static const char prefix_str[] = \"{prefix}/share/bigpkg\";\n"
            "const char *bigcore_data(void) { return prefix_str; }\n"
            "int bigcore_hello(void) { return printf(\"bigpkg data: %s\\n\", prefix_str) < 0; }\n")
        (work / "main.c").write_text(
            "int bigcore_hello(void);\nint main(void) { return bigcore_hello(); }\n")
        jobs = [["gcc", "-O1", "-shared", "-fPIC", "-o", "libbigcore.so", "core.c", rpath]]
        for index, size in enumerate(lib_sizes):
            (work / f"data{index}.bin").write_bytes(content.binary(size))
            (work / f"tpl{index}.c").write_text(
                f"static const char prefix_str[] = \"{prefix}/share/bigpkg/t{index}\";\n"
                f"const char *tpl{index}_prefix(void) {{ return prefix_str; }}\n"
                f"__asm__(\".section .rodata\\n.globl tpl{index}_data\\ntpl{index}_data:\\n"
                f".incbin \\\"data{index}.bin\\\"\\n.previous\\n\");\n")
            jobs.append(["gcc", "-O1", "-shared", "-fPIC", "-o", f"libtpl{index}.so",
                         f"tpl{index}.c", rpath])
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            list(pool.map(lambda cmd: _run(cmd, work), jobs))
        _run(["gcc", "-O1", "-o", "tool", "main.c", "-L.", "-lbigcore", rpath], work)
        for name in ["libbigcore.so", "tool", *(f"libtpl{i}.so" for i in range(len(lib_sizes)))]:
            out[name] = (work / name).read_bytes()
    return out


# The application of the Spack comparison: ~60 MB in ~2,000 files
REAL_SIZES = Sizes(libs=4, exes=1, headers=200, pyfiles=1600, big_file_mb=52)
REAL_NAME = "lmreal"
REAL_NAMESPACE = "lmbench"  # the Spack repository the comparison gives Spack for its recipe


def big_package(writer: Any, sizes: Sizes, name: str = "bigpkg", namespace: str = "builtin"
                ) -> Any:
    """The ~200 MB package (a). Its ``bin/app`` runs and prints a path under its prefix."""
    pkg = sc.Package(name, "2.4.1", namespace=namespace)
    prefix = writer.prefix_of(pkg)
    content = Content(seed=1)
    lib_sizes = [32 << 10, 96 << 10, 200 << 10, 400 << 10, 700 << 10]
    elves = _compile_big_elves(prefix, content, lib_sizes)
    files: dict[str, Any] = {"lib/libbigcore.so": elves["libbigcore.so"],
                             "bin/app": elves["tool"]}
    for index in range(sizes.libs):
        name = f"lib/libbig{index:03d}.so"
        files[f"{name}.1.0"] = elves[f"libtpl{index % len(lib_sizes)}.so"]
        files[name] = sc.Symlink(f"libbig{index:03d}.so.1.0")
    for index in range(sizes.exes):
        files[f"bin/tool{index:02d}"] = elves["tool"]
    for index in range(sizes.headers):
        mention = f'#define BIGPKG_PREFIX "{prefix}"\n' if index % 10 == 0 else ""
        body = content.text_slice(content.rng.randint(400, 2400))
        files[f"include/bigpkg/g{index // 100:03d}/h{index:05d}.h"] = (
            f"/* bigpkg header {index} */\n#pragma once\n{mention}/*\n".encode() + body + b"*/\n")
    site = "lib/python3.11/site-packages/bigpkg"
    for index in range(sizes.pyfiles):
        group = f"{site}/m{index // 50:03d}"
        if index % 50 == 0:
            files[f"{group}/__init__.py"] = b""
        mention = f'PREFIX = "{prefix}"\n' if index % 10 == 0 else ""
        body = content.text_slice(content.rng.randint(800, 4200)).replace(b"\n", b"\n# ")
        files[f"{group}/mod{index:05d}.py"] = f"{mention}# ".encode() + body + b"\n"
    for index in range(50):
        files[f"lib/pkgconfig/bigpkg{index}.pc"] = (
            f"prefix={prefix}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n"
            f"Name: bigpkg{index}\nVersion: 2.4.1\nLibs: -L${{libdir}} -lbig{index:03d}\n")
        files[f"lib/cmake/bigpkg/part{index}.cmake"] = (
            f'set(BIGPKG_ROOT "{prefix}")\nset(BIGPKG_LIBS "{prefix}/lib")\n')
    files["bin/bigpkg-config"] = f"#!/bin/sh\necho {prefix}\n"
    files["share/bigpkg/data/big.dat"] = content.binary(sizes.big_file_mb << 20)
    pkg.files = files
    writer.add(pkg)
    return pkg


# ---------------------------------------------------------------------------------------------
# The stack


@dataclass
class StackPlan:
    names: list[str]
    deps: list[list[tuple[int, tuple[str, ...]]]]  # per package: (index of dep, deptypes)


def plan_stack(count: int, seed: int = 2) -> StackPlan:
    """A DAG: each package depends on up to four of the 25 packages before it; most edges
    are build+link, some run-only, some build-only (those are never fetched for running)."""
    rng = random.Random(seed)
    syllables = ["lib", "py", "mpi", "hdf", "net", "blas", "fft", "xml", "zlib", "ssl", "gl",
                 "tk", "png", "curl", "boost", "eigen", "sz", "lz", "cd", "geo"]
    names = [f"{rng.choice(syllables)}{rng.choice(syllables)}{index:03d}"
             for index in range(count)]
    deps: list[list[tuple[int, tuple[str, ...]]]] = []
    for index in range(count):
        window = list(range(max(0, index - 25), index))
        chosen = rng.sample(window, min(len(window), rng.randint(0, 4)))
        edges = []
        for dep in sorted(chosen):
            kind = rng.random()
            deptypes = (("build", "link") if kind < 0.7 else ("run",) if kind < 0.85
                        else ("build",))
            edges.append((dep, deptypes))
        deps.append(edges)
    return StackPlan(names, deps)


def runtime_closure(plan: StackPlan, root: int) -> set[int]:
    """Indexes of ``root`` and everything it reaches through link or run edges."""
    seen, todo = {root}, [root]
    while todo:
        for dep, deptypes in plan.deps[todo.pop()]:
            if dep not in seen and {"link", "run"} & set(deptypes):
                seen.add(dep)
                todo.append(dep)
    return seen


def pick_app(plan: StackPlan) -> int:
    """The package the benchmark runs: a closure near 1/8 of the stack, with build-only deps."""
    target = max(2, len(plan.names) // 8)
    candidates = [i for i in range(len(plan.names))
                  if any(t == ("build",) for _, t in plan.deps[i])] or list(range(len(plan.names)))
    return min(candidates, key=lambda i: (abs(len(runtime_closure(plan, i)) - target), -i))


def stack_packages(writer: Any, plan: StackPlan) -> list[Any]:
    """Compile every package of the plan (in dependency waves, gcc in parallel) and add each
    with some headers and a data file, so blobs are a few hundred KB as small libraries are."""
    built: list[Any] = [None] * len(plan.names)
    depth = [0] * len(plan.names)
    for index, edges in enumerate(plan.deps):
        depth[index] = 1 + max((depth[d] for d, _ in edges), default=-1)
    content = Content(seed=3, size=2 << 20)

    def build(index: int) -> Any:
        deps = [(built[d], deptypes) for d, deptypes in plan.deps[index]]
        return writer.build_c_package(plan.names[index], deps=deps,
                                      message=f"Hello from {plan.names[index]}")

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        for wave in range(max(depth) + 1):
            members = [i for i in range(len(plan.names)) if depth[i] == wave]
            for index, pkg in zip(members, pool.map(build, members), strict=True):
                built[index] = pkg
    for pkg in built:
        prefix = writer.prefix_of(pkg)
        for number in range(30):
            pkg.files[f"include/{pkg.name}/part{number}.h"] = (
                f"/* {pkg.name} */\n".encode() + content.text_slice(1200))
        pkg.files[f"share/{pkg.name}/table.dat"] = content.binary(
            content.rng.randint(64, 256) << 10)
        pkg.files[f"lib/pkgconfig/{pkg.name}.pc"] = f"prefix={prefix}\n"
        writer.add(pkg)
    return built


# ---------------------------------------------------------------------------------------------
# The large index

TARGET = {
    "name": "x86_64_v3", "vendor": "generic",
    "features": ["abm", "avx", "avx2", "bmi1", "bmi2", "cx16", "f16c", "fma", "fxsr", "lahf_lm",
                 "mmx", "movbe", "pclmulqdq", "popcnt", "sse", "sse2", "sse4_1", "sse4_2",
                 "ssse3", "xsave", "xsaveopt"],
    "generation": 0, "parents": ["x86_64_v2"], "cpupart": "",
}


def index_records(count: int, seed: int = 4) -> dict[str, dict[str, Any]]:
    """``count`` index records shaped like a large site cache's: a few thousand package names
    in many versions and variants, each with compiler-like runtime deps and build deps."""
    rng = random.Random(seed)
    stems = ["py", "r", "perl", "lib", "hdf", "net", "mpi", "font", "x", "gtk", "qt", "boost"]
    names = sorted({f"{rng.choice(stems)}-{rng.randbytes(3).hex()}" for _ in range(4000)})
    packages: list[Any] = []
    for index in range(count):
        name = rng.choice(names)
        version = f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
        parameters = dict(sc.GENERIC_PARAMETERS, build_system=rng.choice(
            ["cmake", "autotools", "python_pip", "generic"]), shared=rng.random() < 0.8,
            build_type="Release", patches=[rng.randbytes(32).hex()] if index % 7 == 0 else [])
        deps = []
        if packages:
            for dep in rng.sample(packages[-400:], min(len(packages), rng.randint(1, 5))):
                deps.append((dep, rng.choice([("build", "link"), ("build",), ("run",),
                                              ("build", "link", "run")])))
        packages.append(sc.Package(name, version, deps=deps, namespace="builtin",
                                   arch=("linux", "debian12", TARGET), parameters=parameters,
                                   package_hash=sc.default_package_hash("s", name, str(index))))
    refs: dict[str, int] = {}
    for pkg in packages:
        for edge in pkg.deps:
            refs[edge.pkg.dag_hash] = refs.get(edge.pkg.dag_hash, 0) + 1
    return {pkg.dag_hash: {"spec": pkg.node(), "ref_count": refs.get(pkg.dag_hash, 0),
                           "in_buildcache": True} for pkg in packages}


# ---------------------------------------------------------------------------------------------
# Entry point


@dataclass
class Caches:
    """Where the generated mirrors are, and what the benchmarks need to know about them."""

    root: Path
    big: dict[str, Any]
    stack: dict[str, Any]
    index: dict[str, Any]
    real: dict[str, Any]


def _fresh(directory: Path, recipe: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((directory / "stamp.json").read_text()) == recipe)
    except (OSError, ValueError):
        return False


def _build(directory: Path, recipe: dict[str, Any], make: Any) -> dict[str, Any]:
    """Run ``make(writer) -> info`` into ``directory`` unless its stamp matches ``recipe``."""
    if _fresh(directory, recipe):
        return dict(json.loads((directory / "info.json").read_text()))
    shutil.rmtree(directory, ignore_errors=True)
    started = time.monotonic()
    with sc.Signer(SECRET_KEY) as signer:
        writer = sc.CacheWriter(directory / "mirror", BUILD_ROOT, signer=signer)
        info = make(writer)
        writer.finish(info.pop("records", None))
    info["generated_in_s"] = round(time.monotonic() - started, 1)
    (directory / "info.json").write_text(json.dumps(info, indent=1))
    (directory / "stamp.json").write_text(json.dumps(recipe))
    return info


def _entry_info(writer: Any, pkg: Any) -> dict[str, Any]:
    entry = writer.entries[pkg.dag_hash]
    return {"hash": pkg.dag_hash, "name": pkg.name, "version": pkg.version,
            "prefix": entry.prefix, "tarball": entry.tarball, "spec_blob": entry.spec,
            "projected": sc.projection(pkg)}


def generate(out: Path, sizes: Sizes, log: Any = print) -> Caches:
    """Make (or reuse) the three caches under ``out``; returns what the runner needs."""
    base = {"recipe": RECIPE, "build_root": BUILD_ROOT}

    def make_big(writer: Any, package_sizes: Sizes = sizes, name: str = "bigpkg",
                 namespace: str = "builtin") -> dict[str, Any]:
        pkg = big_package(writer, package_sizes, name, namespace)
        info = _entry_info(writer, pkg)
        info["files"] = sum(1 for v in pkg.files.values() if isinstance(v, bytes | str))
        info["bytes"] = sum(len(v) for v in pkg.files.values() if isinstance(v, bytes | str))
        return info

    def make_stack(writer: Any) -> dict[str, Any]:
        plan = plan_stack(sizes.stack)
        built = stack_packages(writer, plan)
        app = pick_app(plan)
        return {"packages": [_entry_info(writer, p) for p in built], "app": app,
                "closure": sorted(runtime_closure(plan, app))}

    def make_index(writer: Any) -> dict[str, Any]:
        records = index_records(sizes.specs)
        return {"records": records, "specs": len(records)}

    fields = dataclasses.asdict(sizes)
    log(f"generating caches under {out} (reused when unchanged)")
    big = _build(out / "big", {**base, **{k: fields[k] for k in
                                          ("libs", "exes", "headers", "pyfiles", "big_file_mb")}},
                 make_big)
    log(f"  big package: {big['files']} files, {big['bytes'] / 2**20:.0f} MiB, "
        f"blob {big['tarball']['contentLength'] / 2**20:.0f} MiB")
    stack = _build(out / "stack", {**base, "stack": sizes.stack}, make_stack)
    log(f"  stack: {len(stack['packages'])} packages; the app's link/run closure: "
        f"{len(stack['closure'])}")
    index = _build(out / "index", {**base, "specs": sizes.specs}, make_index)
    log(f"  index: {index['specs']} specs")
    real_fields = dataclasses.asdict(REAL_SIZES)
    real = _build(out / "real", {**base, **real_fields, "name": REAL_NAME,
                                 "namespace": REAL_NAMESPACE},
                  lambda writer: make_big(writer, REAL_SIZES, REAL_NAME, REAL_NAMESPACE))
    log(f"  real-shaped package: {real['files']} files, {real['bytes'] / 2**20:.0f} MiB")
    return Caches(out, big, stack, index, real)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    generate(REPO / "bench" / "out" / "caches", Sizes.quick() if quick else Sizes.full())
