"""Data beyond RAM: corpora, tokenizers, checksummed token shards, a deterministic loader, statistics."""
