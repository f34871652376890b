"""qwen2_vl family adapter (in progress)."""
