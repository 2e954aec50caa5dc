# lazymount test fixture package (not part of Spack)
import os

from spack_repo.builtin.build_systems.generic import Package

from spack.package import *

# The sources live here, so the package needs no download.
SOURCE = r"""
#include <stdio.h>

/* The x86-64 level the compiler targeted, from the macros -march defines. */
const char *isa_level(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return "x86_64_v4";
#elif defined(__AVX2__) && defined(__FMA__)
    return "x86_64_v3";
#elif defined(__SSE4_2__) && defined(__POPCNT__)
    return "x86_64_v2";
#else
    return "x86_64";
#endif
}

const char *isa_prefix(void) { return ISA_PREFIX; }
"""


class Lmisalib(Package):
    """Shared library libisa.so telling which x86-64 level it was compiled for."""

    homepage = "https://example.invalid/lazymount"
    has_code = False

    version("1.0")

    depends_on("c", type="build")

    def install(self, spec, prefix):
        mkdirp(prefix.lib, prefix.include)
        source = join_path(prefix, "isa.c")
        with open(source, "w") as f:
            f.write(SOURCE)
        cc = Executable(spack_cc)
        cc("-O2", "-fPIC", "-shared", "-Wl,-soname,libisa.so", f'-DISA_PREFIX="{prefix}"',
           "-o", prefix.lib.join("libisa.so"), source)
        os.remove(source)
        with open(prefix.include.join("isa.h"), "w") as f:
            f.write("const char *isa_level(void);\nconst char *isa_prefix(void);\n")
