"""Check the quantized linears' GPU paths against their references at Llama-3.1-8B sizes, and time them.

Run from the repository root on a CUDA GPU (FP8 needs compute capability 8.9+): ``python3
benchmarks/gpu_quant_check.py``. Exits non-zero if any check fails. For each of Llama-3.1-8B's projections
(fused q/k/v, o, fused gate/up, down) and 1 / 4 / 16 / 32 / 256 / 2048 tokens it builds every format from one
random bf16 weight and compares each GPU path (``QuantizedLinear.apply_gpu``) with the layer's reference computed
on the GPU (dequantized weight x input, float32; relative L2 error < 2e-2). Per-channel FP8 runs three ways:
through ``torch._scaled_mm`` (what such a layer takes in a bf16 model above ``SMALL_BATCH_TOKENS`` tokens), forced
through the Triton GEMM (below), and through the decode GEMM (``kernels/fp8_decode_gemm.py``, what a long-K layer
takes for one token; forced here up to 32 tokens to show where it stops paying, "-" above). Block-scaled FP8
runs with 128-wide activation groups (the Triton GEMM) and with per-token activations through the decode GEMM.
A decode cell also fails (!) if the GEMM's split-K counters are not back to zero after the CUDA-graph replays or
a replayed result differs from the eager one. Times are ``triton.testing.do_bench_cudagraph`` medians (the GPU
time of a CUDA-graph replay, as the engine's decode steps run), printed as a ratio to bf16 ``F.linear`` on the
same input. Then: the one-launch FP8 activation quantizer and the decode GEMM's in-kernel quantization against
``fp8.quantize_activation`` (codes and scales identical), how long ``torch.compile`` takes on a stack of FP8
layers, and the FP8 KV cache's Triton attention against the torch reference.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from gguf import GGMLQuantizationType, quantize  # noqa: E402

from tfbackend.quantization.fp8 import (  # noqa: E402
    ActivationScheme,
    dequantize_activation,
    quantize_activation,
    quantize_weight,
)
from tfbackend.quantization.fp8_linear import (  # noqa: E402
    DECODE,
    SCALED_MM,
    SMALL_BATCH_TOKENS,
    TRITON,
    Fp8Format,
    Fp8Linear,
)
from tfbackend.quantization.gguf import GGUFLinear  # noqa: E402
from tfbackend.quantization.int4 import Int4Format, Int4Linear  # noqa: E402
from tfbackend.quantization.kernels.fp8_decode_gemm import decode_counters, fp8_decode_gemm  # noqa: E402
from tfbackend.quantization.kernels.fp8_quant import fp8_quantize_tokens  # noqa: E402
from tfbackend.quantization.kernels.tiles import decode_tiles  # noqa: E402
from tfbackend.quantization.linear import QuantizedLinear  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
MAX_REL_ERROR = 2e-2
# Llama-3.1-8B's linear layers as the native port fuses them: (name, in_features, shard output sizes).
SHAPES = [("qkv", 4096, [4096, 1024, 1024]), ("o", 4096, [4096]), ("gate_up", 4096, [14336, 14336]),
          ("down", 14336, [4096])]
TOKENS = [1, 4, 16, 32, 256, 2048]
FORMATS = ["fp8-ch/mm", "fp8-ch/tri", "fp8-ch/dec", "fp8-blk/tri", "fp8-blk/dec", "int4-g128", "Q8_0", "Q4_1"]
# The decode GEMM columns force it up to this many tokens (by default a layer takes it for one token at most).
DECODE_COLUMN_TOKENS = 32


def fp8_layer(weight, sizes, block, path: str | None = None, decode_max_tokens: int | None = None,
              grouped: bool = True) -> Fp8Linear:
    """An FP8 layer as loaded (``path`` None), or forced onto ``path`` and the decode GEMM up to
    ``decode_max_tokens``. Block scales pair with 128-wide activation groups unless ``grouped`` is False."""
    activation = ActivationScheme(group_size=block[1] if block and grouped else None)
    fmt = Fp8Format(activation, block, scale_leaves=("weight_scale",))
    layer = Fp8Linear(weight.shape[1], sizes, [f"s{i}" for i in range(len(sizes))], False, DTYPE, DEVICE, fmt)
    _fill(layer, weight, sizes, lambda w: dict(zip(("weight", "weight_scale"), _fp8(w, block))))
    if path is not None:
        layer.use_gemm(path, decode_max_tokens)
    return layer


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


def gpu_us(fn) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph, in µs."""
    return triton.testing.do_bench_cudagraph(fn) * 1e3


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    failures = 0
    print("time of each format / bf16 F.linear (CUDA-graph replay); relative error in parentheses")
    print(f"{'layer':8} {'tokens':>6} {'bf16 µs':>8} " + " ".join(f"{fmt:>16}" for fmt in FORMATS))
    for name, in_features, sizes in SHAPES:
        weight = torch.randn(sum(sizes), in_features, device=DEVICE, generator=generator).mul_(0.02).to(DTYPE)
        layers = {
            "fp8-ch/mm": fp8_layer(weight, sizes, None),
            "fp8-ch/tri": fp8_layer(weight, sizes, None, TRITON, 0),
            "fp8-ch/dec": fp8_layer(weight, sizes, None, SCALED_MM, DECODE_COLUMN_TOKENS),
            "fp8-blk/tri": fp8_layer(weight, sizes, (128, 128)),
            "fp8-blk/dec": fp8_layer(weight, sizes, (128, 128), TRITON, DECODE_COLUMN_TOKENS, grouped=False),
            "int4-g128": int4_layer(weight, sizes),
            "Q8_0": gguf_layer(weight, sizes, GGMLQuantizationType.Q8_0),
            "Q4_1": gguf_layer(weight, sizes, GGMLQuantizationType.Q4_1),
        }
        loaded = layers["fp8-ch/mm"]
        if loaded.gemm_path != SCALED_MM or loaded.gemm_for_tokens(SMALL_BATCH_TOKENS + 1) != SCALED_MM:
            print(f"FAIL: per-channel FP8 in bf16 should take torch._scaled_mm above {SMALL_BATCH_TOKENS} tokens")
            failures += 1
        loaded.use_gemm(SCALED_MM, decode_max_tokens=0, small_batch_tokens=0)  # the column: _scaled_mm at every size
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device=DEVICE, generator=generator).to(DTYPE)
            dense_us = gpu_us(lambda x=x, weight=weight: torch.nn.functional.linear(x, weight))
            cells = []
            for fmt in FORMATS:
                layer = layers[fmt]
                decode = fmt.endswith("/dec")
                if decode and layer.gemm_for_tokens(tokens) != DECODE:
                    cells.append("-")
                    continue
                out = layer.apply_gpu(x)
                reference = layer.apply_reference(x)
                error = ((out.float() - reference).norm() / reference.norm()).item()
                ok = error < MAX_REL_ERROR
                ratio = gpu_us(lambda layer=layer, x=x: layer.apply_gpu(x)) / dense_us
                if decode:  # the graph replays left the counters zero, and split-K sums in a fixed order
                    ok = ok and not layer.decode_counters.any() and torch.equal(layer.apply_gpu(x), out)
                failures += not ok
                cells.append(f"{ratio:5.2f}x ({error:.1e}){'' if ok else '!'}")
            print(f"{name:8} {tokens:>6} {dense_us:>8.1f} " + " ".join(f"{cell:>16}" for cell in cells))
        del layers
        torch.cuda.empty_cache()
    failures += activation_quantizer_check()
    failures += decode_quantization_check()
    failures += compile_check()
    failures += fp8_kv_cache_check()
    print("all checks passed" if failures == 0 else f"{failures} checks FAILED (! in the table: error too large)")
    return 1 if failures else 0


