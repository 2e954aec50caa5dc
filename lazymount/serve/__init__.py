"""Serving the tree: the FUSE filesystem (the only importer of pyfuse3) and bind mounts of ready
packages."""
