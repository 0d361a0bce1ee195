"""Greedy runs of a multi-rank engine on CPU, for the parallelism tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tfbackend import LLM, SamplingParams
from tfbackend.kv_cache import KVCacheSpec

NEW_TOKENS = 12
PROMPT_LENGTHS = [5, 13, 30, 2]


def prompts_below(vocab: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def generate(
    model_dir: Path, prompts: list[list[int]], run_ahead: bool = False, **engine_options
) -> tuple[list[list[int]], list[KVCacheSpec]]:
    """Greedy tokens per prompt, and the KV cache layout of every rank (by rank).

    A batch of prompts in 4-token blocks with chunked prefill (24 tokens a step). ``run_ahead``: the engine
    queues each step before the previous one's tokens are known, as on a GPU; the other ranks then receive
    those tokens on the device group.
    """
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=24,
              max_model_len=128, **engine_options)
    try:
        llm.engine.run_ahead = run_ahead
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
        # The startup report times starting the other ranks (their imports, joining) as a phase of its own.
        assert (llm.engine.startup.seconds["start ranks"] > 0) == (llm.engine.executor is not None)
        return [out.outputs[0].token_ids for out in outputs], llm.engine.worker.kv_specs
    finally:
        llm.engine.shutdown()


def compiled_forward_difference(model_dir: Path, model_impl: str, backend: str | None = None) -> float:
    """Run on every rank (``run_spmd``): this rank's share of the model, eager and through
    ``torch.compile(fullgraph=True)`` (a graph break, e.g. at a collective, raises); the largest difference of
    their hidden states for one prefill. ``backend``: torch.compile's; by default the GPU's, Inductor piece by
    piece between the attention calls (generating C++ here)."""
    from tfbackend.engine.piecewise_compile import piecewise_inductor

    model, spec = _load_share(model_dir, model_impl)
    compiled = torch.compile(model.forward, dynamic=True, fullgraph=True, backend=backend or piecewise_inductor)
    return (_prefill_hidden(model.forward, spec) - _prefill_hidden(compiled, spec)).abs().max().item()


def saved_forward_difference(model_dir: Path, model_impl: str) -> float:
    """Run on every rank: this rank's share compiled ahead of time and saved (``aot_compile.py``), then loaded
    as the next start would (on a fresh dynamo), all-reduces included; the largest difference of the loaded
    forward's hidden states from the eager ones."""
    import torch.distributed as dist

    from tfbackend.engine.cuda_graphs import CompiledForward

    model, spec = _load_share(model_dir, model_impl)
    path = Path(model_dir) / "aot" / f"rank{dist.get_rank()}.bin"
    saving = CompiledForward(model, path)
    _prefill_hidden(saving, spec)
    if saving.aot_function is None or saving.aot_loaded:
        raise AssertionError(f"rank {dist.get_rank()} did not compile and save its forward")
    torch._dynamo.reset()
    loaded = CompiledForward(model, path)
    hidden = _prefill_hidden(loaded, spec)
    if not loaded.aot_loaded:
        raise AssertionError(f"rank {dist.get_rank()} did not load its saved forward")
    return (_prefill_hidden(model.forward, spec) - hidden).abs().max().item()


def _load_share(model_dir: Path, model_impl: str):
    from tfbackend.hf_classes import load_hf_config
    from tfbackend.registry import load_model

    model, _ = load_model(model_dir, load_hf_config(model_dir, False), model_impl, torch.float32, torch.device("cpu"))
    return model, KVCacheSpec(tuple(model.attention_layers()), torch.float32, 4)


def _prefill_hidden(forward, spec: KVCacheSpec) -> torch.Tensor:
    """``forward``'s hidden states for an 11-token prefill into a fresh cache."""
    from tfbackend.attention import ForwardContext, forward_context, metadata_for_chunks
    from tfbackend.attention.torch_backend import TorchAttentionBackend
    from tfbackend.kv_cache import KVCache

    block_tables = torch.arange(4, dtype=torch.int32)[None]
    positions, metadata = metadata_for_chunks([0], [11], block_tables, 4)
    context = ForwardContext(metadata, KVCache(spec, 4, torch.device("cpu")), TorchAttentionBackend())
    with torch.inference_mode(), forward_context(context):
        return forward(torch.arange(3, 14), positions)
