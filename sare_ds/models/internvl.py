"""internvl family adapter (in progress)."""
