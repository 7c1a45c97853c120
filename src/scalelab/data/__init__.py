"""Data beyond RAM: corpora, tokenizers, checksummed token shards, a deterministic loader, statistics.

Entry points (import from the submodules; this package imports nothing heavy on its own):

- `scalelab.data.store.ensure_store(data_spec, cache_dir=None) -> TokenStore` — build once, then open,
  the content-keyed token store for a `DataSpec`; `TokenStore.open(path)`, `.verify()`.
- `scalelab.data.loader.BlockLoader(store, split, block_tokens, global_batch_size, seed, rank,
  world_size, num_workers, prefetch)` — deterministic, resumable batches of token blocks; its
  background thread / worker processes (shared-memory slot ring) live in `scalelab.data.prefetch`.
- `scalelab.data.ingest.ingest(sources, out, tokenizer, heldout_fraction=, shard_tokens=, workers=)`.
- `scalelab.data.corpus` (`BuiltinCorpus`, `TextSource`, `JsonlSource`, `ParquetSource`,
  `sources_from_spec`), `scalelab.data.tokenize` (`ByteTokenizer`, `BPETokenizer`, `train_bpe`).
- `scalelab.data.stats` (`Moments`, `Quantiles`, `column_stats`, `token_store_stats`, `RobustScaler`).
- `scalelab.data.commands.app` — the `scalelab data` CLI.
"""
