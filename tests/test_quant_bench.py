"""``tfbackend bench --quantization fp8 --kv-cache-dtype fp8``: the quantized engine is benchmarked as such."""

from __future__ import annotations

import json

import pytest

from tfbackend.entrypoints.cli import main

TINY = ["--random-weights", "tiny-llama", "--kv-cache-memory", "16MiB", "--batch-size", "1", "--input-len", "8",
        "--output-len", "4", "--num-iters", "1"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFBACKEND_CACHE", str(tmp_path / "cache"))


def bench(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["bench", "latency", *TINY, "--impl", "native", "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_fp8_weights_and_kv_cache(tmp_path):
    dense = bench(tmp_path, "dense")
    fp8 = bench(tmp_path, "fp8", "--quantization", "fp8", "--kv-cache-dtype", "fp8")
    (dense_row,), (fp8_row,) = dense["results"], fp8["results"]
    assert dense_row["system"] == "tfbackend[native]"
    assert fp8_row["system"] == "tfbackend[native, fp8, kv fp8]"
    assert fp8["engine"]["quantization"] == "fp8" and fp8["engine"]["kv_cache_dtype"] == "fp8"
    # Same KV memory, 1-byte entries instead of float32's 4 (bf16 models on GPU: twice as many tokens).
    assert fp8_row["kv_capacity_tokens"] == 4 * dense_row["kv_capacity_tokens"]
    # The floor counts the weights as loaded: FP8 linears take a quarter of their float32 bytes.
    assert fp8["model"]["weight_bytes"] < 0.8 * dense["model"]["weight_bytes"]
    assert f"KV {fp8_row['kv_capacity_tokens']:,} tokens" in fp8_row["note"]
