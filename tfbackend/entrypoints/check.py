"""``tfbackend check MODEL``: do two implementations of a model agree on the same weights?

Each implementation (by default the native port, then the Transformers fallback) is loaded in turn and
decodes the same prompts greedily, driven step by step through a paged KV cache: one prefill step for
all prompts together, then one decode step per token. We compare the logits of every prefill token and
of every decode step whose inputs still agree, and the greedy tokens. Exit status 0 when everything
agrees within ``--atol``, 1 otherwise.

``--vs-unquantized IMPL`` compares one implementation quantized (the checkpoint's format, or
``--quantization fp8``, and ``--kv-cache-dtype``) against the same implementation with those weights
dequantized and a model-dtype KV cache: the error quantization adds. It reports the logit error and greedy
agreement; exit status 1 only when ``--atol`` is given and exceeded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from tfbackend.attention import (
    AttentionBackend,
    ForwardContext,
    forward_context,
    get_attention_backend,
    metadata_for_chunks,
)
from tfbackend.config import DTYPES, KV_CACHE_DTYPES
from tfbackend.distributed import current_parallel
from tfbackend.distributed.launch import run_spmd
from tfbackend.distributed.rendezvous import Rendezvous, free_port
from tfbackend.engine.model_files import load_tokenizer
from tfbackend.hf_classes import load_hf_config
from tfbackend.kv_cache import KVCache, KVCacheSpec
from tfbackend.native.weights import safetensors_files
from tfbackend.quantization.config import QUANTIZATION_METHODS, QuantizationMethod, quantization_method
from tfbackend.quantization.kv_cache import kv_cache_torch_dtype, read_kv_cache_scales
from tfbackend.quantization.loading import dequantize_linears
from tfbackend.registry import MODEL_IMPLS, load_model

DEFAULT_PROMPT_LENGTHS = (5, 12, 23)  # random token ids: short, one block and a bit, several blocks


@dataclass
class GreedyRun:
    prefill_logits: list[torch.Tensor]  # per prompt [prompt_len, V], float32 on the CPU
    decode_logits: torch.Tensor  # [max_tokens - 1, B, V]: step i reads token i and predicts token i + 1
    tokens: torch.Tensor  # [B, max_tokens] greedy tokens


@dataclass
class Comparison:
    prefill_max_diff: float
    prefill_rows_compared: int
    decode_max_diff: float
    decode_steps_compared: int
    first_divergence: list[int | None]  # per prompt: index of the first differing token
    atol: float

    @property
    def ok(self) -> bool:
        tokens_agree = all(index is None for index in self.first_divergence)
        return tokens_agree and self.prefill_max_diff <= self.atol and self.decode_max_diff <= self.atol


def forward_step(
    model: torch.nn.Module,
    cache: KVCache,
    backend: AttentionBackend,
    block_tables: torch.Tensor,
    chunks: list[list[int]],
    starts: list[int],
) -> torch.Tensor:
    """One model step: sequence b appends ``chunks[b]`` at positions ``starts[b]...``; returns their logits."""
    positions, metadata = metadata_for_chunks(starts, [len(c) for c in chunks], block_tables, cache.spec.block_size)
    input_ids = torch.tensor([token for chunk in chunks for token in chunk], device=block_tables.device)
    with forward_context(ForwardContext(metadata, cache, backend)):
        hidden = model(input_ids, positions)
    return model.compute_logits(hidden)


@torch.inference_mode()
def run_greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int = 16,
    kv_cache_dtype: torch.dtype | None = None,
    kv_scales: list[tuple[float, float]] | None = None,
) -> GreedyRun:
    """Greedy-decode ``max_tokens`` tokens for every prompt, batched, recording all logits (the KV cache in
    ``kv_cache_dtype``, default ``dtype``, with per-layer ``kv_scales`` for an FP8 one)."""
    blocks_per_seq = -(-(max(map(len, prompts)) + max_tokens) // block_size)
    spec = KVCacheSpec(tuple(model.attention_layers()), kv_cache_dtype or dtype, block_size)
    cache = KVCache(spec, len(prompts) * blocks_per_seq, device)
    if kv_scales is not None:
        cache.set_scales(kv_scales)
    block_tables = torch.arange(cache.num_blocks, dtype=torch.int32, device=device).view(len(prompts), -1)
    backend = get_attention_backend("auto", device)

    lengths = [len(prompt) for prompt in prompts]
    logits = forward_step(model, cache, backend, block_tables, prompts, [0] * len(prompts))
    prefill_logits = list(logits.float().cpu().split(lengths))
    next_tokens = torch.stack([rows[-1] for rows in prefill_logits]).argmax(-1)
    tokens, decode_logits = [next_tokens], []
    for step in range(max_tokens - 1):
        starts = [length + step for length in lengths]
        chunks = [[token] for token in next_tokens.tolist()]
        logits = forward_step(model, cache, backend, block_tables, chunks, starts).float().cpu()
        next_tokens = logits.argmax(-1)
        tokens.append(next_tokens)
        decode_logits.append(logits)
    vocab = prefill_logits[0].shape[-1]
    decode = torch.stack(decode_logits) if decode_logits else torch.empty(0, len(prompts), vocab)
    return GreedyRun(prefill_logits, decode, torch.stack(tokens, dim=1))


def compare(a: GreedyRun, b: GreedyRun, atol: float) -> Comparison:
    # Rows an implementation does not compute (NaN: the compat tier has logits only for a prompt's last token)
    # are left out; every prompt's last row is always there.
    prefill, prefill_rows = 0.0, 0
    for x, y in zip(a.prefill_logits, b.prefill_logits):
        rows = x.isfinite().all(-1) & y.isfinite().all(-1)
        prefill = max(prefill, (x[rows] - y[rows]).abs().max().item())
        prefill_rows += int(rows.sum())
    first_divergence: list[int | None] = []
    decode, compared = 0.0, 0
    for seq, (tokens_a, tokens_b) in enumerate(zip(a.tokens.tolist(), b.tokens.tolist())):
        diverged = next((i for i, (x, y) in enumerate(zip(tokens_a, tokens_b)) if x != y), None)
        first_divergence.append(diverged)
        # Decode step i reads token i: its inputs are the same in both runs only up to the first divergence.
        steps = a.decode_logits.shape[0] if diverged is None else min(diverged, a.decode_logits.shape[0])
        if steps:
            decode = max(decode, (a.decode_logits[:steps, seq] - b.decode_logits[:steps, seq]).abs().max().item())
            compared += steps
    return Comparison(prefill, prefill_rows, decode, compared, first_divergence, atol)


@dataclass
class LogitError:
    """How far one run's prefill logits are from another's, beyond the max difference ``Comparison`` gives."""

    relative_rms: float  # RMS of the difference / RMS of the reference logits
    top1_agreement: float  # fraction of prompt positions whose argmax agrees
    positions: int


def logit_error(run: GreedyRun, reference: GreedyRun) -> LogitError:
    """Over the prompt rows both runs computed (as ``compare``, it skips rows an implementation leaves NaN)."""
    pairs = [(a[rows], b[rows]) for a, b in zip(run.prefill_logits, reference.prefill_logits)
             for rows in [a.isfinite().all(-1) & b.isfinite().all(-1)]]
    diff = torch.cat([(a - b).flatten() for a, b in pairs])
    scale = torch.cat([b.flatten() for _, b in pairs])
    agree = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in pairs])
    return LogitError((diff.norm() / scale.norm()).item(), agree.float().mean().item(), agree.numel())


def _impl_pair(text: str) -> list[str]:
    impls = [impl.strip() for impl in text.split(",")]
    if len(impls) != 2 or any(impl not in MODEL_IMPLS for impl in impls):
        raise argparse.ArgumentTypeError(f"expected two of {MODEL_IMPLS} separated by a comma, got {text!r}")
    return impls


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check that two implementations of a model agree (logits and greedy tokens)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="local HF folder, .gguf file or Hub id")
    parser.add_argument("--model-impl", type=_impl_pair, default=["native", "transformers"],
                        help="the two implementations to compare (default: native,transformers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--prompts", nargs="+", default=None,
                        help="text prompts, tokenized with the model's tokenizer (default: random token ids)")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--atol", type=float, default=None,
                        help="largest |Δlogits| still counted as a match (default 1e-4; none with --vs-unquantized)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the default random prompts")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the modeling code a checkpoint ships (config.json auto_map)")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                        help="split each implementation over this many ranks, one process each (GPUs cuda:0...)")
    parser.add_argument("--quantization", choices=QUANTIZATION_METHODS, default=None,
                        help="load quantized: fp8 quantizes a dense checkpoint; default the checkpoint's own format")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="KV cache of the (quantized) runs: auto (the model dtype) or fp8")
    parser.add_argument("--vs-unquantized", choices=MODEL_IMPLS, default=None, metavar="IMPL",
                        help="instead of two implementations, compare IMPL quantized against IMPL with the same "
                             "weights dequantized and a model-dtype KV cache")


def _prompt_token_ids(args: argparse.Namespace, model_dir, hf_config) -> list[list[int]]:
    if args.prompts is None:
        generator = torch.Generator().manual_seed(args.seed)
        vocab_size = hf_config.get_text_config().vocab_size
        return [torch.randint(vocab_size, (n,), generator=generator).tolist() for n in DEFAULT_PROMPT_LENGTHS]
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer, so --prompts cannot be encoded; omit it to use random ids")
    prompts = [tokenizer(prompt)["input_ids"] for prompt in args.prompts]
    if not all(prompts):
        raise ValueError("every prompt must encode to at least one token")
    return prompts


@dataclass
class RunSetup:
    """What every run of one ``check`` shares."""

    model_dir: Path
    prompts: list[list[int]]
    max_tokens: int
    dtype: torch.dtype
    device: torch.device
    trust_remote_code: bool
    quantization: str | None  # --quantization
    method: QuantizationMethod | None  # what loading quantizes (checkpoint format or --quantization)
    kv_dtype: torch.dtype
    kv_scales: list[tuple[float, float]] | None


@dataclass(frozen=True)
class RunSpec:
    """One run of a ``check``: an implementation, its label, and whether it is the unquantized twin."""

    impl: str
    label: str
    unquantized: bool = False


def greedy_runs(setup: RunSetup, specs: list[RunSpec]) -> list[GreedyRun]:
    """``greedy_run`` of each spec in turn, one model in memory at a time. Under tensor parallelism every rank
    runs this on its share of the model (logits are gathered, so all ranks decode alike)."""
    return [greedy_run(setup, spec) for spec in specs]


def greedy_run(setup: RunSetup, spec: RunSpec) -> GreedyRun:
    """Load ``spec.impl`` and decode. ``spec.unquantized``: the twin without quantization, i.e. a quantized
    checkpoint's weights dequantized, or for ``--quantization fp8`` on a dense checkpoint the checkpoint itself,
    with a model-dtype KV cache."""
    parallel = current_parallel()
    device = parallel.device or setup.device
    report = print if parallel.is_driver else (lambda _: None)
    hf_config = load_hf_config(setup.model_dir, setup.trust_remote_code)  # fresh: HF loading may annotate it
    online = setup.method is not None and setup.method.online
    quantization = setup.quantization if not (spec.unquantized and online) else None
    model, resolved = load_model(setup.model_dir, hf_config, spec.impl, setup.dtype, device, quantization)
    name = f"{resolved.model_class.__module__}.{resolved.model_class.__qualname__}"
    if spec.unquantized:
        weights = "the checkpoint's dense weights" if online or setup.method is None else \
            f"{dequantize_linears(model)} linear layers dequantized"
        report(f"{spec.label}: {name}, {weights}, KV cache {setup.dtype}")
        return run_greedy(model, setup.prompts, setup.max_tokens, setup.dtype, device)
    what = setup.method.describe() if setup.method is not None else "unquantized weights"
    report(f"{spec.label}: {name} ({resolved.reason}); {what}; KV cache {setup.kv_dtype}")
    return run_greedy(model, setup.prompts, setup.max_tokens, setup.dtype, device,
                      kv_cache_dtype=setup.kv_dtype, kv_scales=setup.kv_scales)


def run(args: argparse.Namespace) -> int:
    from tfbackend.model_source import resolve_model

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    model_dir = resolve_model(args.model)
    hf_config = load_hf_config(model_dir, args.trust_remote_code)
    dtype = DTYPES[args.dtype]
    kv_dtype = kv_cache_torch_dtype(args.kv_cache_dtype, dtype)
    method = quantization_method(hf_config, args.quantization)
    if args.vs_unquantized and method is None and kv_dtype == dtype:
        raise ValueError("--vs-unquantized: nothing is quantized (the checkpoint has no quantization_config); "
                         "pass --quantization fp8 and/or --kv-cache-dtype fp8")
    num_layers = hf_config.get_text_config().num_hidden_layers
    setup = RunSetup(
        model_dir, _prompt_token_ids(args, model_dir, hf_config), args.max_tokens, dtype, torch.device(args.device),
        args.trust_remote_code, args.quantization, method, kv_dtype,
        read_kv_cache_scales(safetensors_files(model_dir), num_layers) if kv_dtype != dtype else None,
    )
    if args.vs_unquantized:
        specs = [RunSpec(args.vs_unquantized, "quantized"), RunSpec(args.vs_unquantized, "unquantized", True)]
    else:
        specs = [RunSpec(impl, impl) for impl in args.model_impl]
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be positive, got {args.tensor_parallel_size}")
    if args.tensor_parallel_size == 1:
        runs = greedy_runs(setup, specs)
    else:
        rendezvous = Rendezvous("127.0.0.1", free_port(), args.tensor_parallel_size, 1, 1, setup.device.type)
        rendezvous.check_devices()
        runs = run_spmd(greedy_runs, (setup, specs), rendezvous)
    atol = args.atol if args.atol is not None else (None if args.vs_unquantized else 1e-4)
    return _report(runs, setup, args, atol)


def _report(runs: list[GreedyRun], setup: RunSetup, args: argparse.Namespace, atol: float | None) -> int:
    result = compare(runs[0], runs[1], atol if atol is not None else float("inf"))
    prompts = setup.prompts
    print(f"prompts: {len(prompts)} ({sum(map(len, prompts))} tokens), {args.max_tokens} greedy tokens each, "
          f"{args.dtype}")
    print(f"prefill: max |Δlogits| = {result.prefill_max_diff:.3e} over {result.prefill_rows_compared} tokens")
    if args.vs_unquantized:
        error = logit_error(runs[0], runs[1])
        print(f"         relative RMS error {100 * error.relative_rms:.2f}%, top-1 agreement "
              f"{100 * error.top1_agreement:.1f}% of {error.positions} positions")
    print(f"decode:  max |Δlogits| = {result.decode_max_diff:.3e} over {result.decode_steps_compared} steps")
    diverged = {seq: index for seq, index in enumerate(result.first_divergence) if index is not None}
    details = "".join(f"; prompt {seq} diverges at token {index}" for seq, index in diverged.items())
    print(f"greedy:  {len(prompts) - len(diverged)}/{len(prompts)} prompts identical{details}")
    if atol is None:
        return 0
    print(f"verdict: {'MATCH' if result.ok else 'MISMATCH'} (atol {atol:g})")
    return 0 if result.ok else 1
