"""Tiny random checkpoints of real HF architectures, and HF's own greedy output as the reference."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# model_type -> config overrides; each family exercises something the attention bridge must honour.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=8),  # sliding window shorter than the prompts
    "qwen2": {},  # qkv bias
    "qwen3": dict(head_dim=16),  # q/k norm
    "gemma2": dict(sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=5.0, head_dim=16),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=None),  # learned positions
    "phi3": {},
    "olmo2": {},
    "gpt_neox": dict(rotary_pct=0.25, use_parallel_residual=True),  # partial rotary
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, num_attention_heads=4),  # learned positions with offset
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # MoE
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=16),  # MoE, q/k norm
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),  # MoE
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),  # attention sinks
}


def make_config(model_type: str, **overrides):
    kwargs = dict(_COMMON)
    kwargs.update(FAMILIES.get(model_type, {}))
    kwargs.update(overrides)
    if model_type == "gpt2":
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            kwargs.pop(key)
    if model_type in ("opt", "gpt_neox"):  # no grouped-query attention in these families
        kwargs.pop("num_key_value_heads")
    if model_type == "opt":
        kwargs.pop("intermediate_size")
    return AutoConfig.for_model(model_type, **kwargs)


def make_checkpoint(model_type: str, directory: Path, seed: int = 0, **overrides) -> AutoModelForCausalLM:
    """Save a random float32 model to ``directory`` (safetensors) and return it in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type, **overrides)).eval()
    _widen_init(model)
    model.save_pretrained(directory)
    return model


def _widen_init(model: torch.nn.Module) -> None:
    """HF's init (std 0.02) makes logits nearly flat, so greedy ties would decide tests; widen it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


# Generation-config fields that make HF generate bend greedy decoding (forced EOS at the length limit,
# suppressed or banned tokens, n-gram blocking...): task presets of some checkpoints, not the model's computation.
# The reference for parity turns them off; tfbackend applies sampling parameters only from the request.
GREEDY_BENDING_FIELDS = (
    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "no_repeat_ngram_size",
    "bad_words_ids", "min_length", "min_new_tokens", "repetition_penalty", "sequence_bias",
    "exponential_decay_length_penalty",
)


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF generate, one prompt at a time (no padding), stopping at EOS: the ground truth for greedy parity."""
    for field in GREEDY_BENDING_FIELDS:
        setattr(model.generation_config, field, None)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs
