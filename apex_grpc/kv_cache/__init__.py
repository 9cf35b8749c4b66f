"""Paged KV cache: block pools per tier, per-request block tables, and the storage tensors."""
