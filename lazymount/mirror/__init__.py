"""Transports: getting bytes from a mirror (a folder, file://, http(s)://), each call bounded."""
