"""lazymount: a Spack binary build cache, mounted read-only as an install tree."""

__version__ = "0.1.0"
