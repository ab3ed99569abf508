"""Batch re-embedding of the whole library: the pipeline and its durable state."""
