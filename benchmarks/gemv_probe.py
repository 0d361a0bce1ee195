"""Can a Triton GEMV beat cuBLAS at decode sizes? bf16 ``x[M, K] @ W[N, K].T`` for M = 1 and 8, timed as
CUDA-graph replays against ``F.linear``, on the projection shapes of the presets whose batch-1 decode misses its
target (issue 12: llama-3.2-1b native <= 1.0 ms; gemma2-2b fallback <= 2.3 ms).

    python3 benchmarks/gemv_probe.py

The kernel: one program per BLOCK_N output columns (and per SPLIT_K slice of K, whose partial sums are added
atomically into a float32 buffer), streaming its weight rows once with the activations read from L2. Each
configuration is checked against ``F.linear`` in float32 before it is timed. Prints, per shape, cuBLAS's time
and achieved bandwidth, the best Triton configuration's, and their ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_k * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K == 1:  # straight into the bf16 output
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptr + rows[:, None] * N + cols[None, :], acc, mask=mask, sem="relaxed")


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, split_k: int, warps: int, stages: int):
    m, k = x.shape
    n = w.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if split_k > 1 else \
        torch.empty(m, n, dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    block_m = 1 if m == 1 else 16
    _gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w, out, m, n, k, k_per_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages)
    return out.to(x.dtype)


SHAPES = {  # name: (N, K)
    "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192),
    "1b lm_head": (128256, 2048),
    "gemma2 qkv": (4096, 2304), "gemma2 o": (2304, 2048), "gemma2 gate_up": (18432, 2304),
    "gemma2 down": (2304, 9216), "gemma2 lm_head": (256000, 2304),
}
CONFIGS = [(bn, bk, sk, w, s) for bn in (8, 16, 32) for bk in (256, 512) for sk in (1, 2, 4)
           for w, s in ((4, 3), (8, 3))]


def main() -> None:
    torch.manual_seed(0)
    bandwidth_note = "GB/s = weight bytes / time"
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | {bandwidth_note}")
    print(f"{'shape':16} {'M':>2} {'cuBLAS us':>9} {'GB/s':>6} {'triton us':>9} {'GB/s':>6} {'ratio':>6}  best config")
    for m in (1, 8):
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = F.linear(x.float(), w.float())
            dense_us = do_bench_cudagraph(lambda: F.linear(x, w)) * 1e3
            best = None
            for config in CONFIGS:
                if m > 1 and config[0] < 16:
                    continue
                try:
                    out = gemv(x, w, *config)
                except Exception:  # out of shared memory / registers for this tile
                    continue
                error = ((out.float() - reference).norm() / reference.norm()).item()
                if error > 1e-2:
                    print(f"  {name} {config}: error {error:.1e}, skipped")
                    continue
                us = do_bench_cudagraph(lambda config=config: gemv(x, w, *config)) * 1e3
                if best is None or us < best[0]:
                    best = (us, config)
            gb = n * k * 2 / 1e3
            print(f"{name:16} {m:>2} {dense_us:9.1f} {gb / dense_us:6.0f} {best[0]:9.1f} {gb / best[0]:6.0f} "
                  f"{best[0] / dense_us:6.2f}  {best[1]}")


if __name__ == "__main__":
    main()
