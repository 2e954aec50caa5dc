# A package of lazymount's test caches: what a downstream Spack needs to load the
# binaries it finds upstream (no build recipe: the caches provide the builds).
from spack.package import *


class Lmhello(Package):
    """A C program of the test caches, linked to lmgreet."""

    homepage = "https://example.invalid/lazymount"
    url = "file:///nonexistent/lmhello-1.0.tar.gz"

    version("1.0", sha256="0" * 64)

    depends_on("c", type="build")
    depends_on("lmgreet")
