"""The library beneath the entry scripts; nclib/README-style map in the repository README ("How a run flows")."""
