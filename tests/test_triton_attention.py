"""The Triton attention backend against the PyTorch reference, on CPU through Triton's interpreter.

Tiny sizes keep the interpreter fast; the GPU check at real sizes is ``benchmarks/gpu_attention_check.py``.
"""

import os

# The interpreter is chosen when triton is imported, so this must come first.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton")

from tests.triton_interpreter import interpreter_bf16_dot  # noqa: E402, F401
from tfbackend.attention.backend import AttentionMetadata, LayerAttentionOptions  # noqa: E402
from tfbackend.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tfbackend.attention.triton_backend import TritonAttentionBackend  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")


def _make_step(
    cached: list[int], new: list[int], block_size: int, num_blocks: int, generator: torch.Generator
) -> tuple[AttentionMetadata, list[int]]:
    """Metadata for sequences with ``cached[b]`` keys already stored and ``new[b]`` tokens this step.

    Physical blocks are handed out in a shuffled order so that pages of one sequence are not adjacent.
    Returns the metadata and the slots of the cached prefixes (to fill before the step).
    """
    seq_lens = [c + n for c, n in zip(cached, new)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    free = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 2, dtype=torch.int32)  # padded
    slot_mapping, prefix_slots = [], []
    for b, (c, n) in enumerate(zip(cached, new)):
        table = [free.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
        slots = [table[p // block_size] * block_size + p % block_size for p in range(c + n)]
        prefix_slots += slots[:c]
        slot_mapping += slots[c:]
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
    )
    return metadata, prefix_slots


def _check(
    *,
    cached: list[int],
    new: list[int],
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    d_k: int = 16,
    d_v: int | None = None,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    sinks: bool = False,
    split_kv: bool | None = None,
    min_keys_per_split: int = 16,
    max_seq_len: int | None = None,
    pad_tokens: int = 0,
) -> TritonAttentionBackend:
    """Write and attend one step with both backends and compare; returns the Triton backend used.

    ``max_seq_len`` overrides the metadata's bound on sequence lengths, as a CUDA graph captured for
    ``max_model_len`` has it.
    """
    generator = torch.Generator().manual_seed(sum(cached) * 31 + sum(new) + d_k)
    d_v = d_v or d_k
    metadata, prefix_slots = _make_step(cached, new, block_size, num_blocks=64, generator=generator)
    if max_seq_len is not None:
        metadata.max_seq_len = max_seq_len
    num_tokens = sum(new)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    # Unwritten cache slots hold NaN: reading any key beyond a sequence's length poisons the output.
    key_cache = torch.full((64, block_size, num_kv_heads, d_k), float("nan"), dtype=dtype)
    value_cache = torch.full((64, block_size, num_kv_heads, d_v), float("nan"), dtype=dtype)
    prefix = torch.tensor(prefix_slots, dtype=torch.int64)
    key_cache.view(-1, num_kv_heads, d_k)[prefix] = randn(len(prefix_slots), num_kv_heads, d_k)
    value_cache.view(-1, num_kv_heads, d_v)[prefix] = randn(len(prefix_slots), num_kv_heads, d_v)

    # Padding tokens with slot -1 (as a CUDA-graph batch has) must not be stored.
    key = randn(num_tokens + pad_tokens, num_kv_heads, d_k)
    value = randn(num_tokens + pad_tokens, num_kv_heads, d_v)
    slots = torch.cat([metadata.slot_mapping, torch.full((pad_tokens,), -1, dtype=torch.int64)])
    query = randn(num_tokens, num_q_heads, d_k)
    options = LayerAttentionOptions(
        scale=d_k**-0.5,
        sliding_window=sliding_window,
        softcap=softcap,
        sinks=torch.randn(num_q_heads, generator=generator) if sinks else None,
        chunk_size=chunk_size,
    )

    reference = TorchAttentionBackend()
    ref_key_cache, ref_value_cache = key_cache.clone(), value_cache.clone()
    reference.write_kv(key[:num_tokens], value[:num_tokens], ref_key_cache, ref_value_cache, metadata.slot_mapping)
    expected = reference.attend(query, ref_key_cache, ref_value_cache, metadata, options)

    backend = TritonAttentionBackend(split_kv=split_kv, min_keys_per_split=min_keys_per_split)
    backend.write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.isnan(), ref_key_cache.isnan())
    assert torch.equal(key_cache.nan_to_num(), ref_key_cache.nan_to_num())
    assert torch.equal(value_cache.nan_to_num(), ref_value_cache.nan_to_num())

    out = torch.full((num_tokens, num_q_heads, d_v), float("nan"), dtype=dtype)
    result = backend.attend(query, key_cache, value_cache, metadata, options, out=out)
    assert result is out
    assert not out.isnan().any(), "some output elements were never written (or read unwritten cache)"
    error = (out.float() - expected.float()).norm() / expected.float().norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"
    return backend


# Every case mixes decodes (1 new token) with prefill chunks over a cached prefix, including one whose
# keys span several KV tiles, so tile rescaling, multi-page tiles and the tile search all run.
MIXED = dict(cached=[0, 37, 70, 5, 100], new=[9, 1, 13, 1, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_step_dtypes(dtype):
    _check(**MIXED, dtype=dtype)


@pytest.mark.parametrize("block_size", [4, 32])
def test_block_sizes(block_size):
    _check(**MIXED, block_size=block_size, pad_tokens=3)


def test_mqa_odd_head_dims():
    """One KV head for six query heads; head dims 24 (key) and 40 (value), neither a power of two."""
    _check(**MIXED, num_q_heads=6, num_kv_heads=1, d_k=24, d_v=40)


def test_multi_head_long_prefill():
    """GROUP = 1 and a prefill longer than one query tile, so several tiles belong to one sequence."""
    _check(cached=[3, 0, 20], new=[1, 70, 40], num_q_heads=2, num_kv_heads=2)


def test_sliding_window_softcap_sinks():
    _check(**MIXED, sliding_window=7, softcap=5.0, sinks=True)


@pytest.mark.parametrize("split_kv", [False, True])
def test_chunked_attention(split_kv):
    """Llama 4's chunked layers: a query sees only keys of its own chunk (prefills cross chunk boundaries)."""
    _check(**MIXED, chunk_size=16, split_kv=split_kv)


@pytest.mark.parametrize("window", [None, 20])
def test_split_kv(window):
    _check(**MIXED, split_kv=True, sinks=True, sliding_window=window)


def test_split_kv_decode_bf16():
    _check(cached=[150, 3, 64], new=[1, 1, 1], split_kv=True, dtype=torch.bfloat16, block_size=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_256_softcap(dtype):
    """Gemma 2's shapes: 256-wide heads, two query heads per KV head, logits capped at 50."""
    _check(**MIXED, num_q_heads=4, num_kv_heads=2, d_k=256, softcap=50.0, sliding_window=40, dtype=dtype)


def test_head_dim_256_softcap_split_kv_decode():
    _check(cached=[150, 3, 64], new=[1, 1, 1], d_k=256, softcap=50.0, split_kv=True, dtype=torch.bfloat16)


def test_short_sequences_use_few_partitions_of_a_graph_sized_split():
    """A launch sized for a 1024-key bound (as a CUDA graph captured for max_model_len is) splits each
    sequence only into as many partitions as its own keys fill, at least min_keys_per_split keys each."""
    seq_lens = [40, 300, 1]
    backend = _check(
        cached=[n - 1 for n in seq_lens], new=[1, 1, 1], split_kv=True, min_keys_per_split=32, max_seq_len=1024
    )
    (part_max, _, _), = backend._scratch.values()
    num_splits = part_max.shape[2]
    assert num_splits == 1024 // 32  # float32 key tiles are 32 keys: one tile per partition
    used = (part_max[:3] > float("-inf")).all(dim=1)  # [token, split]: some key seen by every head
    for token, seq_len in enumerate(seq_lens):
        active = -(-seq_len // 32)
        assert used[token].tolist() == [True] * active + [False] * (num_splits - active)


@pytest.mark.parametrize(
    ("batch", "context", "split"),
    [(1, 4096, True), (256, 4096, False), (1, 48, False)],
)
def test_split_kv_chosen_for_few_long_decodes(batch, context, split):
    """Split-KV only when the grid would leave SMs idle and there are keys for more than one partition."""
    # Only shapes and the python ints matter to the plan.
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32),
        block_tables=torch.zeros(batch, -(-context // 16), dtype=torch.int32),
        max_query_len=1,
        max_seq_len=context,
    )
    query = torch.empty(batch, 32, 64, dtype=torch.bfloat16)
    cache = torch.empty(1, 16, 8, 64, dtype=torch.bfloat16)
    plan = TritonAttentionBackend(min_keys_per_split=64).plan(query, cache, cache, metadata)
    assert (plan.num_splits > 1) == split


def test_min_keys_per_split_is_checked():
    with pytest.raises(ValueError, match="min_keys_per_split"):
        TritonAttentionBackend(min_keys_per_split=0)
