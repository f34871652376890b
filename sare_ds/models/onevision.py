"""onevision family adapter (in progress)."""
