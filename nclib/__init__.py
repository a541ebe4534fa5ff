"""The library beneath the entry scripts, one module per concept: the README's "Contents" and "How a
run flows" say which module owns what."""
