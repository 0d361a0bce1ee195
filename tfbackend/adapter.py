"""The Transformers fallback: any HF causal LM whose attention goes through ``AttentionInterface``.

The HF model is instantiated with ``attn_implementation="tfbackend"``, so every attention call reaches our
paged attention. A step's tokens go in as one sequence (``input_ids[1, T]``) with explicit ``position_ids``
and ``use_cache=False``: RoPE, learned positions and OPT's offset all follow the positions we pass, while
our attention keeps the sequences apart.

Nothing about the model's shape is guessed from its config. At load, one probe pass over a short prompt
records every attention call (``attention_bridge.probe_attention_calls``): its KV heads and widths, shared KV,
and the sliding window or chunk that HF's own mask function describes. A second check runs the same prompt
whole and in two chunks through a small paged cache: the results must agree, which they do not for layers
that keep state outside attention (convolutions, recurrences) or attend to later tokens. Logits come from HF's
own ``*ForCausalLM.forward`` (whatever head transform, scaling or softcap it applies) fed with our hidden
states, or from the plain output embedding when the load check shows the two are identical.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from tfbackend.attention import ForwardContext, forward_context, metadata_for_chunks
from tfbackend.attention.torch_backend import TorchAttentionBackend
from tfbackend.attention_bridge import (
    ATTN_IMPLEMENTATION,
    CALL_SITES_ATTRIBUTE,
    PROBE_IMPLEMENTATION,
    CallSite,
    MaskDescription,
    RecordedCall,
    probe_attention_calls,
)
from tfbackend.distributed.hf_parallel import HFParallelLayout, HFPipelineStage
from tfbackend.fallback_fusion import FusedLinears, fuse_projections, fusion_enabled, hidden_states_error
from tfbackend.hf_classes import causal_lm_class, stateful_layer_types
from tfbackend.kernels.hf_experts import use_fused_experts
from tfbackend.kv_cache import KVCache, KVCacheSpec
from tfbackend.model_interface import AttentionLayerSpec, CausalLM, IntermediateTensors, UnsupportedModelError
from tfbackend.quantization.config import quantization_method
from tfbackend.quantization.hf_loading import load_quantized_hf_model

logger = logging.getLogger(__name__)


class _CheckTimings:
    """Seconds per load-time check, for the log (they are part of the startup's "load weights" phase)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, check: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[check] = time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{check} {seconds:.2f} s" for check, seconds in self.seconds.items())


PROBE_LENGTH = 12  # tokens of the load-time probe; chunked in two for the state check
# Relative error allowed per token between the whole and the chunked probe: float32 for every token; in half
# precision for the median token (a rounding difference may flip an MoE router for a token or two, while state
# that a paged cache loses, or a look-ahead, changes every token of a chunk by O(1)). Half-precision rounding
# grows with depth: 4.1e-2 on random Llama-3.1-8B weights in bf16 (32 layers, H100), hence the margin.
STEP_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.15, torch.bfloat16: 0.15}


