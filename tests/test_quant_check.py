"""``tfbackend check --vs-unquantized``: the error quantization adds, on the same implementation and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.gguf_checkpoints import write_tiny_gguf
from tests.tiny_models import make_checkpoint

from tfbackend.entrypoints.cli import main
from tfbackend.model_source import resolve_model


def test_fp8_at_load_with_fp8_kv_cache_against_the_dense_model(tmp_path: Path, capsys: pytest.CaptureFixture):
    make_checkpoint("llama", tmp_path)
    args = ["check", str(tmp_path), "--quantization", "fp8", "--kv-cache-dtype", "fp8",
            "--vs-unquantized", "native", "--max-tokens", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "quantized: tfbackend.native.llama.LlamaForCausalLM" in out
    assert "fp8 (weights quantized at load, per channel with searched clipping; activations per token); " \
        "KV cache torch.float8_e4m3fn" in out
    assert "unquantized: tfbackend.native.llama.LlamaForCausalLM, the checkpoint's dense weights" in out
    assert "relative RMS error" in out and "top-1 agreement" in out
    assert "verdict" not in out  # a report, unless --atol asks for a verdict


def test_gguf_blocks_match_their_dequantized_weights(tmp_path: Path, capsys: pytest.CaptureFixture):
    folder = resolve_model(str(write_tiny_gguf(tmp_path / "tiny.gguf")), cache_dir=tmp_path / "cache", progress=False)
    assert main(["check", str(folder), "--vs-unquantized", "transformers", "--max-tokens", "4", "--atol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "gguf (Q8_0/Q4_1/Q4_K kept quantized, other types dequantized)" in out
    assert "14 linear layers dequantized" in out  # 7 per layer in HF's modules
    assert "3/3 prompts identical" in out and "verdict: MATCH" in out


def test_nothing_quantized_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    make_checkpoint("llama", tmp_path)
    assert main(["check", str(tmp_path), "--vs-unquantized", "native"]) == 2
    assert "nothing is quantized" in capsys.readouterr().err


def test_perplexity_of_each_variant(tmp_path: Path, capsys: pytest.CaptureFixture):
    folder = resolve_model(str(write_tiny_gguf(tmp_path / "tiny.gguf")), cache_dir=tmp_path / "cache", progress=False)
    text = tmp_path / "text.txt"
    text.write_text("The keeper climbed the stairs at dusk to light the lamp above the rocks. " * 2)
    assert main(["perplexity", str(folder), "--text", str(text), "--chunk-size", "32"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out if line.startswith("  ") and " perplexity " in line}
    assert set(rows) == {"unquantized", "checkpoint", "fp8", "fp8-gptq", "int4", "int4-g32", "int4-rtn", "int4-rtn-g32", "fp8-kv"}
    ppl = {variant: float(row[2]) for variant, row in rows.items()}
    # The GGUF blocks and their exact dequantization score the same; every variant gives a finite perplexity.
    assert ppl["checkpoint"] == pytest.approx(ppl["unquantized"], rel=1e-4)
    assert all(1 < value < float("inf") for value in ppl.values())
    assert rows["fp8"][3].endswith("%")  # its change against the unquantized model


def test_perplexity_refuses_a_text_longer_than_the_context(tmp_path: Path, capsys: pytest.CaptureFixture):
    folder = resolve_model(str(write_tiny_gguf(tmp_path / "tiny.gguf")), cache_dir=tmp_path / "cache", progress=False)
    assert main(["perplexity", str(folder), "--variants", "unquantized"]) == 2  # the built-in text: ~12k bytes
    assert "more than the model's context of 256" in capsys.readouterr().err
