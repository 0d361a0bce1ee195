"""Check the Triton attention kernels against the PyTorch reference at real sizes on a CUDA GPU, and time them.

Run from the repository root: ``python3 benchmarks/gpu_attention_check.py [--sweep]``. Exits non-zero if any
check fails. Each case writes a step's K/V with both backends (caches must match exactly), compares attention
outputs (relative L2 error < 1e-2 in bf16), then times the Triton kernels with ``triton.testing.do_bench``
(median): eagerly, which includes Python launch overhead, and as CUDA-graph replays, which is what decode
steps cost in a graph-capturing runner. Bandwidth is the KV bytes attention must read over the graph time.
Two more checks capture decode steps in CUDA graphs, shrink the sequences in place and replay.
``--sweep`` also times alternative tile configurations, to retune ``_tile_config``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from tfbackend.attention import triton_backend  # noqa: E402
from tfbackend.attention.backend import AttentionMetadata, LayerAttentionOptions  # noqa: E402
from tfbackend.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tfbackend.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
MAX_REL_ERROR = 1e-2
GRAPH_REPEATS = 10  # calls per captured graph, so replay launch cost is amortised


@dataclass
class Case:
    name: str
    cached: list[int]  # keys already in the cache per sequence
    new: list[int]  # this step's tokens per sequence
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    sliding_window: int | None = None
    sinks: bool = False
    split_kv: bool | None = None


@dataclass
class Step:
    """One case's tensors on the GPU."""

    metadata: AttentionMetadata
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    options: LayerAttentionOptions


