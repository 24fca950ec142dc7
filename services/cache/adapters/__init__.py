"""The cache's outside world: ``store`` (entries in the exact-cache KV bucket) and
``semantic`` (the embedder and the Qdrant collection of the semantic cache)."""
