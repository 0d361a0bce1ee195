"""The Transformers fallback: any HF causal LM whose attention goes through ``AttentionInterface``.

The HF model is instantiated with ``attn_implementation="tfbackend"``, so every attention layer calls our
paged attention. A step's tokens go in as one sequence (``input_ids[1, T]``) with explicit ``position_ids``
and ``use_cache=False``: RoPE, learned positions and OPT's offset all follow the positions we pass, while
our attention keeps the sequences apart. Logits are computed only for the rows the sampler needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from tfbackend.attention_bridge import ATTN_IMPLEMENTATION


class TransformersForCausalLM(nn.Module):
    """Wraps an HF ``*ForCausalLM`` behind the engine's model contract."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config
        self.base_model = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else hf_model.base_model
        self.lm_head = hf_model.get_output_embeddings()
        text_config = self.config.get_text_config()
        # Post-LM-head transforms some families apply in their *ForCausalLM.forward.
        self.final_logit_softcapping = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale = getattr(text_config, "logit_scale", None)  # cohere: multiply
        self.logits_scaling = getattr(text_config, "logits_scaling", None)  # granite: divide

    @classmethod
    def load(cls, model_dir: str | Path, hf_config, dtype: torch.dtype, device: torch.device):
        """Build on the meta device and stream the checkpoint straight to ``device`` in ``dtype``.

        transformers' own loader does the streaming (tensor by tensor from safetensors, applying the
        checkpoint-format conversions it knows, e.g. per-expert MoE weights into fused ones), so a
        checkpoint that loads in HF loads here, and no second copy of the weights is ever materialised.
        """
        hf_model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            config=hf_config,
            dtype=dtype,
            device_map=str(device),
            attn_implementation=ATTN_IMPLEMENTATION,
        )
        hf_model.eval().requires_grad_(False)
        return cls(hf_model)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids[T]``, ``positions[T]`` -> ``hidden[T, H]`` (after the final norm)."""
        out = self.base_model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
        )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits
