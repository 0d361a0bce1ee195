"""Engine flags shared by every sub-command that builds an LLMEngine, named as in ``vllm serve``.

One place defines them so ``serve``, ``generate`` and ``bench`` accept the same spelling and defaults.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tfbackend.config import DTYPES, KV_CACHE_DTYPES, EngineConfig
from tfbackend.quantization.config import QUANTIZATION_METHODS
from tfbackend.registry import MODEL_IMPLS

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_EXPONENTS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def human_int(text: str) -> int:
    """Parse ``4096``, ``32k``, ``1.5G`` (powers of 1000) or ``512MiB``/``2Gi`` (powers of 1024), as vLLM does.

    Sizes like the KV cache budget are easier to type and read with a suffix than as raw byte counts.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected an integer with an optional k/M/G/T or Ki/Mi/Gi/Ti suffix, got {text!r}"
        )
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    value = float(number) * base ** _EXPONENTS[prefix.lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


_DTYPE_ALIASES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}


def _dtype(text: str) -> str:
    """vLLM's spellings of the dtypes (``--dtype half``) mapped to ours."""
    return _DTYPE_ALIASES.get(text, text)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add the EngineConfig flags; defaults come from EngineConfig so there is one source of truth."""
    defaults = EngineConfig(model="")
    group = parser.add_argument_group("engine")
    add = group.add_argument
    add("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    add("--model-impl", choices=MODEL_IMPLS, default=defaults.model_impl,
        help="native port, Transformers fallback, or auto (native when one is registered for the architecture)")
    add("--dtype", type=_dtype, choices=["auto", *DTYPES], default=defaults.dtype,
        help="auto: float32 on CPU, the checkpoint's half precision on GPU; vLLM's half, bf16 and float work too")
    add("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    add("--attention-backend", choices=["auto", "triton", "torch"], default=defaults.attention_backend,
        help="attention kernels: auto picks Triton on GPU, the torch reference on CPU")
    add("--block-size", type=int, default=defaults.block_size, help="tokens per KV cache block")
    add("--max-model-len", type=human_int, default=defaults.max_model_len,
        help="context length, prompt plus output, e.g. 4k (default: the model's max_position_embeddings)")
    add("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="most sequences in one batch")
    add("--max-num-batched-tokens", type=human_int, default=defaults.max_num_batched_tokens,
        help="most tokens fed to the model in one step")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=defaults.enable_prefix_caching,
        help="reuse the KV blocks of shared prompt prefixes")
    add("--kv-cache-memory", type=human_int, default=defaults.kv_cache_memory,
        help="KV cache size in bytes, e.g. 512MiB (default: 1GiB on CPU; on GPU what --gpu-memory-utilization leaves)")
    add("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
        help="fraction of GPU memory the engine may use: weights, activations and KV cache")
    add("--quantization", "-q", choices=QUANTIZATION_METHODS, default=defaults.quantization,
        help="fp8: quantize a bf16/fp32 checkpoint's linear layers at load; a format name insists the checkpoint "
             "is in it (default: the checkpoint's own quantization_config)")
    add("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=defaults.kv_cache_dtype,
        help="auto: the model dtype; fp8: E4M3 with per-layer scales (from the checkpoint, else 1.0)")
    add("--enforce-eager", action="store_true",
        help="start without compiling: no torch.compile, no warm-up, no CUDA graphs (slower steps, faster start)")
    add("--seed", type=int, default=defaults.seed, help="seed for requests that set none")
    add("--trust-remote-code", action="store_true",
        help="run the modeling code a checkpoint ships (config.json auto_map); only for checkpoints you trust")
    parallel = parser.add_argument_group("parallelism (one process per rank; see docs/architecture.md)")
    add = parallel.add_argument
    add("-tp", "--tensor-parallel-size", type=int, default=defaults.tensor_parallel_size,
        help="split every layer over this many GPUs (heads, MLP features and vocabulary)")
    add("-pp", "--pipeline-parallel-size", type=int, default=defaults.pipeline_parallel_size,
        help="split the layers into this many stages, for spanning nodes")
    add("--nnodes", type=int, default=defaults.nnodes, help="nodes sharing the ranks evenly")
    add("--node-rank", type=int, default=defaults.node_rank,
        help="this node's index: 0 runs the engine, others run only workers (with --headless)")
    add("--master-addr", default=defaults.master_addr, help="address of node 0, where the ranks meet")
    add("--master-port", type=int, default=defaults.master_port,
        help="port on node 0 where the ranks meet (default on one node: any free port)")


def engine_config_from_args(args: argparse.Namespace, model_path: str | Path) -> EngineConfig:
    """Build and validate the EngineConfig for an already resolved local model folder."""
    config = EngineConfig(
        model=str(model_path),
        tokenizer=args.tokenizer,
        model_impl=args.model_impl,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    config.validate()
    return config
