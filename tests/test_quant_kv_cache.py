"""FP8 KV cache: entries stored as ``x / scale`` in E4M3 and read back scaled, in both attention backends and
through the engine, with per-layer scales from the checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.test_triton_attention import _make_step
from tests.tiny_models import make_checkpoint, random_prompts
from tests.triton_interpreter import interpreter_fp8_casts  # noqa: F401

from tfbackend import LLM, SamplingParams
from tfbackend.attention.backend import LayerAttentionOptions
from tfbackend.attention.torch_backend import TorchAttentionBackend
from tfbackend.attention.triton_backend import TritonAttentionBackend
from tfbackend.quantization.kv_cache import FP8_KV_DTYPE

pytestmark = pytest.mark.usefixtures("interpreter_fp8_casts")
FP8 = FP8_KV_DTYPE
NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, Q_HEADS, HEAD_DIM = 32, 4, 2, 4, 16
K_SCALE, V_SCALE = 0.5, 2.0


def step(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    metadata, _ = _make_step([0, 0, 0], [9, 20, 3], BLOCK_SIZE, NUM_BLOCKS, generator)
    key, value = (torch.randn(32, KV_HEADS, HEAD_DIM, generator=generator) * 3 for _ in range(2))
    query = torch.randn(32, Q_HEADS, HEAD_DIM, generator=generator)
    return metadata, query, key, value


def caches(dtype: torch.dtype):
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


OPTIONS = LayerAttentionOptions(scale=HEAD_DIM**-0.5)


@pytest.mark.parametrize("backend", [TorchAttentionBackend(), TritonAttentionBackend()], ids=["torch", "triton"])
def test_fp8_cache_stores_scaled_entries_and_attends_within_fp8_rounding(backend):
    metadata, query, key, value = step()
    key[0, 0, 0] = 1e4  # beyond E4M3's range even after scaling: saturates instead of becoming NaN
    key_cache, value_cache = caches(FP8)
    backend.write_kv(key, value, key_cache, value_cache, metadata.slot_mapping, K_SCALE, V_SCALE)
    slots = metadata.slot_mapping
    stored_keys = key_cache.view(-1, KV_HEADS, HEAD_DIM)[slots]
    assert torch.equal(stored_keys.float(), (key / K_SCALE).clamp(-448, 448).to(FP8).float())
    assert stored_keys[0, 0, 0].float() == 448
    stored_values = value_cache.view(-1, KV_HEADS, HEAD_DIM)[slots]
    assert torch.equal(stored_values.float(), (value / V_SCALE).to(FP8).float())

    out = backend.attend(query, key_cache, value_cache, metadata, OPTIONS, K_SCALE, V_SCALE)
    exact_keys, exact_values = caches(torch.float32)
    TorchAttentionBackend().write_kv(key, value, exact_keys, exact_values, slots)
    expected = TorchAttentionBackend().attend(query, exact_keys, exact_values, metadata, OPTIONS)
    assert out.isfinite().all()
    error = (out - expected).norm() / expected.norm()
    assert error < 0.05, f"relative error {error:.3f} (E4M3 keeps 3 mantissa bits)"


def test_triton_fp8_cache_matches_the_torch_reference():
    metadata, query, key, value = step(seed=1)
    results = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        key_cache, value_cache = caches(FP8)
        backend.write_kv(key, value, key_cache, value_cache, metadata.slot_mapping, K_SCALE, V_SCALE)
        results.append((key_cache, value_cache,
                        backend.attend(query, key_cache, value_cache, metadata, OPTIONS, K_SCALE, V_SCALE)))
    (ref_k, ref_v, ref_out), (k, v, out) = results
    assert torch.equal(k.float(), ref_k.float()) and torch.equal(v.float(), ref_v.float())
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", path)
    return path


def generate(path, **kwargs):
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=4, max_model_len=64,
              kv_cache_memory=1 << 20, **kwargs)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 13, 30])]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return llm, [out.outputs[0].token_ids for out in outputs]


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_engine_with_fp8_cache_holds_more_tokens(llama, impl):
    """Same memory, one byte per element instead of four (a bf16 model's cache would hold twice as many).

    This random tiny model amplifies any rounding (its FP8 keys change greedy tokens after the first), so
    decoding is compared only on the first token here; the backends' FP8 arithmetic is checked above.
    """
    dense, dense_tokens = generate(llama, model_impl=impl)
    fp8, fp8_tokens = generate(llama, model_impl=impl, kv_cache_dtype="fp8")
    assert fp8.engine.kv_cache.storage.dtype == FP8
    assert fp8.engine.stats().kv_capacity_tokens == 4 * dense.engine.stats().kv_capacity_tokens
    assert fp8.engine.kv_cache.scales == [(1.0, 1.0)] * 2  # the checkpoint has none
    assert [tokens[0] for tokens in fp8_tokens] == [tokens[0] for tokens in dense_tokens]


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_checkpoint_kv_scales_are_read_per_layer(llama, tmp_path, impl):
    weights = load_file(llama / "model.safetensors")
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    weights["model.layers.1.self_attn.kv_scale"] = torch.tensor([2.0])
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((llama / name).read_bytes())
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    fp8, _ = generate(tmp_path, model_impl=impl, kv_cache_dtype="fp8")
    assert fp8.engine.kv_cache.scales == [(0.5, 0.25), (2.0, 2.0)]
    dense, _ = generate(tmp_path, model_impl=impl)  # a model-dtype cache ignores them
    assert dense.engine.kv_cache.scales == [(1.0, 1.0)] * 2
