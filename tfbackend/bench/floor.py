"""The hardware floor: the least time a workload can take on this device, whatever the implementation.

Two ceilings are measured at the start of a run, not taken from a datasheet: memory bandwidth from a large
device-to-device copy (bytes read plus bytes written) and the matrix rate from a large matrix product in the
serving dtype. A phase of the workload then needs at least ``bytes / bandwidth`` and ``FLOPs / rate``; its
floor is the larger. Bytes: the weights are read once per model step, the KV cache is written once and read
by attention once per token it serves. FLOPs: 2 per weight per token (the LM head only for sampled rows) plus
attention's 4 per head dimension per (query, key) pair. In a mixture of experts a token multiplies only the
experts it is routed to, and a step reads only the experts its tokens touch: with ``E`` experts, ``k`` per
token and ``n`` tokens in a step, at best (tokens spread evenly at random) ``E * (1 - (1 - k / E) ** n)``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tfbackend.kv_cache import KVCacheSpec


@dataclass
class Hardware:
    device: str
    bandwidth: float  # bytes/s, read + write
    matmul_rate: float  # FLOP/s in the serving dtype


@dataclass
class ModelCost:
    weight_bytes: int  # read once per step
    token_params: int  # multiplied by every token: all weights but the embedding table and LM head
    lm_head_params: int  # multiplied by every sampled row
    kv_bytes_per_token: int
    attention_flops_per_pair: int  # per (query, key) pair, all layers and heads
    routed_expert_share: float = 0.0  # of weight_bytes, in routed experts (a step reads those its tokens touch)
    num_experts: int = 0
    experts_per_token: int = 0

    @classmethod
    def from_checkpoint(
        cls, model_dir: Path, hf_config, kv_specs: list[KVCacheSpec], weight_bytes: int, tensor_parallel_size: int = 1
    ) -> ModelCost:
        """The checkpoint's sizes, the KV layout each rank of the loaded model declared (``kv_specs``, one per
        rank, any block size) and the bytes all ranks' weights take as loaded (``weight_bytes``: quantized
        weights are smaller than the checkpoint's parameter count times the model dtype): the whole model's
        work, however many GPUs share it."""
        text = hf_config.get_text_config()
        total, routed = _checkpoint_numels(model_dir)
        num_experts, per_token = _routing(text) if routed else (0, 0)
        head = text.vocab_size * text.hidden_size
        embeddings = head if getattr(text, "tie_word_embeddings", False) else 2 * head
        kv_bytes = sum(dataclasses.replace(spec, block_size=1).bytes_per_block for spec in kv_specs)
        # Every call site attends with the config's query heads (shared-KV sites too: they read, not store);
        # the ranks of a pipeline stage share its heads.
        # A model that keeps its own caches (the compat tier) declares no layers: its attention is not counted,
        # which keeps the floor a lower bound.
        widths = sum(layer.head_dim + layer.v_head_dim for spec in kv_specs for layer in spec.layers)
        query_heads = text.num_attention_heads if widths else 0
        unused_per_token = routed - routed * per_token // num_experts if num_experts else 0
        return cls(
            weight_bytes=weight_bytes,
            token_params=total - embeddings - unused_per_token,
            lm_head_params=head,
            kv_bytes_per_token=kv_bytes,
            attention_flops_per_pair=2 * query_heads * widths // tensor_parallel_size,
            routed_expert_share=routed / total if num_experts else 0.0,
            num_experts=num_experts,
            experts_per_token=per_token,
        )

    def weight_bytes_read(self, tokens_per_step: float) -> float:
        """Weight bytes one step of ``tokens_per_step`` tokens must read: all, less the routed experts that
        so few tokens cannot reach even when spread as evenly as routing allows."""
        if not self.num_experts:
            return self.weight_bytes
        touched = 1 - (1 - self.experts_per_token / self.num_experts) ** tokens_per_step
        return self.weight_bytes * (1 - self.routed_expert_share * (1 - touched))

    def phase_seconds(self, hw: Hardware, steps: int, tokens: int, sampled: int, kv_written: int,
                      kv_read: int, pairs: int) -> float:
        """Floor of ``steps`` model steps feeding ``tokens`` tokens in all (``sampled`` rows through the LM
        head), writing ``kv_written`` and reading ``kv_read`` tokens' KV, over ``pairs`` attention pairs."""
        bytes_moved = steps * self.weight_bytes_read(tokens / steps) + (kv_written + kv_read) * self.kv_bytes_per_token
        flops = 2 * (self.token_params * tokens + self.lm_head_params * sampled) + self.attention_flops_per_pair * pairs
        return max(bytes_moved / hw.bandwidth, flops / hw.matmul_rate)


