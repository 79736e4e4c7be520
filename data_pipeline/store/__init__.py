"""Store: what `prepare` runs on: chunks tokenized in a worker pool (tokenize_chunk,
worker_pool), memory-mapped shards and their manifest (shards, shard_cache, fingerprint), the
folders prepare may touch (prepared_folders), its report and command-line options."""
