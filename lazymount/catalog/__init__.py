"""What the mount shows: every mirror's index loaded into one catalog (kept on disk between
mounts) and placed in the install tree by the projection."""
