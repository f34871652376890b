"""instructblip family adapter (in progress)."""
