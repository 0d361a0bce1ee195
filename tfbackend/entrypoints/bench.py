"""``tfbackend bench throughput|latency``: T1 and T2 on tfbackend and HF peers, against the hardware floor.

    tfbackend bench throughput --random-weights llama-3.2-1b --impl native,transformers --peers hf-generate,hf-cb
    tfbackend bench latency --model PATH --batch-size 1,8,32 --output latency.json --plot latency.png
    tfbackend bench throughput --random-weights llama-3.2-1b --cold     # startup and T1 after a restart, cold and warm
    tfbackend bench throughput --random-weights llama-3.2-1b --tokenizer TOKENIZER_DIR \
        --json-schema benchmarks/structured_output_schema.json      # T1 without and with a grammar on every request

Each implementation in ``--impl`` and each peer runs the same seeded workload on the same weights, one after
the other in this process. The table gives every result and its fraction of the hardware floor (see
``tfbackend.bench.floor``); ``--output`` saves it as JSON and ``--plot`` draws it (if matplotlib is there).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
from pathlib import Path

import torch

from tfbackend.bench import peers as hf_peers
from tfbackend.bench import report
from tfbackend.bench.cold import run_cold_and_warm
from tfbackend.bench.floor import ModelCost, latency_floor, measure_hardware, throughput_floor
from tfbackend.bench.presets import PRESETS, random_checkpoint
from tfbackend.bench.workloads import LatencyWorkload, ThroughputWorkload, run_latency, run_throughput
from tfbackend.config import EngineConfig
from tfbackend.entrypoints.engine_args import add_engine_args, engine_config_from_args
from tfbackend.hf_classes import load_hf_config
from tfbackend.llm import LLM
from tfbackend.model_source import resolve_model
from tfbackend.registry import MODEL_IMPLS
from tfbackend.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}, got {text!r}")
        return items
    return parse


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return values


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark throughput (T1) or latency (T2)", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    scenarios = bench.add_subparsers(dest="scenario", required=True)
    throughput = scenarios.add_parser("throughput", help="T1: many requests at once, tokens per second")
    throughput.add_argument("--num-requests", type=int, default=256)
    throughput.add_argument("--input-len-min", type=int, default=64)
    throughput.add_argument("--input-len-max", type=int, default=512)
    throughput.add_argument("--output-len", type=int, default=256)
    throughput.add_argument("--hf-generate-requests", type=int, default=None,
                            help="run hf-generate on only the first N requests (one padded batch; default: all)")
    throughput.add_argument("--cold", action="store_true",
                            help="run T1 in a fresh process with empty compile caches, then in another with the "
                            "caches it left: startup, first-request latency and compilations after ready")
    throughput.add_argument("--latency-batch-size", type=_int_list, default=None,
                            help="after T1, also T2 at these batch sizes (prompt 128, --output-len outputs, median "
                                 "of 3) on the same engine, which saves a second start of a large model; tfbackend only")
    throughput.add_argument("--json-schema", type=Path, default=None,
                            help="also run each implementation with this JSON schema (a file) as every request's "
                            "structured output; needs a tokenizer (--tokenizer for --random-weights)")
    latency = scenarios.add_parser("latency", help="T2: a small batch, ms per output token and time to first token")
    latency.add_argument("--batch-size", type=_int_list, default=[1], help="e.g. 1,8,32")
    latency.add_argument("--input-len", type=int, default=128)
    latency.add_argument("--output-len", type=int, default=256)
    latency.add_argument("--num-iters", type=int, default=3, help="measured runs per batch size (median)")
    for parser in (throughput, latency):
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--model", help="local HF folder, .gguf file or Hub id")
        source.add_argument("--random-weights", choices=sorted(PRESETS), help="random weights of a real model's shape")
        parser.add_argument("--impl", type=_choices(MODEL_IMPLS), default=None,
                            help="tfbackend implementations to run, e.g. native,transformers (default: --model-impl)")
        parser.add_argument("--peers", type=_choices(hf_peers.PEERS), default=[],
                            help="HF baselines on the same workload: hf-generate,hf-cb")
        parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
        parser.add_argument("--plot", type=Path, default=None, help="draw the results as a PNG (needs matplotlib)")
        add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    if args.output_len < 2:
        raise ValueError("--output-len must be at least 2 (a first token and one decode step)")
    model_dir = random_checkpoint(args.random_weights) if args.random_weights else resolve_model(args.model)
    base = engine_config_from_args(args, model_dir)
    hf_config = load_hf_config(model_dir, base.trust_remote_code)
    device = base.torch_device()
    dtype = base.torch_dtype(hf_config, device)
    vocab_size = hf_config.get_text_config().vocab_size
    print(f"measuring {device} (copy bandwidth, {dtype} matrix product)...")
    hardware = measure_hardware(device, dtype, base.world_size)
    print(f"  {hardware.bandwidth / 1e9:,.0f} GB/s, {hardware.matmul_rate / 1e12:,.1f} TFLOP/s")
    cost = _LazyCost(model_dir, hf_config)
    scenario = _throughput if args.scenario == "throughput" else _latency
    not_run: dict[str, str] = {}  # system (implementation or peer) -> why it could not run this model
    rows, workload = scenario(args, base, model_dir, cost, hardware, vocab_size, dtype, not_run)
    if not any(row["system"].startswith("tfbackend") for row in rows):
        raise ValueError("no implementation could run this model: " + "; ".join(f"{k}: {v}" for k, v in not_run.items()))

    doc = report.document(
        rows,
        hardware=dataclasses.asdict(hardware),
        model={"name": args.random_weights or str(args.model), "path": str(model_dir), "dtype": str(dtype),
               **dataclasses.asdict(cost.value)},
        workload={"scenario": args.scenario, **dataclasses.asdict(workload),
                  **({"latency": dataclasses.asdict(trailing)} if (trailing := _trailing_latency(args)) else {})},
        engine={k: v for k, v in dataclasses.asdict(base).items() if k not in ("model", "tokenizer", "model_impl")},
        not_run=not_run,
    )
    if args.output is not None:
        report.write_json(doc, args.output)
        print(f"results written to {args.output}")
    if args.plot is not None:
        print(report.plot(doc, args.plot))
    print(f"\n{args.scenario} on {hardware.device}, {doc['model']['name']} ({dtype}):")
    print(report.format_table(rows))
    for name, reason in not_run.items():
        print(f"{name}: did not run ({reason})")
    return 0


class _LazyCost:
    """The model's cost for the floors, known once the first engine has declared its KV layout (engines run
    before the HF peers, so every floor is computed after that)."""

    def __init__(self, model_dir: Path, hf_config):
        self.model_dir, self.hf_config = model_dir, hf_config
        self._value: ModelCost | None = None

    def learn(self, llm: LLM) -> None:
        worker = llm.engine.worker
        self.learn_specs(worker.kv_specs, worker.weight_bytes, llm.engine.config.tensor_parallel_size)

    def learn_specs(self, kv_specs, weight_bytes: int, tensor_parallel_size: int) -> None:
        if self._value is None:
            self._value = ModelCost.from_checkpoint(
                self.model_dir, self.hf_config, kv_specs, weight_bytes, tensor_parallel_size
            )

    @property
    def value(self) -> ModelCost:
        if self._value is None:
            raise RuntimeError("the model cost is known only after an engine has loaded the model")
        return self._value


def _throughput(args, base: EngineConfig, model_dir: Path, cost: _LazyCost, hardware, vocab_size: int, dtype,
                not_run: dict[str, str]):
    workload = ThroughputWorkload(args.num_requests, args.input_len_min, args.input_len_max, args.output_len, args.seed)
    if not 1 <= workload.input_min <= workload.input_max:
        raise ValueError("need 1 <= --input-len-min <= --input-len-max")
    prompts = workload.prompts(vocab_size)

    def floor(subset: list[list[int]]) -> float:
        return throughput_floor(cost.value, hardware, [len(p) for p in subset], workload.output_len,
                                base.max_num_seqs, base.max_num_batched_tokens)

    structured = _json_schema(args.json_schema)
    latency = _trailing_latency(args)
    if args.cold:
        if args.peers or structured is not None or latency is not None:
            raise ValueError("--cold runs tfbackend's T1 alone, without --peers, --json-schema or --latency-batch-size")
        rows = []
        impls = args.impl or [base.model_impl]
        for impl in impls:
            config = dataclasses.replace(base, model_impl=impl)
            print(f"{impl}: T1 in a fresh process with empty compile caches, then in one with warm caches...")
            try:
                runs = run_cold_and_warm(config, workload, vocab_size)
            except RuntimeError as exc:  # as _run_all: one implementation that cannot run loses no other result
                if len(impls) == 1:
                    raise
                not_run[f"tfbackend[{impl}]"] = str(exc).splitlines()[0][:200]
                continue
            for run in runs:
                cost.learn_specs(run.kv_specs, run.weight_bytes, config.tensor_parallel_size)
                rows.append(report.cold_row(f"tfbackend[{run.model_impl}]", run, floor(prompts)))
        return rows, workload

    def on_engine(llm: LLM, system: str) -> list[dict]:
        cost.learn(llm)
        print(f"{system}: {workload.num_requests} requests...")
        rows = [report.throughput_row(system, run_throughput(llm, workload, vocab_size), floor(prompts))]
        if structured is not None:
            print(f"{system}: {workload.num_requests} requests, each with the JSON schema...")
            result = run_throughput(llm, workload, vocab_size, structured)
            overhead = rows[0]["output_tok_s"] / result.output_tok_s - 1
            rows.append(report.throughput_row(f"{system} json-schema", result, floor(prompts),
                                              f"{overhead:+.1%} time per output token vs none"))
        if latency is not None:
            rows += _latency_rows(llm, system, latency, cost.value, hardware, vocab_size)
        return rows

    def on_hf_model(model) -> list[dict]:
        rows = []
        if "hf-generate" in args.peers:
            subset = prompts[: args.hf_generate_requests or len(prompts)]
            print(f"hf-generate: {len(subset)} requests as one padded batch...")
            result = _peer_run("hf-generate", not_run, hf_peers.hf_generate_throughput, model, subset,
                               workload.output_len)
            note = f"first {len(subset)} of {len(prompts)} requests" if len(subset) < len(prompts) else ""
            if result is not None:
                rows.append(report.throughput_row("hf-generate", result, floor(subset), note))
        if "hf-cb" in args.peers:
            print(f"hf-cb: {len(prompts)} requests...")
            result = _peer_run("hf-cb", not_run, hf_peers.hf_cb_throughput, model, prompts, workload.output_len)
            if result is not None:
                rows.append(report.throughput_row("hf-cb", result, floor(prompts)))
        return rows

    return _run_all(args, base, model_dir, dtype, on_engine, on_hf_model, not_run), workload


def _trailing_latency(args) -> LatencyWorkload | None:
    """T2 on each T1 engine (``--latency-batch-size``): ``bench latency``'s default prompt, T1's output length."""
    batch_sizes = getattr(args, "latency_batch_size", None)
    return LatencyWorkload(batch_sizes, 128, args.output_len, 3, args.seed) if batch_sizes else None


def _json_schema(path: Path | None) -> StructuredOutputsParams | None:
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--json-schema {path}: {exc}") from exc
    return StructuredOutputsParams(json=schema)


def _latency(args, base: EngineConfig, model_dir: Path, cost: _LazyCost, hardware, vocab_size: int, dtype,
             not_run: dict[str, str]):
    workload = LatencyWorkload(args.batch_size, args.input_len, args.output_len, args.num_iters, args.seed)

    def row(system: str, result) -> dict:
        return _latency_row(system, result, workload, cost.value, hardware)

    def on_engine(llm: LLM, system: str) -> list[dict]:
        cost.learn(llm)
        return _latency_rows(llm, system, workload, cost.value, hardware, vocab_size)

    def on_hf_model(model) -> list[dict]:
        peer_runs = {"hf-generate": hf_peers.hf_generate_latency, "hf-cb": hf_peers.hf_cb_latency}
        rows = []
        for peer in args.peers:
            for batch_size in workload.batch_sizes:
                print(f"{peer}: batch size {batch_size}...")
                prompts = workload.prompts(batch_size, vocab_size, 0)
                result = _peer_run(peer, not_run, peer_runs[peer], model, prompts, workload.output_len)
                if result is None:
                    break
                rows.append(row(peer, result))
        return rows

    return _run_all(args, base, model_dir, dtype, on_engine, on_hf_model, not_run), workload


def _latency_rows(llm: LLM, system: str, workload: LatencyWorkload, cost: ModelCost, hardware,
                  vocab_size: int) -> list[dict]:
    print(f"{system}: batch sizes {workload.batch_sizes}...")
    return [_latency_row(system, result, workload, cost, hardware)
            for result in run_latency(llm, workload, vocab_size)]


def _latency_row(system: str, result, workload: LatencyWorkload, cost: ModelCost, hardware) -> dict:
    return report.latency_row(system, result, *latency_floor(cost, hardware, result.batch_size,
                                                             workload.input_len, workload.output_len))


def _peer_run(name: str, not_run: dict[str, str], fn, *args):
    """A peer's result, or None when transformers cannot run this model that way (hf-cb needs attention
    layers it can page, for instance): ``not_run`` records why, and the comparison says so instead of failing."""
    try:
        return fn(*args)
    except Exception as exc:  # whatever transformers raises on a model it does not support
        _record_not_run(name, f"{type(exc).__name__}: {exc}", not_run)
        return None


def _record_not_run(name: str, reason: str, not_run: dict[str, str]) -> None:
    """Say (and keep, for the table and the JSON) why ``name`` could not run the model; free what it held."""
    reason = reason.splitlines()[0][:200]
    print(f"{name} does not run this model: {reason}")
    not_run[name] = reason
    _free_gpu_memory()


def _run_all(args, base: EngineConfig, model_dir: Path, dtype, on_engine, on_hf_model,
             not_run: dict[str, str]) -> list[dict]:
    """Each implementation, then the peers on one shared HF model; one model in GPU memory at a time. An
    implementation that declines the model (a ValueError at load) is reported like a peer that cannot run it,
    so the others' results still come out; with a single implementation the error stands."""
    rows = []
    impls = args.impl or [base.model_impl]
    if base.world_size > 1 and len(impls) > 1 and base.torch_device().type == "cuda":
        logger.warning("%s run in one process: the engines after the first do their all-reduces through NCCL only "
                       "(torch sets up a group's peer memory once per process); run one --impl per bench to "
                       "compare them on equal terms", ", ".join(impls))
    for impl in impls:
        try:
            rows += _with_engine(dataclasses.replace(base, model_impl=impl), on_engine)
        except ValueError as exc:
            if len(impls) == 1:
                raise
            _record_not_run(f"tfbackend[{impl}]", str(exc), not_run)
    if args.peers:
        model = hf_peers.load_hf_model(model_dir, dtype, base.torch_device())
        rows += on_hf_model(model)
        del model
        _free_gpu_memory()
    return rows


