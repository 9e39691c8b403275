"""Where stage 1 comes from at fleet scale: fingerprint files, the cache, Dask, and the
out-of-core core table."""
