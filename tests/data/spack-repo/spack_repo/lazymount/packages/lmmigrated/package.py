# A package of lazymount's test caches: what a downstream Spack needs to load the
# binaries it finds upstream (no build recipe: the caches provide the builds).
from spack.package import *


class Lmmigrated(Package):
    """A C program of the migrated test cache."""

    homepage = "https://example.invalid/lazymount"
    url = "file:///nonexistent/lmmigrated-1.0.tar.gz"

    version("1.0", sha256="0" * 64)

    depends_on("c", type="build")
