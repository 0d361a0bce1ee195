"""The same workloads on Hugging Face transformers alone: ``generate`` and continuous batching.

``hf-generate`` is ``model.generate`` with SDPA attention and its dynamic cache: T2 batches are unpadded (every
prompt has the same length); T1 runs its requests as one left-padded batch. ``hf-cb`` is transformers'
continuous batching manager (what ``model.generate_batch`` drives) with its paged attention: requests are
added to a running manager after a short warm-up batch, so the manager's start and its CUDA-graph warm-up stay
out of the timing. Both decode greedily with EOS suppressed, so every request yields all its tokens.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from tfbackend.bench.workloads import LatencyResult, ThroughputResult
from tfbackend.hf_classes import causal_lm_class

PEERS = ("hf-generate", "hf-cb")


def load_hf_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The checkpoint in transformers, with SDPA attention where its class offers it (BLOOM's, Mamba2's
    don't: they run their own)."""
    config = AutoConfig.from_pretrained(model_dir)
    sdpa = getattr(causal_lm_class(config), "_supports_sdpa", False)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map=str(device), attn_implementation="sdpa" if sdpa else None
    )
    return model.eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for one ``generate`` call over ``prompts`` as a left-padded batch."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else 0
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=eos)
    device = model.device
    _sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    _sync(device)
    elapsed = time.perf_counter() - start
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"HF generate produced {out.shape[1] - width} tokens, expected {new_tokens}")
    return elapsed


def hf_generate_throughput(model, prompts: list[list[int]], output_len: int) -> ThroughputResult:
    hf_generate(model, prompts[:2], 4)  # warm-up
    elapsed = hf_generate(model, prompts, output_len)
    return ThroughputResult(elapsed, len(prompts), sum(map(len, prompts)), len(prompts) * output_len)


def hf_generate_latency(model, prompts: list[list[int]], output_len: int) -> LatencyResult:
    """TTFT is a one-token ``generate``; a decode step is the difference to a full one, per extra token."""
    hf_generate(model, prompts, 4)  # warm-up
    ttft = hf_generate(model, prompts, 1)
    total = hf_generate(model, prompts, output_len)
    return LatencyResult(len(prompts), ttft, (total - ttft) / (output_len - 1))


class HFContinuousBatching:
    """A running transformers continuous-batching manager; ``run`` times one batch of requests through it."""

    def __init__(self, model, output_len: int):
        config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None)
        self._context = model.continuous_batching_context_manager(generation_config=config, block=True, timeout=10)
        self.manager = self._context.__enter__()
        self.timestamps = "record_timestamps" in inspect.signature(self.manager.add_request).parameters

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
        """Seconds until every request finished, and the finished results."""
        extra = {"record_timestamps": True} if self.timestamps else {}
        start = time.perf_counter()
        for prompt in prompts:
            self.manager.add_request(prompt, max_new_tokens=new_tokens, **extra)
        results = []
        while len(results) < len(prompts):
            result = self.manager.get_result(timeout=1)
            if result is None:
                if not self.manager.is_running():
                    raise RuntimeError("the continuous batching manager stopped")
            elif result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"continuous batching request failed: {result.error}")
                results.append(result)
        elapsed = time.perf_counter() - start
        produced = sum(len(r.generated_tokens) for r in results)
        if produced != len(prompts) * new_tokens:
            raise RuntimeError(f"continuous batching produced {produced} tokens, expected {len(prompts) * new_tokens}")
        return elapsed, results


def hf_cb_throughput(model, prompts: list[list[int]], output_len: int) -> ThroughputResult:
    cb = HFContinuousBatching(model, output_len)
    try:
        cb.run(prompts[:8], output_len)  # warm-up
        elapsed, _ = cb.run(prompts, output_len)
    finally:
        cb.close()
    return ThroughputResult(elapsed, len(prompts), sum(map(len, prompts)), len(prompts) * output_len)


def hf_cb_latency(model, prompts: list[list[int]], output_len: int) -> LatencyResult:
    """From per-token timestamps when this transformers records them, else the mean time per token."""
    cb = HFContinuousBatching(model, output_len)
    try:
        cb.run(prompts, output_len)  # warm-up at the measured batch size
        elapsed, results = cb.run(prompts, output_len)
    finally:
        cb.close()
    stamps = [r.timestamps for r in results]
    if not cb.timestamps or any(not s or len(s) < output_len for s in stamps):
        return LatencyResult(len(prompts), None, elapsed / output_len)
    ttft = sum(s[0] - r.created_time for s, r in zip(stamps, results)) / len(results)
    step = max(s[-1] for s in stamps) - min(s[0] for s in stamps)
    return LatencyResult(len(prompts), ttft, step / (output_len - 1))
