"""Data layer: ingest any supported format into one record table, split it, cache its pixels."""
