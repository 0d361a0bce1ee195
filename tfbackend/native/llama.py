"""Native Llama, and the families that differ from it only in flags: Mistral, Qwen2 and Qwen3.

One decoder: pre-norm attention with grouped-query heads and RoPE, then a SwiGLU MLP. q/k/v and gate/up
are fused into one projection each when the checkpoint is loaded. What sets the families apart is read
from the config in ``LlamaVariant``, mirroring what each HF modeling file builds.

Tensor parallel: each rank holds its query heads and the KV heads they read (replicated when there are fewer
KV heads than ranks) in its fused q/k/v slice, its share of the MLP's intermediate features in its fused
gate/up slice, and a slice of the vocabulary; o_proj and down_proj all-reduce. Pipeline parallel: each stage
builds its own decoder layers (the first the embedding, the last the final norm and LM head) and hands the
next one the hidden states and the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from tfbackend.attention import LayerAttentionOptions, paged_attention
from tfbackend.distributed import CommGroup, current_parallel
from tfbackend.distributed.layers import (
    ColumnParallelLinear,
    HeadSplit,
    ParallelLMHead,
    Take,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_head_split,
    even_output,
    vocab_parallel_logits,
)
from tfbackend.distributed.pipeline import stage_layers
from tfbackend.model_interface import AttentionLayerSpec, IntermediateTensors
from tfbackend.native.layers import (
    SUPPORTED_ROPE_TYPES,
    NativeCausalLM,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary_emb,
)


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaVariant:
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over each head of q and k, before RoPE
    sliding_windows: tuple[int | None, ...]  # per layer, as HF passes `sliding_window` to attention

    @classmethod
    def from_hf_config(cls, config) -> LlamaVariant:
        num_layers = config.num_hidden_layers
        if config.model_type == "llama":
            bias = config.attention_bias
            return cls(bias, bias, config.mlp_bias, qk_norm=False, sliding_windows=(None,) * num_layers)
        if config.model_type == "mistral":  # every layer gets config.sliding_window (None: full attention)
            return cls(False, False, False, qk_norm=False, sliding_windows=(config.sliding_window,) * num_layers)
        if config.model_type in ("qwen2", "qwen3"):
            # The config resolves use_sliding_window / max_window_layers into layer_types.
            windows = tuple(
                config.sliding_window if layer_type == "sliding_attention" else None
                for layer_type in config.layer_types
            )
            if config.model_type == "qwen2":  # q/k/v always biased, o_proj never
                return cls(True, False, False, qk_norm=False, sliding_windows=windows)
            bias = config.attention_bias
            return cls(bias, bias, False, qk_norm=True, sliding_windows=windows)
        raise ValueError(f"the native Llama port covers model types {MODEL_TYPES}, not {config.model_type!r}")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, variant: LlamaVariant, layer_idx: int, cache_index: int, tp: CommGroup):
        """``layer_idx``: the decoder layer (its window); ``cache_index``: its call site on this rank."""
        super().__init__()
        self.cache_index = cache_index
        self.head_dim = head_dim_of(config)
        heads = HeadSplit.of(config.num_attention_heads, config.num_key_value_heads, tp)
        self.num_heads, self.num_kv_heads = heads.num_q, heads.num_kv
        slices = [heads.query("q_proj", self.head_dim), heads.key_value("k_proj", self.head_dim),
                  heads.key_value("v_proj", self.head_dim)]
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, slices, bias=variant.qkv_bias, tp=tp)
        q_size = config.num_attention_heads * self.head_dim
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, bias=variant.o_proj_bias, tp=tp)
        self.qk_norm = variant.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.options = LayerAttentionOptions(
            scale=self.head_dim**-0.5, sliding_window=variant.sliding_windows[layer_idx]
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, _ = self.q_norm(q)
            k, _ = self.k_norm(k)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        out = paged_attention(self.cache_index, q, k, v, self.options)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool, tp: CommGroup):
        super().__init__()
        size = config.intermediate_size
        slices = [even_output(name, size, tp, "intermediate_size") for name in ("gate_proj", "up_proj")]
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, slices, bias=bias, tp=tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, tp=tp)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, variant: LlamaVariant, layer_idx: int, cache_index: int, tp: CommGroup):
        super().__init__()
        self.self_attn = LlamaAttention(config, variant, layer_idx, cache_index, tp)
        self.mlp = LlamaMLP(config, variant.mlp_bias, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Each norm first adds the previous block's output to the residual stream (HF adds it at block end).
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class MissingLayer(nn.Module):
    """Stands in for a decoder layer another pipeline stage holds, so checkpoint names keep their indices."""


class LlamaModel(nn.Module):
    def __init__(self, config, variant: LlamaVariant, layers: range, first_stage: bool, last_stage: bool,
                 tp: CommGroup):
        super().__init__()
        self.stage_layers = layers
        if first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, variant, i, i - layers.start, tp) if i in layers else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last_stage else None
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))  # shared by all layers

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: IntermediateTensors | None = None
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate["hidden"], intermediate["residual"]
        cos, sin = self.rotary_emb(positions)
        for i in self.stage_layers:
            hidden, residual = self.layers[i](hidden, residual, cos, sin)
        if self.norm is None:
            return {"hidden": hidden, "residual": residual}
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(NativeCausalLM):
    """Serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM checkpoints."""

    supports_tensor_parallel = True
    supports_pipeline_parallel = True

    @classmethod
    def supports(cls, hf_config) -> str | None:
        config = hf_config.get_text_config()
        if config.model_type not in MODEL_TYPES:
            return f"it covers model types {', '.join(MODEL_TYPES)}, not {config.model_type!r}"
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            return f"its RoPE supports {', '.join(SUPPORTED_ROPE_TYPES)}, not {rope_type!r}"
        parallel = current_parallel()
        try:
            check_head_split(config.num_attention_heads, config.num_key_value_heads, parallel.tp.size)
            even_output(None, config.intermediate_size, parallel.tp, "intermediate_size")
            stage_layers(config.num_hidden_layers, parallel.pp_rank, parallel.pp_size)
        except ValueError as error:
            return str(error)
        return None

    def __init__(self, hf_config):
        super().__init__()
        config = hf_config.get_text_config()
        self.config = config
        self.variant = LlamaVariant.from_hf_config(config)
        parallel = current_parallel()
        self.tp = parallel.tp
        self.layer_range = stage_layers(config.num_hidden_layers, parallel.pp_rank, parallel.pp_size)
        self.first_stage, self.last_stage = parallel.is_first_stage, parallel.is_last_stage
        self.model = LlamaModel(config, self.variant, self.layer_range, self.first_stage, self.last_stage, self.tp)
        # Tied checkpoints have no lm_head: the logits reuse the embedding matrix, or on a last stage without the
        # embedding, a copy of it read from the checkpoint's embedding.
        self.lm_head = None
        if self.last_stage and (not config.tie_word_embeddings or not self.first_stage):
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, self.tp)

    def skips_checkpoint_tensor(self, name: str) -> bool:
        if super().skips_checkpoint_tensor(name):
            return True
        if name == "lm_head.weight":  # some tied checkpoints store it anyway; HF ties it to the embedding regardless
            return self.lm_head is None or self.config.tie_word_embeddings
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) not in self.layer_range
        if name.startswith("model.embed_tokens."):
            return not self.first_stage and (self.lm_head is None or not self.config.tie_word_embeddings)
        return name.startswith("model.norm.") and not self.last_stage

    def checkpoint_targets(self) -> dict[str, tuple[torch.Tensor, Take | None]]:
        targets = super().checkpoint_targets()
        if self.lm_head is not None and self.config.tie_word_embeddings:
            targets["model.embed_tokens.weight"] = targets.pop("lm_head.weight")
        return targets

    def attention_layers(self) -> list[AttentionLayerSpec]:
        head_dim = head_dim_of(self.config)
        num_kv_heads = HeadSplit.of(self.config.num_attention_heads, self.config.num_key_value_heads, self.tp).num_kv
        return [
            AttentionLayerSpec(num_kv_heads, head_dim, head_dim, sliding_window=self.variant.sliding_windows[i])
            for i in self.layer_range
        ]

    def pipeline_intermediates(self) -> dict[str, int]:
        return {"hidden": self.config.hidden_size, "residual": self.config.hidden_size}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: IntermediateTensors | None = None
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return vocab_parallel_logits(hidden, weight, self.tp, self.config.vocab_size)
