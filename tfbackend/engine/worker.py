"""What every rank of an engine holds, and the loop that the ranks other than the driver run.

``Worker`` builds one rank's share of the engine: the model (this rank's weights, heads and layers), the
attention backend, the KV cache, the runner and its CUDA graphs. The KV cache gets what this rank can spare,
and the smallest budget of all ranks decides for all of them, so that a block id means the same on every rank.
The driver's ``LLMEngine`` builds its worker with the sampler; every other rank builds one in ``run_worker``
and then runs the steps the driver broadcasts until told to stop. Building runs the same collectives in the
same order on every rank (the model's load checks, the profiled largest step, the graph captures), which
keeps the ranks in step without any message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from tfbackend.attention import get_attention_backend
from tfbackend.config import EngineConfig
from tfbackend.distributed import ParallelContext, use_parallel
from tfbackend.distributed.launch import dump_stacks_on_signal, report_failure
from tfbackend.distributed.pipeline import StageLinks
from tfbackend.distributed.rendezvous import (
    CONFIG_KEY,
    Rendezvous,
    close_process_groups,
    connect_store,
    init_rank,
    joined_key,
)
from tfbackend.engine.compile_cache import aot_artifact_path, aot_cache_dir, configure_compile_cache
from tfbackend.engine.cuda_graphs import GRAPH_SAFE_BACKENDS, CompiledForward
from tfbackend.engine.memory import kv_cache_budget, plan_cache
from tfbackend.engine.model_files import max_model_len
from tfbackend.engine.model_runner import ModelRunner, StepInputs
from tfbackend.engine.piecewise_compile import start_compile_workers
from tfbackend.engine.sampler import Sampler
from tfbackend.engine.startup import StartupReport, freeze_startup_objects, paused_gc
from tfbackend.engine.step_broadcast import StepBroadcast
from tfbackend.engine.warmup import SequenceShape, first_steps, run_warmup, warmup_shapes
from tfbackend.hf_classes import load_hf_config
from tfbackend.kernels.launch import can_compile_ahead
from tfbackend.kv_cache import KVCache, KVCacheSpec
from tfbackend.model_source import default_cache_dir
from tfbackend.native.weights import safetensors_files
from tfbackend.quantization.kv_cache import kv_cache_torch_dtype, read_kv_cache_scales
from tfbackend.quantization.linear import loaded_weight_bytes
from tfbackend.registry import load_model

logger = logging.getLogger(__name__)

# Where the model is compiled: on a CPU, Inductor's C++ compilation would cost more startup than it saves.
COMPILE_DEVICE_TYPES = ("cuda",)
# The step that compiles the model at startup: with dynamic shapes its graph serves every larger step too.
COMPILE_STEP_TOKENS = 64


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        model_dir: str | Path,
        hf_config,
        parallel: ParallelContext,
        sampler: Sampler | None = None,
        send_step: Callable[[StepInputs, torch.Tensor | None], None] | None = None,
        startup: StartupReport | None = None,
    ):
        """``sampler`` and ``send_step``: the driver's (it samples and hands each step to the other ranks).
        ``startup``: where the phases are timed (the driver's engine passes its report)."""
        self.config = config
        self.parallel = parallel
        self.startup = startup or StartupReport()
        configure_compile_cache(default_cache_dir())  # before anything compiles
        self.device = parallel.device or config.torch_device()
        self.dtype = config.torch_dtype(hf_config, self.device)
        self.max_model_len = max_model_len(hf_config, config.max_model_len)
        torch.manual_seed(config.seed)
        if self.device.type == "cuda":
            with self.startup.phase("init device"):  # the CUDA context: the first kernel creates it
                torch.zeros(1, device=self.device).cpu()
        else:
            self.startup.skip("init device", f"no context to create on {self.device.type}")
        with self.startup.phase("load weights"), use_parallel(parallel):
            self.model, resolved = load_model(
                model_dir, hf_config, config.model_impl, self.dtype, self.device, config.quantization
            )
        self.model_impl, self.model_impl_reason = resolved.model_impl, resolved.reason
        self.attention_backend = get_attention_backend(config.attention_backend, self.device)
        self.use_cuda_graphs = self._use_cuda_graphs()
        self.forward = CompiledForward(self.model, self._aot_path(hf_config)) if self._use_compile() else self.model
        if isinstance(self.forward, CompiledForward) and self.forward.compiles_with_inductor():
            start_compile_workers(self.device, parallel.local_size)  # they start while the compile phase traces
        self.stages = None
        if parallel.pp_size > 1:
            vocab_size = hf_config.get_text_config().vocab_size
            self.stages = StageLinks(parallel, self.model.pipeline_intermediates(), self.dtype, self.device, vocab_size)
        cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        spec = KVCacheSpec(tuple(self.model.attention_layers()), cache_dtype, config.block_size)
        if cache_dtype != self.dtype and not spec.layers:
            raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} sets the paged KV cache's dtype, but the "
                             f"{self.model_impl} implementation keeps its own caches")
        # A model that cannot resume a prefill needs a step budget that holds the longest prompt.
        self.max_batched_tokens = config.max_num_batched_tokens
        if not self.model.supports_chunked_prefill:
            self.max_batched_tokens = max(self.max_batched_tokens, self.max_model_len)
        if isinstance(self.forward, CompiledForward):
            with self.startup.phase("compile"):  # dynamic shapes: one small step compiles every size
                self._profile_run(spec, sampler, min(self.max_batched_tokens, COMPILE_STEP_TOKENS))
        else:
            self.startup.skip("compile", self._eager_reason())
        with self.startup.phase("profile memory"):
            plan = plan_cache(config, spec, self.model.sequence_state(), self.max_model_len,
                              lambda full_batch_bytes: self._budget(spec, sampler, full_batch_bytes))
        self.max_num_seqs = plan.max_num_seqs
        self.kv_cache = KVCache(spec, plan.num_blocks, self.device)
        if cache_dtype != self.dtype:  # FP8: the checkpoint's per-layer scales, if it has them
            self.kv_cache.set_scales(read_kv_cache_scales(safetensors_files(model_dir), spec.num_layers))
        self.kv_specs = parallel.gather_objects(spec)  # every rank's layout, for the whole model's costs
        self.weight_bytes = sum(parallel.gather_objects(loaded_weight_bytes(self.model)))  # all ranks'
        logger.info(
            "KV cache%s: %d blocks of %d tokens = %d tokens (%.1f MiB, %s), at most %d sequences",
            f" of rank {parallel.rank}" if parallel.world_size > 1 else "", plan.num_blocks, spec.block_size,
            plan.num_blocks * spec.block_size,
            self.kv_cache.storage.numel() * self.kv_cache.storage.element_size() / 2**20, cache_dtype,
            plan.max_num_seqs,
        )
        self.runner = ModelRunner(
            self.model, self.kv_cache, self.attention_backend, sampler, self.device, self.forward, parallel,
            self.stages, send_step,
        )
        shapes = self._warmup_steps(plan.max_num_seqs)
        if shapes:
            with self.startup.phase("warm up"):
                run_warmup(self._scratch_runner(self.kv_cache, sampler), shapes, config.block_size,
                           compile_ahead=self._compiles_ahead())
        else:
            self.startup.skip("warm up", self._eager_reason())
        if self.use_cuda_graphs:
            with self.startup.phase("capture graphs"):
                self.runner.capture_cuda_graphs(min(plan.max_num_seqs, self.max_batched_tokens), self.max_model_len)
        else:
            self.startup.skip("capture graphs", self._eager_reason())

    def _use_compile(self) -> bool:
        """torch.compile the forward on the devices where it pays, for models whose forward can be captured in
        a graph (no host syncs, no per-sequence Python state; attention is an opaque op whatever the backend).
        ``enforce_eager`` turns it off, with the CUDA graphs. Pipeline stages run eagerly."""
        return (
            not self.config.enforce_eager
            and self.device.type in COMPILE_DEVICE_TYPES
            and self.model.supports_cuda_graphs
            and self.parallel.pp_size == 1
        )

    def _aot_path(self, hf_config) -> Path:
        """Where this rank's compiled forward is saved for the next start (``compile_cache.aot_artifact_path``)."""
        device = self.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        return aot_artifact_path(aot_cache_dir(default_cache_dir()), self.model, {
            "config": hf_config.to_json_string(use_diff=False), "dtype": str(self.dtype),
            "device": [device.type, device_name, capability], "model_impl": self.model_impl,
            "quantization": self.config.quantization,
            "ranks": [self.parallel.world_size, self.parallel.rank, self.parallel.tp.size],
        })

    def _warmup_steps(self, max_num_seqs: int) -> list[list[SequenceShape]]:
        """The warm-up's steps: one of every step shape class where something compiles lazily (the compiled
        forward; on GPU the Triton kernels), else the first steps only, which pay a process's one-time costs
        (torch imports dynamo at a custom op's first call: a second on a CPU, which the first request would
        wait for). None for ``enforce_eager``, nor for models that keep per-sequence state (compat), which
        cannot take synthetic steps."""
        if self.config.enforce_eager or self.model.sequence_state() is not None:
            return []
        if isinstance(self.forward, CompiledForward) or self.device.type == "cuda":
            return warmup_shapes(self.max_batched_tokens, max_num_seqs, self.max_model_len)
        return first_steps(max_num_seqs)

    def _compiles_ahead(self) -> bool:
        """Whether the warm-up compiles its Triton kernels on several threads first: on a GPU whose Triton can,
        unless the compiled forward came from the cache (the start that saved it compiled the kernels too, and
        Triton's disk cache has them: a first pass would only cost time)."""
        if self.device.type != "cuda" or (isinstance(self.forward, CompiledForward) and self.forward.aot_loaded):
            return False
        return can_compile_ahead()

    def _eager_reason(self) -> str:
        if self.config.enforce_eager:
            return "enforce_eager"
        # Before the device: on a CPU an eager engine still warms up, unless its model keeps per-sequence state.
        if self.model.sequence_state() is not None:
            return f"the {self.model_impl} tier runs eagerly"
        if self.device.type not in COMPILE_DEVICE_TYPES:
            return f"nothing compiles on {self.device.type}"
        if self.parallel.pp_size > 1:
            return "pipeline stages run eagerly"
        return f"no CUDA graphs for this model or the {self.attention_backend.name} attention backend"

    def _use_cuda_graphs(self) -> bool:
        if self.device.type != "cuda" or self.config.enforce_eager or not self.model.supports_cuda_graphs:
            return False
        if self.attention_backend.name not in GRAPH_SAFE_BACKENDS:
            logger.info("no CUDA graphs: the %s attention backend runs eagerly", self.attention_backend.name)
            return False
        if self.parallel.pp_size > 1:
            logger.info("no CUDA graphs: pipeline stages run eagerly")
            return False
        return True

    def _budget(self, spec: KVCacheSpec, sampler: Sampler | None, full_batch_bytes: int) -> int:
        """This rank's KV cache budget, cut to what the most constrained rank can hold: as many blocks (or,
        for a model with its own per-sequence state, sequences) on every rank, each in its own layout."""
        budget = kv_cache_budget(
            self.config, self.device, self.use_cuda_graphs,
            lambda: self._profile_run(spec, sampler, self.max_batched_tokens), full_batch_bytes,
        )
        state = self.model.sequence_state()
        unit = spec.bytes_per_block if state is None else state.sequence_bytes(self.max_model_len)
        if unit == 0 or self.parallel.world_size == 1:
            return budget
        return self.parallel.min_over_ranks(budget // unit) * unit

    def _profile_run(self, spec: KVCacheSpec, sampler: Sampler | None, num_tokens: int) -> None:
        """Run a step of ``num_tokens`` (the largest, to profile memory; or a small one, to compile the model)
        with a one-block KV cache."""
        runner = self._scratch_runner(KVCache(spec, 1, self.device), sampler)
        runner.profile_run(num_tokens, self.config.max_num_seqs, self.max_model_len)

    def _scratch_runner(self, kv_cache: KVCache, sampler: Sampler | None) -> ModelRunner:
        """An eager runner for startup steps, run on every rank alike, with a throwaway sampler on the driver
        (the engine's RNG stays untouched)."""
        scratch_sampler = None if sampler is None else Sampler(self.device, self.config.seed, sampler.eos_token_ids)
        return ModelRunner(
            self.model, kv_cache, self.attention_backend, scratch_sampler, self.device, self.forward, self.parallel,
            self.stages,
        )


def run_worker(rendezvous: Rendezvous, rank: int) -> None:
    """A rank's process: join the others, build this rank's worker, run every step the driver sends."""
    dump_stacks_on_signal()
    store = connect_store(rendezvous, is_master=False)
    try:
        store.set(joined_key(rank), "1")
        config = EngineConfig(**json.loads(store.get(CONFIG_KEY)))
        _check_same_layout(rendezvous, config)
        parallel = init_rank(rendezvous, rank, store)
        with paused_gc(collect=True):
            worker = Worker(config, config.model, load_hf_config(config.model, config.trust_remote_code), parallel)
        freeze_startup_objects()  # this process serves this worker until the driver stops
        steps = StepBroadcast(parallel, worker.device)
        while (message := steps.receive()) is not None:
            worker.runner.run_model(*message)
        worker.runner.release_cuda_graphs()  # the driver leaves the groups now too; see close_process_groups
    except BaseException as error:
        report_failure(store, rank, error)
        raise SystemExit(1) from error
    finally:
        close_process_groups()


def _check_same_layout(rendezvous: Rendezvous, config: EngineConfig) -> None:
    """A node started with other parallel sizes than the driver's would number its ranks wrongly, one on
    another kind of device would speak another backend."""
    driver = (config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes, config.torch_device().type)
    here = (rendezvous.tensor_parallel_size, rendezvous.pipeline_parallel_size, rendezvous.nnodes,
            rendezvous.device_type)
    if driver != here:
        raise ValueError(
            f"this node was started with tensor_parallel_size, pipeline_parallel_size, nnodes, device = {here}, "
            f"the driver runs {driver}: start every node with the same sizes and device"
        )
