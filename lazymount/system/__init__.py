"""Small helpers over the operating system that every layer may use (YAML, files, mounts)."""
