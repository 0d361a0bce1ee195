"""Native model ports: hand-written decoders on paged attention, loaded straight from safetensors."""

from tfbackend.native.layers import (
    MergedLinear,
    NativeCausalLM,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary_emb,
)
from tfbackend.native.weights import iterate_safetensors, safetensors_files

__all__ = [
    "MergedLinear",
    "NativeCausalLM",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary_emb",
    "iterate_safetensors",
    "safetensors_files",
]
