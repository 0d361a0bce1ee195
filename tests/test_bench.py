"""``tfbackend bench`` end to end on the tiny random preset, on the CPU: it runs and writes complete JSON."""

from __future__ import annotations

import json

import pytest

from tfbackend.entrypoints.cli import main

COMMON = ["--random-weights", "tiny-llama", "--kv-cache-memory", "16MiB", "--impl", "native,transformers"]
ROW_FIELDS = {"scenario", "system", "floor_fraction"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFBACKEND_CACHE", str(tmp_path / "cache"))


def bench(tmp_path, *args: str) -> dict:
    """Run ``tfbackend bench ARGS --output FILE`` and return the JSON it wrote."""
    out = tmp_path / "bench.json"
    assert main(["bench", *args, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput(tmp_path):
    doc = bench(tmp_path, "throughput", *COMMON, "--num-requests", "4", "--input-len-min", "4", "--input-len-max", "16",
                "--output-len", "4", "--peers", "hf-generate")
    assert {"date", "versions", "hardware", "model", "workload", "engine", "results"} <= set(doc)
    assert doc["hardware"]["bandwidth"] > 0 and doc["hardware"]["matmul_rate"] > 0
    assert [row["system"] for row in doc["results"]] == ["tfbackend[native]", "tfbackend[transformers]", "hf-generate"]
    for row in doc["results"]:
        assert ROW_FIELDS | {"output_tok_s", "total_tok_s", "elapsed_s", "floor_s"} <= set(row)
        assert row["output_tokens"] == 4 * 4
        assert row["total_tok_s"] > row["output_tok_s"] > 0
        assert 0 < row["floor_fraction"]


def test_latency(tmp_path):
    rows = bench(tmp_path, "latency", *COMMON, "--batch-size", "1,2", "--input-len", "8", "--output-len", "4",
                 "--num-iters", "1")["results"]
    assert [(row["system"], row["batch_size"]) for row in rows] == [
        ("tfbackend[native]", 1), ("tfbackend[native]", 2),
        ("tfbackend[transformers]", 1), ("tfbackend[transformers]", 2),
    ]
    for row in rows:
        assert ROW_FIELDS | {"ms_per_token", "ttft_ms", "floor_ms_per_token"} <= set(row)
        assert row["ms_per_token"] > 0 and row["ttft_ms"] > 0


def test_throughput_then_latency_on_the_same_engines(tmp_path):
    """``--latency-batch-size`` adds T2 rows after each engine's T1 (one start per engine for both)."""
    doc = bench(tmp_path, "throughput", *COMMON, "--num-requests", "3", "--input-len-min", "4", "--input-len-max", "8",
                "--output-len", "3", "--latency-batch-size", "1,2")
    assert [(row["system"], row["scenario"], row.get("batch_size")) for row in doc["results"]] == [
        (system, scenario, batch) for system in ("tfbackend[native]", "tfbackend[transformers]")
        for scenario, batch in (("throughput", None), ("latency", 1), ("latency", 2))
    ]
    assert doc["workload"]["latency"]["batch_sizes"] == [1, 2]
    assert all(row["ms_per_token"] > 0 for row in doc["results"] if row["scenario"] == "latency")


def test_rejects_a_single_output_token(tmp_path):
    assert main(["bench", "latency", *COMMON, "--output-len", "1"]) == 2


def test_a_peer_that_cannot_run_the_model_is_reported_not_fatal(tmp_path, monkeypatch):
    """transformers' continuous batching refuses some models (no pageable attention): the other rows stand."""
    from tfbackend.bench import peers

    def refuse(*args):
        raise ValueError("Invalid layer type: linear_attention")

    monkeypatch.setattr(peers, "hf_cb_throughput", refuse)
    doc = bench(tmp_path, "throughput", *COMMON[:-1], "native", "--num-requests", "2", "--input-len-min", "4",
                "--input-len-max", "8", "--output-len", "3", "--peers", "hf-generate,hf-cb")
    assert [row["system"] for row in doc["results"]] == ["tfbackend[native]", "hf-generate"]
    assert doc["not_run"] == {"hf-cb": "ValueError: Invalid layer type: linear_attention"}


def test_an_implementation_that_declines_the_model_is_reported_and_the_others_run(tmp_path, monkeypatch):
    from tfbackend import registry
    from tfbackend.adapter import TransformersForCausalLM

    def decline(cls, *args, **kwargs):
        raise registry.UnsupportedModelError("gives different results when a prompt is fed in two steps")

    monkeypatch.setattr(TransformersForCausalLM, "load", classmethod(decline))
    doc = bench(tmp_path, "latency", *COMMON, "--batch-size", "1", "--input-len", "4", "--output-len", "3",
                "--num-iters", "1")
    assert [row["system"] for row in doc["results"]] == ["tfbackend[native]"]
    assert "fed in two steps" in doc["not_run"]["tfbackend[transformers]"]
