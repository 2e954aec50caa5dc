# Built by lazymount's table-of-contents test with the real Spack, pushed to a signed cache,
# then described by `lazymount publish`.
import os
import random

from spack.package import *


class Lmtocbig(Package):
    """Executables and a library with an RPATH, text naming the prefix, links, hard links,
    and enough data (random and text) to span several gzip seek points."""

    homepage = "https://example.invalid/lazymount"
    has_code = False

    version("1.0")

    def install(self, spec, prefix):
        cc = Executable("/usr/bin/cc")
        for folder in (prefix.bin, prefix.lib, prefix.include, prefix.share):
            mkdirp(folder)
        source = join_path(prefix.share, "lmtoc.c")
        with open(source, "w") as handle:
            handle.write('const char *lmtoc_where(void) { return "' + prefix + '"; }\n')
        cc("-shared", "-fPIC", "-o", join_path(prefix.lib, "liblmtoc.so"), source)
        main = join_path(prefix.share, "main.c")
        with open(main, "w") as handle:
            handle.write('#include <stdio.h>\nconst char *lmtoc_where(void);\n'
                         'int main(void) { printf("lmtoc at %s\\n", lmtoc_where()); '
                         'return 0; }\n')
        cc("-o", join_path(prefix.bin, "lmtoc"), main, "-L" + prefix.lib, "-llmtoc",
           "-Wl,-rpath," + prefix.lib)
        os.link(join_path(prefix.bin, "lmtoc"), join_path(prefix.bin, "lmtoc-again"))
        os.symlink("liblmtoc.so", join_path(prefix.lib, "liblmtoc.so.1"))
        script = join_path(prefix.bin, "lmtoc-env")
        with open(script, "w") as handle:
            handle.write(f"#!/bin/sh\nLD_LIBRARY_PATH={prefix.lib} exec {prefix.bin}/lmtoc\n")
        set_executable(script)
        rng = random.Random(11)
        with open(join_path(prefix.lib, "liblmtoc-data.bin"), "wb") as handle:
            handle.write(rng.randbytes(7 << 20))
        words = [f"w{n}" for n in range(400)]
        with open(join_path(prefix.share, "words.txt"), "w") as handle:
            handle.write(" ".join(rng.choice(words) for _ in range(2_000_000)))
        with open(join_path(prefix.share, "paths.txt"), "w") as handle:
            for n in range(20_000):
                handle.write(f"{prefix}/share/{n} {prefix.lib}:{n}\n")
        mkdirp(join_path(prefix.include, "lmtoc"))
        for n in range(200):
            with open(join_path(prefix.include, "lmtoc", f"h{n:03}.h"), "w") as handle:
                handle.write(f'#include "{prefix.include}/lmtoc/h{(n + 1) % 200:03}.h"\n')
