"""Model registry: lazy native entries, plugins through entry points, and the model_impl choice."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from tfbackend import registry
from tfbackend.adapter import TransformersForCausalLM
from tfbackend.hf_classes import causal_lm_class, stateful_layer_types
from tfbackend.model_interface import UnsupportedModelError
from tfbackend.registry import load_model, register_model, resolve

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch):
    """Each test sees the built-in table, plugins not yet loaded, and leaves the real registry as it was."""
    monkeypatch.setattr(registry, "_native_models", dict(registry._BUILTIN_NATIVE_MODELS))
    monkeypatch.setattr(registry, "_plugins_loaded", True)  # tests that want plugins set it to False
    monkeypatch.delenv("TFBACKEND_PLUGINS", raising=False)
    yield


def write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


def config_for(architecture: str, model_type: str = "llama"):
    return AutoConfig.for_model(model_type, architectures=[architecture])


# -------------------------------------------------------------------------------------------- lazy entries


def test_importing_the_package_does_not_import_native_models() -> None:
    """Run in a fresh interpreter: the built-in ports are imported only when a checkpoint needs them."""
    script = textwrap.dedent(
        """
        import sys
        import tfbackend, tfbackend.registry as registry
        from transformers import LlamaConfig
        lazy = {spec.split(":")[0] for spec in registry._BUILTIN_NATIVE_MODELS.values()}
        assert "tfbackend.native.llama" in lazy, lazy
        print("before", sorted(m for m in lazy if m in sys.modules))
        resolved = registry.resolve(LlamaConfig(architectures=["LlamaForCausalLM"]))
        print("after", "tfbackend.native.llama" in sys.modules, resolved.model_impl, resolved.model_class.__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "before []" in result.stdout
    assert "after True native LlamaForCausalLM" in result.stdout


def test_lazy_entry_is_imported_only_when_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "lazy_arch_module_a", "class Cls:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_arch_module_a", raising=False)
    register_model("FakeArch", "lazy_arch_module_a:Cls")
    assert "FakeArch" in registry.registered_architectures()
    assert "lazy_arch_module_a" not in sys.modules
    resolved = resolve(config_for("FakeArch"))
    assert "lazy_arch_module_a" in sys.modules
    assert resolved.model_class is sys.modules["lazy_arch_module_a"].Cls
    assert resolved.model_impl == "native" and "FakeArch" in resolved.reason
    monkeypatch.delitem(sys.modules, "lazy_arch_module_a")


def test_register_model_accepts_a_class_and_replaces_earlier_entries() -> None:
    class First:
        pass

    class Second:
        pass

    register_model("ReplacedArch", First)
    register_model("ReplacedArch", Second)
    assert resolve(config_for("ReplacedArch")).model_class is Second


@pytest.mark.parametrize("spec", ["no_colon_here", "package.module.Class", "", "a:b:c", ":Cls", "mod:", "mod:Cls.attr"])
def test_invalid_lazy_strings_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="package.module:ClassName"):
        register_model("BadArch", spec)
    assert "BadArch" not in registry._native_models


def test_first_registered_architecture_in_the_config_wins() -> None:
    class Native:
        pass

    register_model("SecondArch", Native)
    config = AutoConfig.for_model("llama", architectures=["UnknownArch", "SecondArch"])
    assert resolve(config).model_class is Native


# -------------------------------------------------------------------------------------------------- plugins


def make_plugin_package(root: Path, package: str, entry_points: dict[str, str]) -> None:
    """An installed-looking distribution: the package, and a dist-info with METADATA and entry points."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from tfbackend.registry import register_model

            CALLS = []

            class AlphaModel:
                pass

            class BetaModel:
                pass

            def register_alpha():
                CALLS.append("alpha")
                register_model("AlphaArch", AlphaModel)

            def register_beta():
                CALLS.append("beta")
                register_model("BetaArch", "{package}.lazy:BetaLazy")
            """
        ).replace("{package}", package)
    )
    (root / package / "lazy.py").write_text("class BetaLazy:\n    pass\n")
    dist_info = root / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[{registry.PLUGIN_GROUP}]\n{lines}")


