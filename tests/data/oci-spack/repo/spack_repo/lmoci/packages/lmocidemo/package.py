# Built by lazymount's OCI test with the real Spack, pushed into a registry, mounted back.
from spack.package import *


class Lmocidemo(Package):
    """A script that prints where it is installed."""

    homepage = "https://example.invalid/lazymount"
    has_code = False

    version("1.0")

    def install(self, spec, prefix):
        mkdirp(prefix.bin)
        script = join_path(prefix.bin, "lmocidemo")
        with open(script, "w") as handle:
            handle.write(f"#!/bin/sh\necho 'installed at {prefix}'\n")
        set_executable(script)