class TransformersForCausalLM(CausalLM):
    """Wraps an HF ``*ForCausalLM`` behind the engine's model contract."""

    # Split by the model's tensor-parallel plan and pipeline plan (tfbackend.distributed.hf_parallel).
    supports_tensor_parallel = True
    supports_pipeline_parallel = True

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config
        self.base_model_name = _base_model_name(hf_model)
        self.base_model = getattr(hf_model, self.base_model_name)  # decoder stack, embeddings, final norm
        self.lm_head = hf_model.get_output_embeddings()
        text_config = self.config.get_text_config()
        # Post-LM-head transforms some families apply in their *ForCausalLM.forward (used only where the load
        # check proves the plain head equals HF's forward).
        self.final_logit_softcapping = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale = getattr(text_config, "logit_scale", None)  # cohere: multiply
        self.logits_scaling = getattr(text_config, "logits_scaling", None)  # granite: divide
        self.plain_head = False
        self.layers: list[AttentionLayerSpec] = []
        self.stage: HFPipelineStage | None = None  # this rank's layers, under pipeline parallelism
        self.fused_projections: list[FusedLinears] = []  # projection groups run as one GEMM each

    @classmethod
    def supports(cls, hf_config) -> str | None:
        hf_class = causal_lm_class(hf_config)
        if hf_class is None:
            return f"transformers has no causal-LM class for model type {hf_config.model_type!r}"
        if not getattr(hf_class, "_supports_attention_backend", False):
            return (
                f"{hf_class.__name__} does not route attention through transformers' AttentionInterface "
                f"(_supports_attention_backend is not set)"
            )
        stateful = stateful_layer_types(hf_config)
        if stateful:
            return (
                f"{hf_class.__name__} has layers that keep state outside attention ({', '.join(stateful)}), "
                f"which a paged KV cache cannot hold"
            )
        return HFParallelLayout.refusal(hf_class, hf_config)  # None on a single process

    @classmethod
    def load(
        cls, model_dir: str | Path, hf_config, dtype: torch.dtype, device: torch.device, quantization: str | None = None
    ):
        """Build on the meta device and stream the checkpoint straight to ``device`` in ``dtype``.

        transformers' own loader does the streaming (tensor by tensor from safetensors, applying the
        checkpoint-format conversions it knows, e.g. per-expert MoE weights into fused ones), so a
        checkpoint that loads in HF loads here, and no second copy of the weights is ever materialised.
        With several ranks only this rank's share reaches ``device`` (``HFParallelLayout.load`` says how).
        Quantized checkpoints (and ``quantization="fp8"``) load through ``tfbackend.quantization`` instead.
        """
        hf_class = causal_lm_class(hf_config)
        layout = HFParallelLayout(model_dir, device)  # this rank's share of the model, when several
        method = quantization_method(hf_config, quantization)
        if method is not None:
            if layout.active:
                raise ValueError(
                    f"the transformers fallback cannot split quantized linear layers over several ranks "
                    f"({method.name}); use a native port or one rank"
                )
            hf_model = load_quantized_hf_model(
                hf_class, model_dir, hf_config, dtype, device, method, ATTN_IMPLEMENTATION
            )
            return cls.wrap(hf_model)
        started = time.perf_counter()

        def from_pretrained(device: torch.device) -> nn.Module:
            return hf_class.from_pretrained(model_dir, config=hf_config, dtype=dtype, device_map=str(device),
                                            attn_implementation=ATTN_IMPLEMENTATION)

        hf_model, stage = layout.load(from_pretrained, hf_class, hf_config, dtype, ATTN_IMPLEMENTATION)
        use_fused_experts(hf_model)  # MoE experts through our fused kernel where it reproduces them; else HF's
        logger.info("%s: built and loaded by transformers in %.2f s", hf_class.__name__, time.perf_counter() - started)
        return cls.wrap(hf_model, stage)

    @classmethod
    def wrap(cls, hf_model: nn.Module, stage: HFPipelineStage | None = None) -> TransformersForCausalLM:
        """Serve an HF model already loaded with our attention implementation (and cut to this rank's
        ``stage``, when several): map its attention calls and run the load-time checks, as ``load`` does."""
        hf_model.eval().requires_grad_(False)
        model = cls(hf_model)
        model.stage = stage
        timings = _CheckTimings()
        with torch.inference_mode():
            with timings.time("attention calls"):
                model._map_attention_calls()
            if fusion_enabled():
                with timings.time("fusion"):
                    model.fused_projections = fuse_projections(hf_model, model._probe_hidden_states)
            with timings.time("steps compose"):
                model._check_steps_compose()
            with timings.time("logits path"):
                model._choose_logits_path()
        logger.info("%s: load-time checks took %s", type(hf_model).__name__, timings)
        return model

    def attention_layers(self) -> list[AttentionLayerSpec]:
        return list(self.layers)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: IntermediateTensors | None = None
    ) -> torch.Tensor | IntermediateTensors:
        if self.stage is None:
            return self._hidden_states(input_ids, positions)
        return self.stage.forward(lambda: self._hidden_states(input_ids, positions), intermediate)

    def pipeline_intermediates(self) -> dict[str, int]:
        return {"hidden": self.config.get_text_config().hidden_size}

    def _hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids[T]``, ``positions[T]`` -> ``hidden[T, H]`` (after the final norm)."""
        out = self.base_model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
        )
        return out[0][0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.plain_head:
            return self._hf_head_logits(hidden)
        logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits

    # ---- load-time checks ---------------------------------------------------------------------------------

    def _probe_input(self) -> torch.Tensor:
        vocab = self.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(0)
        # Token ids from the lower half of the vocabulary: special (e.g. image) tokens tend to sit at the top.
        ids = torch.randint(1, max(2, vocab // 2), (PROBE_LENGTH,), generator=generator)
        return ids.to(self.hf_model.device)

    def _probe_hidden_states(self) -> torch.Tensor:
        """The base model's output for the probe prompt, with the probe's dense attention."""
        with _attention_implementation(self.hf_model, PROBE_IMPLEMENTATION), probe_attention_calls():
            return self.base_model(input_ids=self._probe_input()[None], use_cache=False)[0]

    def _map_attention_calls(self) -> None:
        """Run the probe pass and give every attention module its call sites (KV cache index and window)."""
        input_ids = self._probe_input()
        with _attention_implementation(self.hf_model, PROBE_IMPLEMENTATION), probe_attention_calls() as calls:
            try:
                self.base_model(input_ids=input_ids[None], use_cache=False)
            except Exception as error:  # the model used its mask in a way only a real tensor mask supports
                raise UnsupportedModelError(
                    f"the probe pass through {type(self.hf_model).__name__} failed ({type(error).__name__}: "
                    f"{error}); its attention needs more than the attention interface provides"
                ) from error
        if not calls:
            raise UnsupportedModelError(f"{type(self.hf_model).__name__} made no call to the attention interface")
        self.layers = []
        sites: dict[nn.Module, list[CallSite]] = {}
        for index, call in enumerate(calls):
            spec, site = self._describe_call(index, call, calls[:index])
            self.layers.append(spec)
            sites.setdefault(call.module, []).append(site)
        for module, module_sites in sites.items():
            setattr(module, CALL_SITES_ATTRIBUTE, tuple(module_sites))
        self._check_cache_windows(sites)

    def _check_cache_windows(self, sites: dict[nn.Module, list[CallSite]]) -> None:
        """Refuse a model whose own HF cache keeps only a window of keys that its attention mask does not
        apply (Moshi): ``generate`` then decodes over fewer keys than it prefills over, which a paged cache
        holding what the mask allows cannot reproduce; the compat tier, running HF's cache, does.

        A chunked mask no longer than the cache's window is applied (Llama 4): a query sees only its own chunk,
        which always lies within the last ``chunk_size`` keys, so HF's window drops nothing the mask allows."""
        if not self.hf_model._supports_default_dynamic_cache():
            return
        try:
            cache_layers = DynamicCache(config=self.config.get_text_config(decoder=True)).layers
        except Exception:  # a config HF's own cache cannot read: nothing to compare against
            return
        for module, module_sites in sites.items():
            layer_idx = getattr(module, "layer_idx", None)
            if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(cache_layers):
                continue
            cache_layer = cache_layers[layer_idx]
            if getattr(cache_layer, "is_sliding", False) and any(
                site.sliding_window is None and (site.chunk_size is None or site.chunk_size > cache_layer.sliding_window)
                for site in module_sites
            ):
                raise UnsupportedModelError(
                    f"{type(self.hf_model).__name__}'s cache keeps only the last {cache_layer.sliding_window} keys "
                    f"of layer {layer_idx}, a window its attention mask does not apply: HF decodes over fewer keys "
                    "than it prefills over"
                )

    def _describe_call(
        self, index: int, call: RecordedCall, earlier: list[RecordedCall]
    ) -> tuple[AttentionLayerSpec, CallSite]:
        module_name = type(call.module).__name__
        mask = call.mask
        if mask is not None and not isinstance(mask, MaskDescription):
            raise UnsupportedModelError(
                f"{module_name} passes its own attention mask or bias ({type(mask).__name__}) to attention; "
                f"paged attention computes causal masks itself"
            )
        if isinstance(mask, MaskDescription) and not mask.causal:
            raise UnsupportedModelError(f"{module_name} attends to later tokens (its mask is not causal)")
        window = call.sliding_window
        chunk = None
        if isinstance(mask, MaskDescription):
            window = mask.sliding_window if mask.sliding_window is not None else window
            chunk = mask.chunk_size
        if call.key.shape[0] != 1:
            raise UnsupportedModelError(f"{module_name} changes the batch dimension before attention")
        # Shared KV: this call receives the very key and value tensors an earlier call stored (a module that
        # attends twice with the same keys but other values needs a cache of its own).
        owner = next(
            (i for i, other in enumerate(earlier) if other.key is call.key and other.value is call.value), None
        )
        if owner is not None and self.layers[owner].shares_kv_with is not None:
            owner = self.layers[owner].shares_kv_with
        spec = AttentionLayerSpec(
            num_kv_heads=call.key.shape[1], head_dim=call.key.shape[-1], v_head_dim=call.value.shape[-1],
            sliding_window=window, shares_kv_with=owner,
        )
        return spec, CallSite(index, window, chunk)

    def _check_steps_compose(self) -> None:
        """The probe prompt in one step and in two must give the same hidden states: a paged KV cache holds
        everything that carries over between steps (no convolution or recurrent state, no look-ahead)."""
        input_ids = self._probe_input()
        device, block_size, split = input_ids.device, 4, PROBE_LENGTH // 2
        spec = KVCacheSpec(tuple(self.layers), self.hf_model.dtype, block_size)
        cache = KVCache(spec, -(-PROBE_LENGTH // block_size), device)
        block_table = torch.arange(cache.num_blocks, dtype=torch.int32, device=device)[None]

        def step(start: int, end: int) -> torch.Tensor:
            positions, metadata = metadata_for_chunks([start], [end - start], block_table, block_size)
            with forward_context(ForwardContext(metadata, cache, TorchAttentionBackend())):
                return self._hidden_states(input_ids[start:end], positions).float()

        whole = step(0, PROBE_LENGTH)
        cache.storage.zero_()
        chunked = torch.cat([step(0, split), step(split, PROBE_LENGTH)])
        dtype = self.hf_model.dtype
        error = hidden_states_error(chunked, whole, dtype)
        if not error <= STEP_TOLERANCE.get(dtype, 0.15):
            raise UnsupportedModelError(
                f"{type(self.hf_model).__name__} gives different results when a prompt is fed in two steps "
                f"(relative error {error:.2e}): some layer keeps state outside attention or looks ahead"
            )

    def _choose_logits_path(self) -> None:
        """Use the plain output embedding (plus the known scalings) when it equals HF's own forward."""
        hidden_size = self.config.get_text_config().hidden_size
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(3, hidden_size, generator=generator).to(self.hf_model.device, self.hf_model.dtype)
        try:
            reference = self._hf_head_logits(hidden)
        except Exception as error:
            raise UnsupportedModelError(
                f"{type(self.hf_model).__name__}.forward cannot compute logits from given hidden states "
                f"({type(error).__name__}: {error})"
            ) from error
        if self.lm_head is not None:
            self.plain_head = True
            try:
                plain = self.compute_logits(hidden)
                self.plain_head = plain.shape == reference.shape and torch.equal(plain, reference)
            except RuntimeError:  # e.g. a head that projects hidden states before the output embedding
                self.plain_head = False
        if not self.plain_head:
            logger.info("%s: logits through the model's own forward (its head is not a plain projection)",
                        type(self.hf_model).__name__)

    def _hf_head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits by HF's ``*ForCausalLM.forward`` itself, with its base model swapped for ``hidden``."""
        dummy_ids = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
        with _replaced_submodule(self.hf_model, self.base_model_name, _GivenHiddenStates(hidden)):
            out = self.hf_model(input_ids=dummy_ids, use_cache=False)
        return out.logits[0]


def _base_model_name(hf_model: nn.Module) -> str:
    """The attribute holding the base model: ``base_model_prefix`` when it names a submodule, else the child
    that holds the input embeddings (some classes declare a prefix they do not use)."""
    prefix = getattr(hf_model, "base_model_prefix", "")
    if prefix and isinstance(getattr(hf_model, prefix, None), nn.Module):
        return prefix
    embeddings = hf_model.get_input_embeddings()
    for name, child in hf_model.named_children():
        if any(module is embeddings for module in child.modules()):
            return name
    raise UnsupportedModelError(f"cannot find the base model of {type(hf_model).__name__}")


class _HiddenStatesOnly(BaseModelOutputWithPast):
    """A base-model output with nothing but hidden states: every other field a head may read is None."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _GivenHiddenStates(nn.Module):
    """Stands in for an HF base model and returns hidden states computed elsewhere."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> BaseModelOutputWithPast:
        return _HiddenStatesOnly(last_hidden_state=self.hidden[None])

    def __getattr__(self, name: str):
        # Heads that call a part of their base model (OPT: ``self.model.decoder(...)``) get this stand-in too.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return self


@contextlib.contextmanager
def _replaced_submodule(parent: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    original = getattr(parent, name)
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, original)


@contextlib.contextmanager
def _attention_implementation(hf_model: nn.Module, name: str) -> Iterator[None]:
    """Switch every config of the model (sub-configs included) to attention implementation ``name``."""
    configs = [module.config for module in hf_model.modules() if hasattr(module, "config")]
    configs = list({id(config): config for config in configs}.values())
    for config in list(configs):
        for sub_name in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, sub_name, None)
            if sub is not None and all(sub is not c for c in configs):
                configs.append(sub)
    originals = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = name
    try:
        yield
    finally:
        for config, original in zip(configs, originals):
            config._attn_implementation = original
