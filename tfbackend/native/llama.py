"""Native Llama, and the families that differ from it only in flags: Mistral, Qwen2 and Qwen3.

One decoder: pre-norm attention with grouped-query heads and RoPE, then a SwiGLU MLP. q/k/v and gate/up
are fused into one projection each when the checkpoint is loaded. What sets the families apart is read
from the config in ``LlamaVariant``, mirroring what each HF modeling file builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from tfbackend.attention import LayerAttentionOptions, paged_attention
from tfbackend.model_interface import AttentionLayerSpec
from tfbackend.native.layers import (
    SUPPORTED_ROPE_TYPES,
    MergedLinear,
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
    def __init__(self, config, variant: LlamaVariant, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, bias=variant.qkv_bias
        )
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=variant.o_proj_bias)
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
        out = paged_attention(self.layer_idx, q, k, v, self.options)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate_proj": size, "up_proj": size}, bias=bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, variant: LlamaVariant, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, variant, layer_idx)
        self.mlp = LlamaMLP(config, variant.mlp_bias)
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


class LlamaModel(nn.Module):
    def __init__(self, config, variant: LlamaVariant):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, variant, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))  # shared by all layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(NativeCausalLM):
    """Serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM checkpoints."""

    @classmethod
    def supports(cls, hf_config) -> str | None:
        config = hf_config.get_text_config()
        if config.model_type not in MODEL_TYPES:
            return f"it covers model types {', '.join(MODEL_TYPES)}, not {config.model_type!r}"
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            return f"its RoPE supports {', '.join(SUPPORTED_ROPE_TYPES)}, not {rope_type!r}"
        return None

    def __init__(self, hf_config):
        super().__init__()
        config = hf_config.get_text_config()
        self.config = config
        self.variant = LlamaVariant.from_hf_config(config)
        self.model = LlamaModel(config, self.variant)
        # Tied checkpoints have no lm_head: the logits reuse the embedding matrix.
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def skips_checkpoint_tensor(self, name: str) -> bool:
        # Some tied checkpoints store lm_head.weight anyway; HF ties it to the embedding regardless.
        return super().skips_checkpoint_tensor(name) or (self.lm_head is None and name == "lm_head.weight")

    def attention_layers(self) -> list[AttentionLayerSpec]:
        head_dim = head_dim_of(self.config)
        return [
            AttentionLayerSpec(self.config.num_key_value_heads, head_dim, head_dim, sliding_window=window)
            for window in self.variant.sliding_windows
        ]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)
