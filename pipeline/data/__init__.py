"""Parquet logs to Batches: feature spec, day discovery, validation, conversion, the per-rank reader, synthetic logs."""