def _with_engine(config: EngineConfig, fn) -> list[dict]:
    llm = LLM(config=config)
    try:
        # Quantized and parallel runs say so in their name; every row notes how many tokens its KV cache held.
        variant = "".join(f", {label}" for label in (
            config.quantization, f"kv {config.kv_cache_dtype}" if config.kv_cache_dtype != "auto" else None,
        ) if label)
        split = "".join(f" {name}={size}" for name, size in (("tp", config.tensor_parallel_size),
                                                              ("pp", config.pipeline_parallel_size)) if size > 1)
        name = f"tfbackend[{llm.model_impl}{variant}]{split}"
        kv_tokens = llm.engine.stats().kv_capacity_tokens
        print(f"{name}: KV cache of {kv_tokens:,} tokens ({llm.engine.kv_cache.spec.dtype}), "
              f"weights {llm.engine.worker.weight_bytes / 2**30:.2f} GiB")
        rows = fn(llm, name)
        stats = llm.engine.stats()
        for row in rows:
            row["kv_capacity_tokens"] = kv_tokens
            row["note"] = "; ".join(part for part in (row.get("note"), f"KV {kv_tokens:,} tokens") if part)
            row["startup_s"] = stats.startup_seconds["total"]
            row["compilations_after_ready"] = stats.compilations_after_ready.total
        return rows
    finally:
        llm.engine.shutdown()  # the next engine may need the same GPUs (and this process's process group)
        del llm
        _free_gpu_memory()


def _free_gpu_memory() -> None:
    """Collect the dropped engine or model (reference cycles included) and return its cached GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
