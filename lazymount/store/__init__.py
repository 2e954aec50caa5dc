"""The local content store: relocated package trees, published atomically."""
