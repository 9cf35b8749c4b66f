"""Attention: the batch layout and the two sides' protocols (layout, base), the device
backends (torch reference, Triton, native CPU device), the host side (native CPU pool and
hand-off) and the kernels behind them."""
