"""Which model class runs a checkpoint: a native port when one is registered and accepts the config, else the
Transformers fallback on our paged KV cache, else the compat tier (HF's own attention and caches).

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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib.metadata import entry_points

import torch
import torch.nn as nn

from tfbackend.distributed import current_parallel
from tfbackend.hf_classes import causal_lm_class, remote_code_class_ref
from tfbackend.model_interface import UnsupportedModelError

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "tfbackend.plugins"
MODEL_IMPLS = ("auto", "native", "transformers", "compat")
FALLBACK_CLASS = "tfbackend.adapter:TransformersForCausalLM"
COMPAT_CLASS = "tfbackend.compat.model:CompatCausalLM"
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
    model_impl: str  # "native", "transformers" or "compat"
    choice: str  # what was chosen, e.g. "native implementation registered for LlamaForCausalLM"
    passed_over: tuple[str, ...] = ()  # why better implementations did not serve it

    @property
    def reason(self) -> str:
        return "; ".join([*self.passed_over, self.choice])


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


def _supports(model_class, hf_config) -> str | None:
    """A class's ``supports(hf_config)``; plugin classes without one are taken to support their configs.
    Under tensor or pipeline parallelism the class must also declare that it implements it."""
    parallel = current_parallel()
    for size, flag, name in ((parallel.tp.size, "supports_tensor_parallel", "tensor"),
                             (parallel.pp_size, "supports_pipeline_parallel", "pipeline")):
        if size > 1 and not getattr(model_class, flag, False):
            return f"it does not implement {name} parallelism"
    supports = getattr(model_class, "supports", None)
    return supports(hf_config) if supports is not None else None


def candidates(hf_config, model_impl: str = "auto") -> tuple[list[ResolvedModel], list[str]]:
    """The classes that say they can serve ``hf_config``, best first, and the reasons of those that cannot.

    ``auto``: the native class registered for the checkpoint's architecture, then the Transformers fallback
    (paged KV cache), then the compat tier (HF's own attention and caches). Any other value: only that one.
    """
    found: list[ResolvedModel] = []
    refusals: list[str] = []
    for tier in _tiers(hf_config, model_impl):
        (refusals if isinstance(tier, str) else found).append(tier)
    return found, refusals


def _tiers(hf_config, model_impl: str) -> Iterator[ResolvedModel | str]:
    """As ``candidates``, one tier at a time: the class that serves, or why it cannot. A tier's class is imported
    only when reached, so loading a native model never imports the fallback (transformers' modeling code)."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    load_plugins()
    architectures = list(getattr(hf_config, "architectures", None) or [])
    name = architectures or hf_config.model_type
    refusals: list[str] = []  # of the tiers so far, which a later tier's ResolvedModel lists as passed over

    def refuse(reason: str) -> str:
        refusals.append(reason)
        return reason

    native_arch = next((arch for arch in architectures if arch in _native_models), None)
    if model_impl in ("auto", "native"):
        if remote_code_class_ref(hf_config) is not None:
            yield refuse("the checkpoint ships its own modeling code, which no native port reproduces")
        elif native_arch is None:
            yield refuse(f"no native implementation for {name}")
        else:
            native = _import_class(_native_models[native_arch])
            refusal = _supports(native, hf_config)
            if refusal is None:
                yield ResolvedModel(native, "native", f"native implementation registered for {native_arch}")
            else:
                yield refuse(f"native {native.__name__} declines: {refusal}")
    if model_impl in ("auto", "transformers"):
        fallback = _import_class(FALLBACK_CLASS)
        refusal = _supports(fallback, hf_config)
        if refusal is None:
            wrapped = f"wrapping {causal_lm_class(hf_config).__name__} from transformers"
            if model_impl == "transformers":
                wrapped = f"model_impl='transformers' forces the fallback, {wrapped}"
            yield ResolvedModel(fallback, "transformers", wrapped, tuple(refusals))
        else:
            yield refuse(f"Transformers fallback declines: {refusal}")
    if model_impl in ("auto", "compat"):
        compat = _import_class(COMPAT_CLASS)
        refusal = _supports(compat, hf_config)
        if refusal is None:
            running = (
                f"running {causal_lm_class(hf_config).__name__} with its own attention and caches, continuously "
                f"batched (no prefix caching or chunked prefill)"
            )
            if model_impl == "compat":
                running = f"model_impl='compat' forces the compat tier, {running}"
            yield ResolvedModel(compat, "compat", running, tuple(refusals))
        else:
            yield refuse(f"compat tier declines: {refusal}")


def resolve(hf_config, model_impl: str = "auto") -> ResolvedModel:
    """Pick the class that will run ``hf_config`` and say why; raise with every refusal if none can."""
    found, refusals = candidates(hf_config, model_impl)
    if not found:
        hint = " Use model_impl='transformers' or 'auto'." if model_impl == "native" else ""
        raise ValueError(f"cannot serve {hf_config.model_type!r}: " + "; ".join(refusals) + "." + hint)
    return found[0]


def load_model(
    model_dir, hf_config, model_impl: str, dtype: torch.dtype, device: torch.device, quantization: str | None = None
):
    """Load with the best class that can serve the checkpoint: ``(model, its ResolvedModel)``.

    A class may still refuse at load (``UnsupportedModelError``, for what only the built modules show); the
    next candidate is then tried, and the refusal becomes part of the chosen one's reason. ``quantization``
    (``--quantization``) reaches ``load`` only when set, so classes whose ``load`` predates it still load.
    """
    refusals: list[str] = []
    load_refusals: list[str] = []
    quantize = {"quantization": quantization} if quantization is not None else {}
    for resolved in _tiers(hf_config, model_impl):  # lazily: a later tier is not even imported if one loads
        if isinstance(resolved, str):
            refusals.append(resolved)
            continue
        try:
            model = resolved.model_class.load(model_dir, hf_config, dtype, device, **quantize)
        except UnsupportedModelError as error:
            logger.info("%s cannot serve this checkpoint: %s", resolved.model_class.__name__, error)
            load_refusals.append(f"{resolved.model_class.__name__} declines at load: {error}")
            continue
        if load_refusals:  # after the refusals this candidate already lists, which came before them
            resolved = replace(resolved, passed_over=(*resolved.passed_over, *load_refusals))
        return model, resolved
    raise ValueError(f"cannot serve {hf_config.model_type!r}: " + "; ".join(refusals + load_refusals))
