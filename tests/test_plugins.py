"""Which implementation runs a checkpoint: built-in native ports, the forced fallback, and plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import make_checkpoint, make_config
from tfbackend import LLM
from tfbackend import registry
from tfbackend.adapter import TransformersForCausalLM
from tfbackend.native.llama import LlamaForCausalLM

EXAMPLE_PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "tfbackend_example_plugin"


@pytest.mark.parametrize(
    "model_type, architecture",
    [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
     ("qwen3", "Qwen3ForCausalLM")],
)
def test_native_port_is_the_default(model_type: str, architecture: str):
    config = make_config(model_type, architectures=[architecture])
    resolved = registry.resolve(config)
    assert (resolved.model_class, resolved.model_impl) == (LlamaForCausalLM, "native")
    assert architecture in resolved.reason

    forced = registry.resolve(config, "transformers")
    assert (forced.model_class, forced.model_impl) == (TransformersForCausalLM, "transformers")
    assert "forces the fallback" in forced.reason


def test_llm_reports_the_implementation(tmp_path: Path):
    make_checkpoint("qwen2", tmp_path)
    for model_impl, expected in [("auto", "native"), ("transformers", "transformers")]:
        llm = LLM(str(tmp_path), model_impl=model_impl, dtype="float32", device="cpu", block_size=4,
                  max_model_len=32, kv_cache_memory=1 << 20)
        assert llm.model_impl == expected
        assert "Qwen2ForCausalLM" in llm.model_impl_reason


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plugins load again on next resolution, and whatever they register is undone after the test."""
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_native_models", dict(registry._native_models))
    monkeypatch.delenv("TFBACKEND_PLUGINS", raising=False)


def test_example_plugin_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry):
    source, target = tmp_path / "plugin", tmp_path / "site"
    shutil.copytree(EXAMPLE_PLUGIN, source)  # setuptools builds in the source tree: keep the checkout clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    monkeypatch.syspath_prepend(str(target))
    assert "ExampleLlamaForCausalLM" in registry.registered_architectures()

    make_checkpoint("llama", tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["ExampleLlamaForCausalLM"]
    config_path.write_text(json.dumps(config))
    llm = LLM(str(tmp_path / "model"), dtype="float32", device="cpu", block_size=4, max_model_len=32,
              kv_cache_memory=1 << 20)
    assert llm.model_impl == "native"
    assert "ExampleLlamaForCausalLM" in llm.model_impl_reason
    assert isinstance(llm.engine.model, LlamaForCausalLM)

