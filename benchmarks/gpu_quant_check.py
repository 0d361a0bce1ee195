"""Check the quantized linears' GPU paths against their references at Llama-3.1-8B sizes, and time them.

Run from the repository root on a CUDA GPU (FP8 needs compute capability 8.9+): ``python3
benchmarks/gpu_quant_check.py``. Exits non-zero if any check fails. For each of Llama-3.1-8B's projections
(fused q/k/v, o, fused gate/up, down) and several token counts it builds every format from one random bf16
weight, compares the GPU path (``QuantizedLinear.apply_gpu``: ``torch._scaled_mm`` or the Triton GEMMs) with the
layer's CPU reference computed on the GPU (dequantized weight x input, float32; relative L2 error < 2e-2),
then times both with ``triton.testing.do_bench`` (median) against the bf16 ``F.linear``. An FP8 KV cache check
compares the Triton attention with the torch reference on the same FP8 cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from gguf import GGMLQuantizationType, quantize  # noqa: E402

from tfbackend.quantization.fp8 import ActivationScheme, quantize_weight  # noqa: E402
from tfbackend.quantization.fp8_linear import Fp8Format, Fp8Linear  # noqa: E402
from tfbackend.quantization.gguf import GGUFLinear  # noqa: E402
from tfbackend.quantization.int4 import Int4Format, Int4Linear  # noqa: E402
from tfbackend.quantization.linear import QuantizedLinear  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
MAX_REL_ERROR = 2e-2
# Llama-3.1-8B's linear layers as the native port fuses them: (name, in_features, shard output sizes).
SHAPES = [("qkv", 4096, [4096, 1024, 1024]), ("o", 4096, [4096]), ("gate_up", 4096, [14336, 14336]),
          ("down", 14336, [4096])]
TOKENS = [1, 16, 256, 2048]


def fp8_layer(weight, sizes, block) -> QuantizedLinear:
    activation = ActivationScheme(group_size=block[1] if block else None)
    fmt = Fp8Format(activation, block, scale_leaves=("weight_scale",))
    layer = Fp8Linear(weight.shape[1], sizes, [f"s{i}" for i in range(len(sizes))], False, DTYPE, DEVICE, fmt)
    return _fill(layer, weight, sizes, lambda w: dict(zip(("weight", "weight_scale"), _fp8(w, block))))


def _fp8(weight, block):
    quantized, grid = quantize_weight(weight, block)
    return quantized, grid.scale  # per channel [N, 1], or the block grid


def int4_layer(weight, sizes) -> QuantizedLinear:
    layer = Int4Linear(weight.shape[1], sizes, [f"s{i}" for i in range(len(sizes))], False, DTYPE, DEVICE,
                       Int4Format("gptq", 128, online=True))
    return _fill(layer, weight, sizes, lambda w: {"weight": w})


def gguf_layer(weight, sizes, qtype) -> QuantizedLinear:
    layer = GGUFLinear(weight.shape[1], sizes, [f"s{i}" for i in range(len(sizes))], False, DTYPE, DEVICE)

    def blocks(w):
        return {"qweight": torch.from_numpy(quantize(w.float().cpu().numpy(), qtype)),
                "qweight_type": torch.tensor(int(qtype))}
    return _fill(layer, weight, sizes, blocks)


def _fill(layer, weight, sizes, tensors_of):
    sinks, start = layer.checkpoint_sinks(), 0
    for index, size in enumerate(sizes):
        for leaf, tensor in tensors_of(weight[start : start + size]).items():
            sinks[f"s{index}.{leaf}"](tensor)
        start += size
    assert layer.ready
    return layer


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    failures = 0
    header = f"{'layer':8} {'format':14} {'tokens':>6} {'rel err':>9} {'µs':>9} {'bf16 µs':>9} {'ratio':>6}"
    print(header)
    for name, in_features, sizes in SHAPES:
        weight = torch.randn(sum(sizes), in_features, device=DEVICE, generator=generator).mul_(0.02).to(DTYPE)
        layers = {
            "fp8-channel": fp8_layer(weight, sizes, None),
            "fp8-block": fp8_layer(weight, sizes, (128, 128)),
            "int4-g128": int4_layer(weight, sizes),
            "gguf-Q8_0": gguf_layer(weight, sizes, GGMLQuantizationType.Q8_0),
            "gguf-Q4_1": gguf_layer(weight, sizes, GGMLQuantizationType.Q4_1),
        }
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device=DEVICE, generator=generator).to(DTYPE)
            dense_us = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, weight)) * 1e3
            for fmt, layer in layers.items():
                out = layer.apply_gpu(x).float()
                reference = layer.apply_reference(x)
                error = ((out - reference).norm() / reference.norm()).item()
                ok = error < MAX_REL_ERROR
                failures += not ok
                us = triton.testing.do_bench(lambda: layer.apply_gpu(x)) * 1e3
                print(f"{name:8} {fmt:14} {tokens:>6} {error:>9.2e} {us:>9.1f} {dense_us:>9.1f} "
                      f"{us / dense_us:>6.2f}{'' if ok else '  FAIL'}")
            layer = layers["fp8-channel"]
            assert layer.use_scaled_mm, "per-channel FP8 in bf16 should take torch._scaled_mm"
        del layers
        torch.cuda.empty_cache()
    failures += fp8_kv_cache_check()
    print("all checks passed" if failures == 0 else f"{failures} checks FAILED")
    return 1 if failures else 0


def fp8_kv_cache_check() -> int:
    """Triton attention on an FP8 cache against the torch reference on the same cache, with non-unit scales."""
    from tfbackend.attention.backend import AttentionMetadata, LayerAttentionOptions
    from tfbackend.attention.torch_backend import TorchAttentionBackend
    from tfbackend.attention.triton_backend import TritonAttentionBackend

    generator = torch.Generator(device=DEVICE).manual_seed(1)
    seq_lens, block_size, kv_heads, q_heads, head_dim = [700, 1, 33, 2048], 16, 8, 32, 128
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    slots, start = [], 0
    for b, n in enumerate(seq_lens):
        tables[b, : blocks_per_seq[b]] = torch.arange(start, start + blocks_per_seq[b])
        slots += [(start + p // block_size) * block_size + p % block_size for p in range(n)]
        start += blocks_per_seq[b]
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE), query_start_loc=torch.tensor(starts, dtype=torch.int32,
        device=DEVICE), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), max_query_len=max(seq_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=starts, seq_lens_host=seq_lens,
    )
    total = sum(seq_lens)
    key = torch.randn(total, kv_heads, head_dim, device=DEVICE, generator=generator).to(DTYPE) * 4
    value = torch.randn(total, kv_heads, head_dim, device=DEVICE, generator=generator).to(DTYPE)
    query = torch.randn(total, q_heads, head_dim, device=DEVICE, generator=generator).to(DTYPE)
    options = LayerAttentionOptions(scale=head_dim**-0.5)
    outputs = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        key_cache = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=DEVICE)
        value_cache = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=DEVICE)
        backend.write_kv(key, value, key_cache, value_cache, metadata.slot_mapping, 0.5, 2.0)
        outputs.append((key_cache.float(), backend.attend(query, key_cache, value_cache, metadata, options, 0.5, 2.0)))
    (ref_cache, ref_out), (cache, out) = outputs
    mismatched = (ref_cache != cache).float().mean().item()
    error = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    ok = mismatched < 1e-3 and error < MAX_REL_ERROR
    print(f"fp8 KV cache: {100 * mismatched:.3f}% of cache entries differ, attention rel err {error:.2e}"
          f"{'' if ok else '  FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
