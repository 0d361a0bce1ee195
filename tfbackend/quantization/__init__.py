"""Quantized checkpoints: FP8, int4 (AWQ/GPTQ) and GGUF linear layers, their kernels and their loading."""
