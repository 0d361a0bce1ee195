"""Facts about Hugging Face model classes, read from the installed transformers rather than assumed.

Which class serves a config, and which of its layers keep state beyond keys and values, change from one
transformers release to the next; everything here asks transformers itself.
"""

from __future__ import annotations

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, cache_utils
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Cache layer classes that hold nothing but per-token keys and values (or nothing at all). Looked up by
# name: not every transformers 5.x release has all of them.
_KV_ONLY_CACHE_LAYERS = tuple(
    cls
    for cls in (getattr(cache_utils, name, None) for name in ("DynamicLayer", "DynamicSlidingWindowLayer", "DummyLayer"))
    if cls is not None
)


REMOTE_CODE_FLAG = "--trust-remote-code (trust_remote_code=True)"


def remote_code_class_ref(hf_config) -> str | None:
    """The checkpoint's own causal-LM class (``auto_map``), when it ships modeling code."""
    return (getattr(hf_config, "auto_map", None) or {}).get("AutoModelForCausalLM")


def load_hf_config(model_dir, trust_remote_code: bool = False):
    """The checkpoint's config; a checkpoint that ships its own modeling code needs ``trust_remote_code``."""
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise ValueError(
                f"{model_dir} ships its own configuration code; run it only if you trust it, with {REMOTE_CODE_FLAG}"
            ) from error
        raise
    if remote_code_class_ref(hf_config) is not None and not trust_remote_code:
        raise ValueError(
            f"{model_dir} ships its own modeling code ({remote_code_class_ref(hf_config)}); run it only if you "
            f"trust it, with {REMOTE_CODE_FLAG}"
        )
    return hf_config


def empty_model(hf_class: type, hf_config, dtype, attn_implementation: str | None = None):
    """``hf_class`` built for ``hf_config`` as ``AutoModelForCausalLM.from_config`` would, with its parameters on
    the meta device (buffers such as rotary frequencies computed as usual) and tied ones shared: to fill from a
    checkpoint without a second copy. ``attn_implementation`` as for ``from_pretrained`` (None: the default)."""
    from accelerate import init_empty_weights

    attention = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    with init_empty_weights(include_buffers=False):
        model = hf_class._from_config(hf_config, dtype=dtype, **attention)
    model.tie_weights()
    return model


def causal_lm_class(hf_config) -> type | None:
    """The HF class that generates with this config: the checkpoint's own code when it ships some (allowed by
    ``load_hf_config``), else by config type, else the checkpoint's architectures (text decoders of
    multimodal checkpoints save a ``*_text`` config type that no auto mapping lists), else by the config's text
    sub-config."""
    class_ref = remote_code_class_ref(hf_config)
    if class_ref is not None:
        return get_class_from_dynamic_module(class_ref, hf_config._name_or_path)
    mapping = AutoModelForCausalLM._model_mapping
    if type(hf_config) in mapping:
        return mapping[type(hf_config)]
    causal_lm_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for architecture in getattr(hf_config, "architectures", None) or []:
        if architecture in causal_lm_names:
            return getattr(transformers, architecture)
    text_config = hf_config.get_text_config(decoder=True)
    if text_config is not hf_config and type(text_config) in mapping:
        return mapping[type(text_config)]
    return None


# Cache layers whose batched use with left padding HF's generate handles: keys and values hidden by the attention
# mask (exactly these classes: subclasses such as an indexer's keep more), or a fixed-size per-sequence state
# (linear attention, convolutions, and hybrids of those with attention) that padding never enters.
_FIXED_STATE_CACHE_LAYERS = tuple(
    cls for cls in (getattr(cache_utils, "LinearAttentionCacheLayerMixin", None),) if cls is not None
)


def _cache_layer_classes(hf_config) -> dict[str, type | None] | None:
    """Layer type -> the class of its HF cache layer, as transformers' own ``DynamicCache`` would build them
    (None for a type no class is registered for); None when this transformers cannot tell."""
    layer_types_of = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    mapping = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", None)
    if layer_types_of is None or mapping is None:
        return None  # older transformers: no per-layer cache classes to ask
    try:
        layer_types, _ = layer_types_of(hf_config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):  # a config without the per-layer fields it expects
        return None
    return {layer_type: mapping.get(layer_type) for layer_type in layer_types}


def stateful_layer_types(hf_config) -> list[str]:
    """Layer types of the config whose HF cache layer holds more than keys and values (conv or recurrent
    state, indexer keys, compressed KV). Empty when transformers cannot tell: the fallback's load check runs."""
    classes = _cache_layer_classes(hf_config) or {}
    return sorted(t for t, cls in classes.items() if cls not in _KV_ONLY_CACHE_LAYERS)


def padding_unsafe_layer_types(hf_config) -> list[str]:
    """Layer types whose cache HF does not mask in left-padded batches (e.g. an indexer choosing top-k keys
    among padding too), or unknown ones: sequences of such models must not share a padded batch."""
    classes = _cache_layer_classes(hf_config) or {}
    return sorted(
        t for t, cls in classes.items()
        if cls not in _KV_ONLY_CACHE_LAYERS and not (cls is not None and issubclass(cls, _FIXED_STATE_CACHE_LAYERS))
    )
