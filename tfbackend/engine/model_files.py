"""What the engine reads from a checkpoint folder besides weights: tokenizer, stop ids, context length."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path):
    """The checkpoint's tokenizer, or None for a checkpoint that ships none (it then runs on token ids)."""
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        logger.info("%s has no tokenizer files: prompts must be token ids and outputs carry no text", path)
        return None
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(model_dir, hf_config, tokenizer) -> set[int]:
    """End-of-sequence ids as HF ``generate`` would use them (generation config first)."""
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation_config = GenerationConfig.from_model_config(hf_config)
    eos = generation_config.eos_token_id
    if eos is None:
        eos = getattr(hf_config.get_text_config(), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


def max_model_len(hf_config, requested: int | None) -> int:
    """The context length: ``requested``, checked against the model's ``max_position_embeddings``."""
    model_max = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    if model_max is not None and model_max <= 0:  # XLNet's -1: relative positions, no limit of its own
        model_max = None
    if requested is None:
        if model_max is None:
            raise ValueError("the model config has no max_position_embeddings: pass max_model_len")
        return model_max
    if model_max is not None and requested > model_max:
        raise ValueError(f"max_model_len={requested} exceeds the model's max_position_embeddings={model_max}")
    return requested
