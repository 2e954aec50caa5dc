# lazymount test fixture package (not part of Spack)
import os

from spack_repo.builtin.build_systems.generic import Package

from spack.package import *

SOURCE = r"""
#include <stdio.h>
#include <isa.h>

static const char *own_level(void) {
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

int main(void) {
    printf("lmisa %s built for %s\n", LMISA_VERSION, own_level());
    printf("libisa built for %s at %s\n", isa_level(), isa_prefix());
    return 0;
}
"""


class Lmisa(Package):
    """Program `isa` printing the x86-64 level it and its library were compiled for."""

    homepage = "https://example.invalid/lazymount"
    has_code = False

    version("1.1")
    version("1.0")

    depends_on("c", type="build")
    depends_on("lmisalib")

    def install(self, spec, prefix):
        lib = spec["lmisalib"].prefix
        mkdirp(prefix.bin)
        source = join_path(prefix, "isa.c")
        with open(source, "w") as f:
            f.write(SOURCE)
        cc = Executable(spack_cc)
        cc("-O2", f"-I{lib.include}", f'-DLMISA_VERSION="{spec.version}"',
           "-o", prefix.bin.join("isa"), source,
           f"-L{lib.lib}", f"-Wl,-rpath,{lib.lib}", "-lisa")
        os.remove(source)
