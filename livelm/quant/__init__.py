"""Quantized weights: formats, CPU/CUDA kernels, and the modules that use them."""
