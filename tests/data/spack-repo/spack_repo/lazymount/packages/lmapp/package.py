# Installed by the tests downstream of the mount: it must reuse lmhello from the upstream.
from spack.package import *
from spack_repo.builtin.build_systems.bundle import BundlePackage


class Lmapp(BundlePackage):
    """A bundle that runs lmhello: installing it builds nothing but itself."""

    homepage = "https://example.invalid/lazymount"

    version("1.0")

    depends_on("lmhello", type="run")
