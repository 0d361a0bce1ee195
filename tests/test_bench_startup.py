"""``bench`` for startup work: the random-weight presets of other architectures, and ``--cold`` (CPU, tiny)."""

from __future__ import annotations

import json
import logging

import pytest

from tfbackend import LLM, SamplingParams
from tfbackend.bench.presets import PRESETS, write_random_checkpoint
from tfbackend.engine.startup import PHASES
from tfbackend.entrypoints.cli import main

# Toy sizes for the preset configs: the architecture (norms, softcaps, experts, tying) stays the preset's.
_TOY = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "num_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 256, "sliding_window": 32, "query_pre_attn_scalar": 16,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFBACKEND_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("preset", "tier"),
    [("qwen3-0.6b", "native"), ("gemma2-2b", "transformers"), ("olmoe-1b-7b", "transformers"),
     ("qwen3-30b-a3b", "transformers")],
)
def test_presets_of_other_architectures_load_and_generate(preset, tier, tmp_path):
    config = {key: _TOY.get(key, value) for key, value in PRESETS[preset].items()}
    write_random_checkpoint(config, tmp_path / preset)
    llm = LLM(str(tmp_path / preset), device="cpu", dtype="float32", kv_cache_memory=1 << 20)
    assert llm.model_impl == tier
    output = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(temperature=0, max_tokens=3,
                                                                            ignore_eos=True))
    assert len(output[0].outputs[0].token_ids) == 3


def test_cold_runs_t1_in_fresh_processes_with_empty_then_warm_caches(tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO)  # the fresh processes log as this one does: their startup reports show
    out = tmp_path / "cold.json"
    args = ["bench", "throughput", "--random-weights", "tiny-llama", "--cold", "--impl", "native",
            "--num-requests", "4", "--input-len-min", "4", "--input-len-max", "16", "--output-len", "4",
            "--kv-cache-memory", "16MiB", "--output", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["compile_cache"] for row in rows] == ["empty", "warm"]
    for row in rows:
        assert row["system"] == "tfbackend[native]" and row["output_tokens"] == 4 * 4
        assert row["startup_s"] > row["startup_phases"]["total"] > 0  # the process's start includes its imports
        assert set(row["startup_phases"]) == {*PHASES, "total"}
        assert row["first_request_ms"] > 0
        assert row["compilations_after_ready"] == 0
    assert capfd.readouterr().err.count("startup: total") == 2
