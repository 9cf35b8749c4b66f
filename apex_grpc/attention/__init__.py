"""Attention: the backend seam (base), torch reference, Triton GPU kernels, native CPU pool, hybrid."""
