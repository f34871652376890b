"""idefics3 family adapter (in progress)."""