def make_metadata(cached: list[int], new: list[int], max_seq_len: int | None = None) -> AttentionMetadata:
    """Paged metadata with blocks handed out in random order, as a long-running block allocator leaves them."""
    seq_lens = [c + n for c, n in zip(cached, new)]
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    max_blocks = -(-(max_seq_len or max(seq_lens)) // BLOCK_SIZE)
    permutation = torch.randperm(sum(blocks_per_seq), device=DEVICE, dtype=torch.int32)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32, device=DEVICE)
    slot_chunks, offset = [], 0
    for b, (c, n) in enumerate(zip(cached, new)):
        table = permutation[offset : offset + blocks_per_seq[b]]
        offset += blocks_per_seq[b]
        block_tables[b, : len(table)] = table
        positions = torch.arange(c, c + n, device=DEVICE)
        slot_chunks.append(table[positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.cat(slot_chunks),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables,
        max_query_len=max(new),
        max_seq_len=max_seq_len or max(seq_lens),
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
    )


def make_step(case: Case, max_seq_len: int | None = None) -> Step:
    torch.manual_seed(0)
    metadata = make_metadata(case.cached, case.new, max_seq_len)
    num_tokens, d = sum(case.new), case.head_dim
    num_blocks = int(metadata.block_tables.max().item()) + 1
    cache_shape = (num_blocks, BLOCK_SIZE, case.num_kv_heads, d)
    return Step(
        metadata=metadata,
        query=torch.randn(num_tokens, case.num_q_heads, d, device=DEVICE, dtype=DTYPE),
        key=torch.randn(num_tokens, case.num_kv_heads, d, device=DEVICE, dtype=DTYPE),
        value=torch.randn(num_tokens, case.num_kv_heads, d, device=DEVICE, dtype=DTYPE),
        key_cache=torch.randn(cache_shape, device=DEVICE, dtype=DTYPE),
        value_cache=torch.randn(cache_shape, device=DEVICE, dtype=DTYPE),
        options=LayerAttentionOptions(
            scale=d**-0.5,
            sliding_window=case.sliding_window,
            sinks=torch.randn(case.num_q_heads, device=DEVICE) if case.sinks else None,
        ),
    )


def visible_keys(case: Case) -> tuple[int, int]:
    """(distinct keys each KV head must read, query-key pairs attended), counting the sliding window."""
    keys = pairs = 0
    window = case.sliding_window or 1 << 60
    for c, n in zip(case.cached, case.new):
        seq_len = c + n
        keys += min(seq_len, n - 1 + window)
        pairs += sum(min(pos + 1, window) for pos in range(c, seq_len))
    return keys, pairs


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def graph_time_ms(fn: Callable[[], object]) -> float:
    """Median time of one ``fn`` call replayed from a CUDA graph (fn must have run once, to compile)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPEATS):
            fn()
    return triton.testing.do_bench(graph.replay, return_mode="median") / GRAPH_REPEATS


def run_case(case: Case) -> tuple[bool, str]:
    step = make_step(case)
    m = step.metadata
    reference, backend = TorchAttentionBackend(), TritonAttentionBackend(split_kv=case.split_kv)
    ref_key_cache, ref_value_cache = step.key_cache.clone(), step.value_cache.clone()
    reference.write_kv(step.key, step.value, ref_key_cache, ref_value_cache, m.slot_mapping)
    backend.write_kv(step.key, step.value, step.key_cache, step.value_cache, m.slot_mapping)
    cache_ok = torch.equal(step.key_cache, ref_key_cache) and torch.equal(step.value_cache, ref_value_cache)

    expected = reference.attend(step.query, ref_key_cache, ref_value_cache, m, step.options)
    out = torch.full_like(expected, float("nan"))

    def attend() -> None:
        backend.attend(step.query, step.key_cache, step.value_cache, m, step.options, out=out)

    def write() -> None:
        backend.write_kv(step.key, step.value, step.key_cache, step.value_cache, m.slot_mapping)

    attend()
    error = relative_error(out, expected)
    ok = cache_ok and not out.isnan().any().item() and error < MAX_REL_ERROR

    eager_ms = triton.testing.do_bench(attend, return_mode="median")
    graph_ms = graph_time_ms(attend)
    write_ms = graph_time_ms(write)
    keys, pairs = visible_keys(case)
    d = case.head_dim
    kv_bytes = keys * case.num_kv_heads * 2 * d * DTYPE.itemsize
    write_bytes = 2 * sum(case.new) * case.num_kv_heads * 2 * d * DTYPE.itemsize  # read new K/V, write cache
    tflops = 4 * pairs * case.num_q_heads * d / (graph_ms * 1e-3) / 1e12
    splits = backend.plan(step.query, step.key_cache, step.value_cache, m).num_splits
    row = (
        f"{case.name:<42} {sum(case.new):>6} {splits:>6} {error:>8.1e} {'ok' if ok else 'FAIL':>5} "
        f"{eager_ms * 1e3:>8.1f} {graph_ms * 1e3:>8.1f} {kv_bytes / (graph_ms * 1e-3) / 1e9:>7.0f} "
        f"{tflops:>7.1f} {write_ms * 1e3:>8.1f} {write_bytes / (write_ms * 1e-3) / 1e9:>7.0f}"
    )
    return ok, row + ("" if cache_ok else "  (cache write mismatch)")


def check_cuda_graph(batch: int, context: int, bucket: int) -> bool:
    """Capture a decode step with max_seq_len = bucket, shrink the sequences in place, replay, compare."""
    step = make_step(Case("graph", [context - 1] * batch, [1] * batch), max_seq_len=bucket)
    m = step.metadata
    backend = TritonAttentionBackend()
    out = torch.empty_like(step.query)

    def attend() -> None:
        backend.attend(step.query, step.key_cache, step.value_cache, m, step.options, out=out)

    attend()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attend()
    new_lens = torch.randint(1, context + 1, (batch,), device=DEVICE, dtype=torch.int32)
    m.seq_lens.copy_(new_lens)
    out.fill_(float("nan"))
    graph.replay()
    m.seq_lens_host = new_lens.tolist()
    expected = TorchAttentionBackend().attend(step.query, step.key_cache, step.value_cache, m, step.options)
    error = relative_error(out, expected)
    ok = error < MAX_REL_ERROR  # NaN compares false
    splits = backend.plan(step.query, step.key_cache, step.value_cache, m).num_splits
    print(
        f"CUDA graph decode B={batch} context<={context} bucket={bucket} splits={splits}: "
        f"rel err {error:.1e} {'ok' if ok else 'FAIL'}"
    )
    return ok


def sweep(case: Case, configs: list[tuple[int, int, int, int]]) -> None:
    """Graph-replay time of ``attend`` for each (BLOCK_M, TILE_N, num_warps, num_stages)."""
    step = make_step(case)
    backend = TritonAttentionBackend(split_kv=case.split_kv)
    out = torch.empty(step.query.shape[0], case.num_q_heads, case.head_dim, device=DEVICE, dtype=DTYPE)
    results = []
    for config in configs:
        with mock.patch.object(triton_backend, "_tile_config", lambda *args, config=config: config):

            def attend() -> None:
                backend.attend(step.query, step.key_cache, step.value_cache, step.metadata, step.options, out=out)

            attend()
            results.append(f"{config}: {graph_time_ms(attend) * 1e3:.1f} us")
    print(f"sweep {case.name}: " + "; ".join(results), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    generator = torch.Generator().manual_seed(0)
    decode_contexts = torch.randint(64, 769, (256,), generator=generator).tolist()
    # 8192 tokens: four prefill chunks (two with a cached prefix) and 64 decodes.
    mixed_cached = [0, 1024, 3072, 0] + torch.randint(64, 2049, (64,), generator=generator).tolist()
    mixed_new = [2048, 2048, 2048, 1984] + [1] * 64
    decode = Case("decode B=256 ctx 64-768", [c - 1 for c in decode_contexts], [1] * 256)
    mixed = Case("mixed 8192 tok: 4 prefills + 64 decodes", mixed_cached, mixed_new)
    split = Case("decode B=1 ctx 4096 (split-KV auto)", [4095], [1])
    cases = [
        decode,
        mixed,
        Case("mixed 8192 tok, head_dim 128", mixed_cached, mixed_new, head_dim=128),
        split,
        Case("decode B=1 ctx 4096 (split-KV off)", [4095], [1], split_kv=False),
        Case("decode B=16 ctx 4096 (split-KV auto)", [4095] * 16, [1] * 16),
        Case("decode B=64 ctx 4096 window 128 + sinks", [4095] * 64, [1] * 64, 64, 8, 64, 128, True),
    ]
    print(torch.cuda.get_device_name(), f"triton {triton.__version__}, torch {torch.__version__}", flush=True)
    header = (
        f"{'case':<42} {'tokens':>6} {'splits':>6} {'rel err':>8} {'check':>5} "
        f"{'eager us':>8} {'graph us':>8} {'KV GB/s':>7} {'TFLOP/s':>7} {'write us':>8} {'GB/s':>7}"
    )
    rows, all_ok = [header, "-" * len(header)], True
    for case in cases:
        ok, row = run_case(case)
        all_ok &= ok
        rows.append(row)
        print(row, flush=True)
    all_ok &= check_cuda_graph(batch=256, context=768, bucket=2048)
    all_ok &= check_cuda_graph(batch=1, context=4096, bucket=8192)
    if "--sweep" in sys.argv[1:]:
        decode_configs = [(16, 16, 2, 3), (16, 32, 4, 3), (16, 64, 4, 3), (16, 64, 4, 4), (16, 128, 4, 3)]
        sweep(decode, decode_configs)
        sweep(split, decode_configs)
        sweep(mixed, [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)])
    print("\n" + "\n".join(rows))
    print("ALL CHECKS PASSED" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
