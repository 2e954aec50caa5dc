"""Turning a checked tarball into a relocated prefix: decompress, read tar members safely,
extract, relocate (ELF, text, links), sbang."""
