"""FP8 KV cache (``--kv-cache-dtype fp8``): the cache's dtype and each attention layer's key and value scales.

Keys and values are stored as ``x / scale`` in E4M3 and read back as ``stored * scale``. Scales come from the
checkpoint where it has them (compressed-tensors' ``kv_cache_scheme`` saves ``self_attn.k_scale`` / ``v_scale``,
older FP8 exports ``self_attn.kv_scale`` or ``k_proj.output_scale`` / ``v_proj.output_scale``), else they are 1.0,
as in vLLM: E4M3 spans ±448, far beyond the keys and values of a normalized transformer.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
FP8_KV_DTYPE = torch.float8_e4m3fn

# Checkpoint tensor name -> (layer index, which scales it sets).
_SCALE_NAMES = [
    (re.compile(r"layers\.(\d+)\.self_attn\.k_scale$"), "k"),
    (re.compile(r"layers\.(\d+)\.self_attn\.v_scale$"), "v"),
    (re.compile(r"layers\.(\d+)\.self_attn\.kv_scale$"), "kv"),
    (re.compile(r"layers\.(\d+)\.self_attn\.k_proj\.output_scale$"), "k"),
    (re.compile(r"layers\.(\d+)\.self_attn\.v_proj\.output_scale$"), "v"),
]


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for ``--kv-cache-dtype``: the model's for ``auto``, E4M3 for ``fp8``."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype must be auto or one of {FP8_KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def is_kv_cache_scale(name: str) -> bool:
    """Whether a checkpoint tensor is a KV-cache scale (read by the engine, not by the model)."""
    return any(pattern.search(name) for pattern, _ in _SCALE_NAMES)


def read_kv_cache_scales(files: list[Path], num_layers: int) -> list[tuple[float, float]]:
    """Per layer ``(k_scale, v_scale)`` from the checkpoint's safetensors ``files``; 1.0 where it has none."""
    scales = [[1.0, 1.0] for _ in range(num_layers)]
    found = 0
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                for pattern, which in _SCALE_NAMES:
                    match = pattern.search(name)
                    if match is None:
                        continue
                    layer, value = int(match.group(1)), f.get_tensor(name).to(torch.float32)
                    if layer >= num_layers or value.numel() != 1 or not torch.isfinite(value).all() or value <= 0:
                        raise ValueError(f"{name}: a KV-cache scale must be one finite positive number of a layer "
                                         f"below {num_layers}, got {value.tolist()}")
                    for slot in {"k": [0], "v": [1], "kv": [0, 1]}[which]:
                        scales[layer][slot] = value.item()
                    found += 1
    if found == 0:
        logger.info("FP8 KV cache: the checkpoint has no KV-cache scales, using 1.0 for every layer")
    return [(k, v) for k, v in scales]
