"""Data layer: ingest any supported format into one record table, split it, cache its pixels, stream it as
shards; the only decoder of untrusted bytes (in this process or in a worker pool)."""
