"""Spack's side of the mount: its mirrors.yaml and upstreams.yaml, and the synthesized upstream
database."""
