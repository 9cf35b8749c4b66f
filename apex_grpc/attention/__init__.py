"""Attention: the backend seam (base), torch reference, Triton GPU kernels, native CPU
pool, and the hybrid backend that combines them."""
