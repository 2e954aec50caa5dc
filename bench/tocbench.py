"""(h) A CUDA-shaped package opened through its table of contents: rows 12a-12d.

The package (``cuda_package``): a few executables, big shared libraries, thousands of headers
and large data files, over 1 GiB uncompressed, its TOC written by ``lazymount publish``. A
second mirror serves the same files without the TOC (``lazymount/`` left out), for today's
path. Every cold figure starts with the page cache dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import generate
from .harness import drop_caches, median, short_dir, timed

GOAL_TOC_TIME = 0.1  # cold first run with a TOC: at most this times the eager time
GOAL_TOC_BYTES = 0.05  # bytes fetched for it: at most this share of the blob
GOAL_TOC_READ_ALL = 1.2  # every file read through the opened package vs whole materialization
RECIPE = 2


def cuda_package(writer: Any) -> Any:
    """~1.1 GiB in ~4,000 files: 4 executables linked to a core library, 6 shared libraries
    of 80 MiB, 4,000 headers (every tenth names the prefix), 3 data files of 200 MiB."""
    sc = generate.sc
    pkg = sc.Package("cudalike", "12.4.0")
    prefix = writer.prefix_of(pkg)
    content = generate.Content(seed=7)
    elves = generate._compile_big_elves(prefix, content, [80 << 20] * 6)
    files: dict[str, Any] = {"lib/libbigcore.so": elves["libbigcore.so"]}
    for name in ("tool", "nvcclike", "ptxaslike", "fatbinlike"):
        files[f"bin/{name}"] = elves["tool"]
    for index in range(6):
        files[f"lib64/libcudalike{index}.so.12.4.0"] = elves[f"libtpl{index}.so"]
        files[f"lib64/libcudalike{index}.so.12"] = sc.Symlink(f"libcudalike{index}.so.12.4.0")
    for index in range(4000):
        mention = f'#define CUDALIKE_PREFIX "{prefix}"\n' if index % 10 == 0 else ""
        files[f"include/cudalike/g{index // 200:02d}/h{index:05d}.h"] = (
            f"/* header {index} */\n#pragma once\n{mention}/*\n".encode()
            + content.text_slice(content.rng.randint(1000, 6000)) + b"*/\n")
    for index in range(3):
        files[f"share/cudalike/data/blob{index}.bin"] = content.binary(200 << 20)
    files["bin/cudalike-config"] = f"#!/bin/sh\necho {prefix}\n"
    pkg.files = files
    writer.add(pkg)
    return pkg


def make_cuda(out: Path, log: Any) -> dict[str, Any]:
    """The cache (reused while its recipe is unchanged), its TOC, and a plain mirror."""
    base = {"recipe": generate.RECIPE, "toc_recipe": RECIPE, "build_root": generate.BUILD_ROOT}

    def make(writer: Any) -> dict[str, Any]:
        pkg = cuda_package(writer)
        info = generate._entry_info(writer, pkg)
        info["files"] = sum(1 for v in pkg.files.values() if isinstance(v, bytes | str))
        info["bytes"] = sum(len(v) for v in pkg.files.values() if isinstance(v, bytes | str))
        return info

    info = generate._build(out / "cuda", base, make)
    mirror = out / "cuda" / "mirror"
    if not (mirror / "lazymount" / "v1" / "toc").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "lazymount", "publish", str(mirror),
             f"--signing-key={generate.SECRET_KEY}", f"--trust-key={generate.PUBLIC_KEY}"],
            capture_output=True, text=True, timeout=3600)
        if done.returncode:
            raise RuntimeError(f"lazymount publish failed:\n{done.stdout}{done.stderr}")
    plain = out / "cuda-plain" / "mirror"
    if not plain.is_dir():
        plain.mkdir(parents=True)
        for name in ("v3", "blobs"):
            os.symlink(f"../../cuda/mirror/{name}", plain / name)
    log(f"  CUDA-shaped package: {info['files']} files, {info['bytes'] / 2**30:.2f} GiB, "
        f"blob {info['tarball']['contentLength'] / 2**20:.0f} MiB")
    return info


def _read_all(top: Path) -> None:
    subprocess.run(["find", str(top), "-type", "f", "-exec", "cat", "{}", "+"], check=True,
                   stdout=subprocess.DEVNULL, timeout=3600)


def bench_toc(bench: Any, result: Any, run: Any, eager_install: Any) -> None:
    """Rows 12a-12d: cold first run with and without a TOC against the eager install; the
    bytes fetched; every file read through the opened package against materializing whole."""
    info = make_cuda(bench.caches.root, bench.log)
    tool = Path(info["projected"]) / "bin" / "tool"
    blob = info["tarball"]["contentLength"]
    checksum = info["tarball"]["checksum"]
    expect = "bigpkg data"
    toc_runs, plain_runs, eager_runs, fetched, read_toc, read_whole = [], [], [], [], [], []
    for rep in range(bench.reps):
        drop_caches()
        store = bench.later(bench.work / f"store-cuda-{rep}")
        with bench.mount("cuda", store) as mount:
            mark = bench.server.mark()
            toc_runs.append(timed(lambda m=mount: run(m.root / tool, expect)))
            fetched.append(sum(size for uri, _, size in bench.server.requests_since(mark)
                               if uri.startswith("/cuda/mirror/")))
            if "opened through its table of contents" not in mount.log_text():
                raise RuntimeError(f"the package was not opened:\n{mount.log_text()}")
            drop_caches()
            read_toc.append(timed(lambda m=mount: _read_all(m.root / info["projected"])))
        drop_caches()
        store = bench.later(bench.work / f"store-cuda-plain-{rep}")
        with bench.mount("cuda-plain", store) as mount:
            plain_runs.append(timed(lambda m=mount: run(m.root / tool, expect)))
        drop_caches()
        store = bench.later(bench.work / f"store-cuda-whole-{rep}")
        with bench.mount("cuda-plain", store) as mount:
            read_whole.append(timed(lambda m=mount: _read_all(m.root / info["projected"])))
        drop_caches()
        eager_root = bench.later(short_dir("lme"))
        parts = eager_install(bench, "cuda", [info], eager_root,
                              {info["hash"]: info["projected"]})
        parts["run_s"] = timed(lambda r=eager_root: run(r / tool, expect))
        eager_runs.append(sum(parts.values()))
        bench.log(f"  rep {rep + 1}: with a TOC {toc_runs[-1]:.2f} s ({fetched[-1] / 2**20:.1f} "
                  f"MiB), without {plain_runs[-1]:.2f} s, eager {eager_runs[-1]:.2f} s; read "
                  f"all: opened {read_toc[-1]:.1f} s, whole {read_whole[-1]:.1f} s")
    size = f"{info['bytes'] / 2**30:.2f} GiB"
    with_toc, without, eager = median(toc_runs), median(plain_runs), median(eager_runs)
    bench.add(result("12a", f"cold `bin/tool` of a CUDA-shaped package ({size}), with a TOC",
                     f"{with_toc:.2f} s", f"curl | tar xz + relocate + run: {eager:.2f} s",
                     with_toc / eager, "x the eager time", f"≤ {GOAL_TOC_TIME}x",
                     with_toc / eager <= GOAL_TOC_TIME,
                     {"toc_s": toc_runs, "eager_s": eager_runs}))
    share = median(fetched) / blob
    bench.add(result("12b", "bytes fetched for 12a (the TOC, windows and spans)",
                     f"{median(fetched) / 2**20:.1f} MiB", f"the blob: {blob / 2**20:.0f} MiB",
                     share, "of the blob", f"≤ {GOAL_TOC_BYTES:.0%}", share <= GOAL_TOC_BYTES,
                     {"fetched": fetched, "blob": blob, "checksum": checksum}))
    bench.add(result("12c", "cold `bin/tool` of the CUDA-shaped package, no TOC (today)",
                     f"{without:.2f} s", f"curl | tar xz + relocate + run: {eager:.2f} s",
                     without / eager, "x the eager time",
                     details={"plain_s": plain_runs, "eager_s": eager_runs}))
    opened, whole = median(read_toc), median(read_whole)
    bench.add(result("12d", "read every file of the opened package (cold, file by file)",
                     f"{opened:.1f} s", f"materialized whole, then read: {whole:.1f} s",
                     opened / whole, "x the time whole", f"≤ {GOAL_TOC_READ_ALL}x",
                     opened / whole <= GOAL_TOC_READ_ALL,
                     {"opened_s": read_toc, "whole_s": read_whole}))
