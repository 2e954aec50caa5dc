"""The build-cache formats: where things live in a cache (layouts v2 and v3), index,
manifests, and fetching checked blobs."""
