"""The compat tier: HF models with their own attention and caches, continuously batched (see model.py)."""
