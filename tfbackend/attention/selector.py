"""Choosing an attention backend by name and device."""

from __future__ import annotations

import torch

from tfbackend.attention.backend import AttentionBackend

ATTENTION_BACKENDS = ("auto", "triton", "torch")


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks Triton on CUDA and the PyTorch reference elsewhere."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        from tfbackend.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from tfbackend.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