def throughput_floor(cost: ModelCost, hw: Hardware, prompt_lens: list[int], output_len: int,
                     max_num_seqs: int, max_num_batched_tokens: int) -> float:
    """Seconds for T1: the prompts prefilled in as few steps as the token budget allows, then ``output_len - 1``
    decode steps per wave of ``max_num_seqs`` sequences (the first token comes out of the prefill)."""
    num = len(prompt_lens)
    prompt_tokens = sum(prompt_lens)
    prefill = cost.phase_seconds(
        hw, steps=-(-prompt_tokens // max_num_batched_tokens), tokens=prompt_tokens, sampled=num,
        kv_written=prompt_tokens, kv_read=prompt_tokens, pairs=sum(n * (n + 1) // 2 for n in prompt_lens),
    )
    decode_tokens = num * (output_len - 1)
    # Decode step t of a sequence with prompt p attends over p + t keys (t = 1 .. output_len - 1).
    keys_read = sum(p * (output_len - 1) + output_len * (output_len - 1) // 2 for p in prompt_lens)
    decode = cost.phase_seconds(
        hw, steps=(output_len - 1) * -(-num // max_num_seqs), tokens=decode_tokens, sampled=decode_tokens,
        kv_written=decode_tokens, kv_read=keys_read, pairs=keys_read,
    )
    return prefill + decode


def latency_floor(
    cost: ModelCost, hw: Hardware, batch_size: int, prompt_len: int, output_len: int
) -> tuple[float, float]:
    """Seconds for T2's time to first token and for one decode step (at the mean context length)."""
    prompt_tokens = batch_size * prompt_len
    ttft = cost.phase_seconds(
        hw, steps=1, tokens=prompt_tokens, sampled=batch_size, kv_written=prompt_tokens, kv_read=prompt_tokens,
        pairs=batch_size * prompt_len * (prompt_len + 1) // 2,
    )
    context = batch_size * (prompt_len + output_len // 2)
    step = cost.phase_seconds(hw, steps=1, tokens=batch_size, sampled=batch_size, kv_written=batch_size,
                              kv_read=context, pairs=context)
    return ttft, step


def measure_hardware(device: torch.device, dtype: torch.dtype, num_devices: int = 1) -> Hardware:
    """Median copy bandwidth and matrix rate on ``device`` (small sizes on a CPU, so tests stay fast), times
    ``num_devices`` for a model split over that many: the floor assumes they share the work perfectly."""
    cuda = device.type == "cuda"
    copy_bytes, n = (1 << 30, 8192) if cuda else (32 << 20, 512)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    if num_devices > 1:
        name = f"{num_devices} x {name}"
    bandwidth = 2 * copy_bytes / _copy_seconds(copy_bytes, device)
    return Hardware(name, num_devices * bandwidth, num_devices * 2 * n**3 / _matmul_seconds(n, dtype, device))


def _copy_seconds(num_bytes: int, device: torch.device) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), device)


def _matmul_seconds(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(n, n, device=device).to(dtype)  # random data: zeros multiply faster than real inputs
    b = torch.randn(n, n, device=device).to(dtype)
    return _median_seconds(lambda: torch.mm(a, b), device)


def _median_seconds(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


# A routed expert's weights, per expert (``mlp.experts.3.up_proj.weight``) or stacked (``mlp.experts.gate_up_proj``);
# not shared experts (``shared_expert.``, ``shared_experts.``), which every token runs.
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.")
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_PER_TOKEN_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")


def _routing(text_config) -> tuple[int, int]:
    """(experts, experts per token) from the config; (0, 0), counting every expert for every token, when the
    config does not say (the floor stays a lower bound)."""
    def first(keys: tuple[str, ...]) -> int:
        return next((value for key in keys if isinstance(value := getattr(text_config, key, None), int)), 0)
    num_experts, per_token = first(_NUM_EXPERTS_KEYS), first(_PER_TOKEN_KEYS)
    return (num_experts, per_token) if 0 < per_token <= num_experts else (0, 0)


def _checkpoint_numels(model_dir: Path) -> tuple[int, int]:
    """(all parameters, those of routed experts) from the safetensors headers, without loading a tensor."""
    total = routed = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                numel = 1
                for dim in entry["shape"]:
                    numel *= dim
                total += numel
                routed += numel if _ROUTED_EXPERT.search(name) else 0
    return total, routed

