"""Which model class runs a checkpoint: a native port when one is registered, else the Transformers fallback.

Built-in native ports are listed as lazy ``"module:Class"`` strings, imported only when resolved. Out-of-tree
ports register with ``register_model(arch, cls_or_"module:Class")``, typically from a plugin: a package that
declares an entry point in the ``tfbackend.plugins`` group whose target is a ``register()`` function.
Plugins are loaded once, on first resolution; ``TFBACKEND_PLUGINS=a,b`` loads only the named ones.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch.nn as nn

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "tfbackend.plugins"
MODEL_IMPLS = ("auto", "native", "transformers")
FALLBACK_CLASS = "tfbackend.adapter:TransformersForCausalLM"
_LAZY_CLASS = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")

# Architecture (HF config.architectures[0]) -> native implementation, imported lazily.
_BUILTIN_NATIVE_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "tfbackend.native.llama:LlamaForCausalLM",
    "MistralForCausalLM": "tfbackend.native.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "tfbackend.native.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "tfbackend.native.llama:LlamaForCausalLM",
}

_native_models: dict[str, str | type[nn.Module]] = dict(_BUILTIN_NATIVE_MODELS)
_plugins_loaded = False


@dataclass(frozen=True)
class ResolvedModel:
    model_class: type[nn.Module]
    model_impl: str  # "native" or "transformers"
    reason: str


def register_model(architecture: str, model_class: str | type[nn.Module]) -> None:
    """Register a native implementation for an HF architecture name, replacing any earlier one.

    ``model_class`` is a class or a lazy ``"package.module:ClassName"`` string.
    """
    if isinstance(model_class, str) and not _LAZY_CLASS.fullmatch(model_class):
        raise ValueError(f"lazy model class must look like 'package.module:ClassName', got {model_class!r}")
    _native_models[architecture] = model_class


def registered_architectures() -> list[str]:
    load_plugins()
    return sorted(_native_models)


def load_plugins() -> None:
    """Run every ``tfbackend.plugins`` entry point's ``register()`` once (filtered by TFBACKEND_PLUGINS)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    wanted = os.environ.get("TFBACKEND_PLUGINS")
    allowed = None if wanted is None else {name.strip() for name in wanted.split(",") if name.strip()}
    for entry_point in entry_points(group=PLUGIN_GROUP):
        if allowed is not None and entry_point.name not in allowed:
            continue
        logger.info("loading tfbackend plugin %s", entry_point.name)
        entry_point.load()()


def _import_class(spec: str | type[nn.Module]) -> type[nn.Module]:
    if not isinstance(spec, str):
        return spec
    module_name, class_name = spec.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _hf_model_class(hf_config):
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(hf_config) not in mapping:
        return None
    return mapping[type(hf_config)]


def resolve(hf_config, model_impl: str = "auto") -> ResolvedModel:
    """Pick the class that will run ``hf_config`` and say why."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    load_plugins()
    architectures = list(getattr(hf_config, "architectures", None) or [])
    native_arch = next((arch for arch in architectures if arch in _native_models), None)

    if model_impl in ("auto", "native") and native_arch is not None:
        return ResolvedModel(
            _import_class(_native_models[native_arch]),
            "native",
            f"native implementation registered for {native_arch}",
        )
    if model_impl == "native":
        raise ValueError(
            f"no native implementation for {architectures or hf_config.model_type}; registered: "
            f"{sorted(_native_models) or 'none'}. Use model_impl='transformers' or 'auto'."
        )

    hf_class = _hf_model_class(hf_config)
    if hf_class is None:
        raise ValueError(
            f"transformers has no AutoModelForCausalLM class for model type {hf_config.model_type!r} "
            f"({architectures}) and no native implementation is registered"
        )
    if not getattr(hf_class, "_supports_attention_backend", False):
        raise ValueError(
            f"{hf_class.__name__} does not route attention through transformers' AttentionInterface "
            f"(_supports_attention_backend is not set), so the Transformers fallback cannot run it; "
            f"register a native implementation for {architectures or hf_config.model_type}"
        )
    if model_impl == "transformers":
        reason = f"model_impl='transformers' forces the fallback ({hf_class.__name__})"
    else:
        reason = f"no native implementation for {architectures or hf_config.model_type}; wrapping {hf_class.__name__}"
    return ResolvedModel(_import_class(FALLBACK_CLASS), "transformers", reason)
