"""paligemma family adapter (in progress)."""