def activation_quantizer_check() -> int:
    """The one-launch quantizer gives ``quantize_activation``'s codes and scales bit for bit."""
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    worst = 0.0
    for tokens, features, group in [(1, 4096, None), (37, 14336, None), (256, 4096, 128), (2048, 14336, 128)]:
        x = torch.randn(tokens, features, device=DEVICE, generator=generator).mul_(3).to(DTYPE)
        scheme = ActivationScheme(group_size=group)
        codes, scales = fp8_quantize_tokens(x, group or features, None)
        expected_codes, expected_scales = quantize_activation(x, scheme)
        scales_equal = torch.equal(scales, expected_scales)
        worst = max(worst, (codes.float() != expected_codes.float()).float().mean().item(), 0.0 if scales_equal else 1)
    ok = worst == 0
    print(f"fp8 activation quantizer: {100 * worst:.4f}% of codes or scales differ from quantize_activation"
          f"{'' if ok else '  FAIL'}")
    return 0 if ok else 1


def decode_quantization_check() -> int:
    """The decode GEMM's in-kernel codes are ``quantize_activation``'s bit for bit: through an identity weight
    (scale 1) each float32 output is exactly one code times its token's scale."""
    generator = torch.Generator(device=DEVICE).manual_seed(4)
    worst = 0.0
    for tokens, features, scale_ub in [(1, 4096, None), (16, 4096, 2.0), (3, 14336, None)]:
        x = torch.randn(tokens, features, device=DEVICE, generator=generator).mul_(3).to(DTYPE).float()
        identity = torch.eye(features, device=DEVICE).to(torch.float8_e4m3fn)
        tiles = decode_tiles(features, features, torch.cuda.get_device_properties(DEVICE).multi_processor_count)
        out = fp8_decode_gemm(x, identity, torch.ones(1, 1, device=DEVICE), features, features, scale_ub,
                              decode_counters(features, DEVICE), tiles.block_n, tiles.splits)
        scheme = ActivationScheme(scale_ub=scale_ub)
        expected = dequantize_activation(*quantize_activation(x, scheme), scheme)
        worst = max(worst, (out != expected).float().mean().item())
    ok = worst == 0
    print(f"fp8 decode GEMM quantization: {100 * worst:.4f}% of dequantized codes differ from quantize_activation"
          f"{'' if ok else '  FAIL'}")
    return 0 if ok else 1


def compile_check(num_layers: int = 32) -> int:
    """``torch.compile(dynamic=True)`` of ``num_layers`` FP8 gate/up-sized layers with norms between them, as the
    engine compiles a model: the FP8 linears are opaque ops, so this should take seconds, not minutes."""
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    weight = torch.randn(4096, 4096, device=DEVICE, generator=generator).mul_(0.02).to(DTYPE)
    layers = [fp8_layer(weight, [4096], None) for _ in range(num_layers)]

    def forward(x):
        for layer in layers:
            x = layer(torch.nn.functional.rms_norm(x, (4096,)))
        return x

    torch._dynamo.reset()
    compiled = torch.compile(forward, dynamic=True)
    start = time.perf_counter()
    for tokens in (1, 7, 256):
        compiled(torch.randn(tokens, 4096, device=DEVICE, dtype=DTYPE))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    x = torch.randn(5, 4096, device=DEVICE, dtype=DTYPE)
    error = ((compiled(x).float() - forward(x).float()).norm() / forward(x).float().norm()).item()
    ok = seconds < 60 and error < MAX_REL_ERROR
    print(f"torch.compile of {num_layers} FP8 layers (3 token counts): {seconds:.1f} s, rel err vs eager {error:.1e}"
          f"{'' if ok else '  FAIL'}")
    return 0 if ok else 1


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
