"""A tiny Llama GGUF file written with the ``gguf`` package, mixing the tensor types llama.cpp files mix.

Q8_0 and Q4_1 tensors are quantized by ``gguf.quantize`` from random weights; Q4_K and Q6_K, which that package
can only dequantize, are random valid blocks (random codes, small positive float16 super-block scales). As
llama.cpp's converter does, q and k rows are stored in its rotary order, which transformers undoes on load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType, quantize

Q8_0, Q4_1, Q4_K, Q6_K, F32 = (GGMLQuantizationType[name] for name in ("Q8_0", "Q4_1", "Q4_K", "Q6_K", "F32"))
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 512, 2, 4, 2, 64, 256

# GGUF tensor name (per layer) -> (type, output rows, input columns). Layer 1's v is Q6_K: a fused q/k/v whose
# shards differ in type, and one with no kernel. Q4_K needs rows of 256-multiples.
LAYER_TENSORS = {
    "attn_q": (Q4_1, HEADS * HEAD_DIM, HIDDEN),
    "attn_k": (Q4_1, KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (Q4_1, KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_output": (Q8_0, HIDDEN, HEADS * HEAD_DIM),
    "ffn_gate": (Q4_K, INTERMEDIATE, HIDDEN),
    "ffn_up": (Q4_K, INTERMEDIATE, HIDDEN),
    "ffn_down": (Q4_K, HIDDEN, INTERMEDIATE),
}
OVERRIDES = {"blk.1.attn_v": Q6_K}


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    _add_byte_tokenizer(writer)

    writer.add_tensor("token_embd.weight", *_blocks(rng, Q8_0, VOCAB, HIDDEN))
    writer.add_tensor("output.weight", *_blocks(rng, Q6_K, VOCAB, HIDDEN))
    writer.add_tensor("output_norm.weight", rng.normal(1.0, 0.2, HIDDEN).astype(np.float32))
    for layer in range(LAYERS):
        for name, (qtype, rows, cols) in LAYER_TENSORS.items():
            full = f"blk.{layer}.{name}"
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name)
            writer.add_tensor(f"{full}.weight", *_blocks(rng, OVERRIDES.get(full, qtype), rows, cols, heads))
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", rng.normal(1.0, 0.2, HIDDEN).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _blocks(rng, qtype, rows: int, cols: int, rotary_heads: int | None = None):
    """``(blocks, raw_dtype=qtype)`` arguments of ``add_tensor`` for a ``rows x cols`` weight."""
    if qtype in (Q8_0, Q4_1):
        blocks = quantize(rng.normal(0.0, 0.15, (rows, cols)).astype(np.float32), qtype)
    else:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
        if qtype == Q4_K:  # d, dmin lead the block: w = q * d * sc - dmin * m, q < 16, sc and m < 64
            blocks[:, 0:4] = np.abs(rng.normal(0, 4e-4, (len(blocks), 2))).astype(np.float16).view(np.uint8)
        else:  # Q6_K: d trails the block: w = d * sc * (q - 32) with int8 sc
            blocks[:, -2:] = np.abs(rng.normal(0, 6e-5, (len(blocks), 1))).astype(np.float16).view(np.uint8)
        blocks = blocks.reshape(rows, -1)
    if rotary_heads is not None:  # llama.cpp's rotary row order: rows (i, i + half) of each head interleaved
        half = rows // rotary_heads // 2
        blocks = blocks.reshape(rotary_heads, 2, half, -1).swapaxes(1, 2).reshape(blocks.shape)
    return np.ascontiguousarray(blocks), None, qtype


def _add_byte_tokenizer(writer: GGUFWriter) -> None:
    """A byte-level BPE vocabulary of 256 single-byte tokens (GPT-2's byte-to-unicode alphabet), one merge."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    alphabet = dict(zip(printable + [b for b in range(256) if b not in printable], codes))
    tokens = [chr(alphabet[byte]) for byte in range(256)]
    tokens[-1] = tokens[ord("h")] + tokens[ord("e")]  # one merged token, so the merge list is not empty
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.NORMAL] * VOCAB)
    writer.add_token_merges([f"{tokens[ord('h')]} {tokens[ord('e')]}"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