@pytest.fixture
def plugin_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    package = f"tfb_test_plugin_{tmp_path.name.replace('-', '_')}"
    make_plugin_package(
        tmp_path, package, {"alpha": f"{package}:register_alpha", "beta": f"{package}:register_beta"}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield package
    for name in [package, f"{package}.lazy"]:
        sys.modules.pop(name, None)


def test_plugin_entry_points_register_models(plugin_package: str) -> None:
    resolved = resolve(config_for("AlphaArch"))
    module = sys.modules[plugin_package]
    assert resolved.model_class is module.AlphaModel and resolved.model_impl == "native"
    assert f"{plugin_package}.lazy" not in sys.modules  # the plugin's own lazy entry stays lazy
    assert resolve(config_for("BetaArch")).model_class.__name__ == "BetaLazy"
    assert sorted(module.CALLS) == ["alpha", "beta"]  # each plugin ran exactly once
    resolve(config_for("AlphaArch"))
    assert sorted(module.CALLS) == ["alpha", "beta"]


def test_tfbackend_plugins_env_filters_by_name(plugin_package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFBACKEND_PLUGINS", " beta ,other")
    assert "BetaArch" in registry.registered_architectures()
    assert "AlphaArch" not in registry.registered_architectures()
    assert sys.modules[plugin_package].CALLS == ["beta"]
    with pytest.raises(ValueError, match="no native implementation"):
        resolve(config_for("AlphaArch"), model_impl="native")


def test_empty_tfbackend_plugins_loads_none(plugin_package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFBACKEND_PLUGINS", "")
    architectures = registry.registered_architectures()
    assert "AlphaArch" not in architectures and "BetaArch" not in architectures
    assert plugin_package not in sys.modules


# ---------------------------------------------------------------------------------------------- model_impl


class FakeNativeLlama:
    pass


def test_auto_prefers_native_and_transformers_forces_the_fallback() -> None:
    register_model("LlamaForCausalLM", FakeNativeLlama)
    config = LlamaConfig(architectures=["LlamaForCausalLM"])
    auto = resolve(config)
    assert auto.model_class is FakeNativeLlama and auto.model_impl == "native"
    forced = resolve(config, model_impl="transformers")
    assert forced.model_class is TransformersForCausalLM and forced.model_impl == "transformers"
    assert "LlamaForCausalLM" in forced.reason
    assert resolve(config, model_impl="native").model_class is FakeNativeLlama


def test_auto_without_native_wraps_the_hf_class() -> None:
    resolved = resolve(config_for("GPT2LMHeadModel", "gpt2"))
    assert resolved.model_class is TransformersForCausalLM and resolved.model_impl == "transformers"
    assert "GPT2LMHeadModel" in resolved.reason


def test_native_without_native_class_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="no native implementation for .*GPT2LMHeadModel"):
        resolve(config_for("GPT2LMHeadModel", "gpt2"), model_impl="native")


def test_unknown_model_impl_is_rejected() -> None:
    with pytest.raises(ValueError, match="model_impl must be one of"):
        resolve(config_for("GPT2LMHeadModel", "gpt2"), model_impl="vllm")


def causal_lm_types_outside_the_attention_interface(limit: int = 2) -> list[tuple[str, str]]:
    """(model_type, class name) of installed HF causal-LM classes without ``_supports_attention_backend``.

    Derived from the installed transformers, never hard-coded: which classes route attention through the
    interface changes from version to version (GPT-J joined in 5.24).
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # some configs do not build from defaults alone
            continue
        hf_class = AutoModelForCausalLM._model_mapping[type(config)]
        if not getattr(hf_class, "_supports_attention_backend", False):
            found.append((model_type, hf_class.__name__))
        if len(found) == limit:
            break
    return found


@pytest.mark.parametrize("model_type,hf_class", causal_lm_types_outside_the_attention_interface())
def test_hf_class_without_attention_backend_support_goes_to_the_compat_tier(model_type, hf_class) -> None:
    """The paged fallback declines it, saying why; auto serves it with the compat tier, forced fallback refuses."""
    config = AutoConfig.for_model(model_type)
    refusal = f"{hf_class} does not route attention.*_supports_attention_backend"
    with pytest.raises(ValueError, match=refusal):
        resolve(config, model_impl="transformers")
    resolved = resolve(config)
    assert resolved.model_impl == "compat"
    assert re.search(refusal, resolved.reason) and "with its own attention and caches" in resolved.reason


def test_config_without_a_causal_lm_class_is_refused() -> None:
    config = AutoConfig.for_model("t5")
    with pytest.raises(ValueError, match="no causal-LM class for model type 't5'"):
        resolve(config)


# --------------------------------------------------------------------------------------- supports() and load


class PickyNative:
    """A native port that serves only configs with a marker attribute."""

    loads: list[str] = []

    @classmethod
    def supports(cls, hf_config) -> str | None:
        return None if getattr(hf_config, "picky_ok", False) else "it needs picky_ok"

    @classmethod
    def load(cls, model_dir, hf_config, dtype, device):
        cls.loads.append(hf_config.model_type)
        if getattr(hf_config, "picky_fails_at_load", False):
            raise UnsupportedModelError("the modules show something the config did not")
        return cls()


def test_auto_falls_back_when_the_native_class_declines_the_config() -> None:
    register_model("LlamaForCausalLM", PickyNative)
    config = LlamaConfig(architectures=["LlamaForCausalLM"])
    resolved = resolve(config)
    assert resolved.model_impl == "transformers"
    assert "PickyNative declines: it needs picky_ok" in resolved.reason
    config.picky_ok = True
    assert resolve(config).model_class is PickyNative


def test_native_forced_on_a_declined_config_raises_the_reason() -> None:
    register_model("LlamaForCausalLM", PickyNative)
    with pytest.raises(ValueError, match="PickyNative declines: it needs picky_ok"):
        resolve(LlamaConfig(architectures=["LlamaForCausalLM"]), model_impl="native")


def test_the_built_in_llama_port_declines_other_model_types_behind_its_architecture() -> None:
    """exaone, internlm3 and others save LlamaForCausalLM as their architecture with their own model_type."""
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"])
    config.model_type = "not_llama"
    resolved = resolve(config)
    assert resolved.model_impl == "transformers"
    assert "not 'not_llama'" in resolved.reason


def test_a_refusal_at_load_moves_on_to_the_next_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    register_model("LlamaForCausalLM", PickyNative)
    fallback_loads = []
    monkeypatch.setattr(TransformersForCausalLM, "load", classmethod(lambda cls, *a: fallback_loads.append(a) or "hf"))
    config = LlamaConfig(architectures=["LlamaForCausalLM"])
    config.picky_ok = config.picky_fails_at_load = True
    model, resolved = load_model("dir", config, "auto", torch.float32, torch.device("cpu"))
    assert model == "hf" and resolved.model_impl == "transformers" and len(fallback_loads) == 1
    assert "PickyNative declines at load: the modules show something the config did not" in resolved.reason
    with pytest.raises(ValueError, match="declines at load"):
        load_model("dir", config, "native", torch.float32, torch.device("cpu"))


def test_text_decoders_of_multimodal_checkpoints_resolve_by_architecture() -> None:
    """A text decoder saved from a multimodal family has a config type that no auto class maps."""
    from transformers import AutoModelForCausalLM

    unmapped = [
        (config_class, hf_class)
        for config_class, hf_class in AutoModelForCausalLM._model_mapping.items()
        if getattr(hf_class, "config_class", config_class) not in AutoModelForCausalLM._model_mapping
    ]
    if not unmapped:
        pytest.skip("every causal-LM class of this transformers has an auto-mapped config class")
    _, hf_class = unmapped[0]
    config = hf_class.config_class(architectures=[hf_class.__name__])
    assert causal_lm_class(config) is hf_class
    assert resolve(config).model_impl == "transformers"


def test_layers_that_keep_state_outside_attention_are_declined_by_the_fallback() -> None:
    """Derived from transformers' own cache classes: linear-attention, conv and indexer layers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:
            continue
        hf_class = causal_lm_class(config)
        if getattr(hf_class, "_supports_attention_backend", False) and stateful_layer_types(config):
            break
    else:
        pytest.skip("no interface-capable class with stateful layers in this transformers")
    reason = TransformersForCausalLM.supports(config)
    assert reason is not None and "keep state outside attention" in reason
    assert all(layer in reason for layer in stateful_layer_types(config))
