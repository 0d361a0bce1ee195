"""``tfbackend check``: passes on a faithful port, fails on a subtly broken one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import make_checkpoint
from tfbackend import registry
from tfbackend.entrypoints.cli import main
from tfbackend.native.llama import LlamaForCausalLM


class PerturbedLlama(LlamaForCausalLM):
    """The native Llama with one weight nudged after loading: a stand-in for a porting bug."""

    def load_weights(self, weights):
        super().load_weights(weights)
        with torch.no_grad():
            self.model.layers[1].mlp.down_proj.weight[0, 0] += 0.05


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", path)
    return path


def test_check_matches(llama_dir: Path, capsys: pytest.CaptureFixture):
    assert main(["check", str(llama_dir), "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "native: tfbackend.native.llama.LlamaForCausalLM" in out
    assert "transformers: tfbackend.adapter.TransformersForCausalLM" in out
    assert "3/3 prompts identical" in out
    assert "verdict: MATCH" in out


def test_check_catches_a_perturbed_weight(llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture):
    monkeypatch.setitem(registry._native_models, "LlamaForCausalLM", PerturbedLlama)
    assert main(["check", str(llama_dir), "--max-tokens", "6", "--model-impl", "transformers,native"]) == 1
    out = capsys.readouterr().out
    assert "native: tests.test_check_cli.PerturbedLlama" in out
    assert "verdict: MISMATCH" in out


def test_check_rejects_a_bad_impl_pair(llama_dir: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as error:
        main(["check", str(llama_dir), "--model-impl", "native"])
    assert error.value.code == 2
    assert "expected two of" in capsys.readouterr().err


def test_check_compares_the_compat_tier_with_the_fallback(tmp_path, capsys):
    """The compat tier (HF's own attention and caches) agrees with the paged fallback on the same weights."""
    from tests.tiny_models import make_checkpoint
    from tfbackend.entrypoints.cli import main

    make_checkpoint("llama", tmp_path)
    assert main(["check", str(tmp_path), "--model-impl", "compat,transformers", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "compat: tfbackend.compat.model.CompatCausalLM" in out and "verdict: MATCH" in out
