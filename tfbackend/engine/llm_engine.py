"""The engine: requests in, one scheduled model step at a time, outputs out.

``LLMEngine`` is synchronous and single-threaded; ``tfbackend.llm.LLM`` drives it to completion for
offline batches and the server's async loop steps it while requests arrive. Scheduling and stepping live
here; the model's side (model, KV cache, runner, CUDA graphs) is ``worker.py``, other ranks of a multi-rank
engine ``executor.py``; checking requests is ``request.py``, turning sampled tokens into outputs
``output_processor.py``, sizing the KV cache ``memory.py``.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass

import torch

from tfbackend.config import EngineConfig
from tfbackend.distributed import SINGLE_PROCESS
from tfbackend.engine.block_manager import BlockManager
from tfbackend.engine.compile_monitor import CompileCounts, CompileMonitor
from tfbackend.engine.device import placeholder
from tfbackend.engine.errors import EngineDeadError
from tfbackend.engine.executor import Executor
from tfbackend.engine.model_files import eos_token_ids, load_tokenizer, max_model_len
from tfbackend.engine.model_runner import PendingStep
from tfbackend.engine.output_processor import OutputProcessor
from tfbackend.engine.request import Request, validate_request
from tfbackend.engine.sampler import Sampler, reads_token_history
from tfbackend.engine.scheduler import ScheduledBatch, Scheduler
from tfbackend.engine.sequence import Sequence
from tfbackend.engine.startup import StartupReport, paused_gc
from tfbackend.engine.worker import Worker
from tfbackend.hf_classes import load_hf_config
from tfbackend.outputs import RequestOutput
from tfbackend.sampling_params import SamplingParams
from tfbackend.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    kv_capacity_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    compilations_after_ready: CompileCounts  # should stay zero: startup compiles everything serving needs
    startup_seconds: dict[str, float]  # per startup phase, and "total"


class LLMEngine:
    def __init__(self, config: EngineConfig):
        with paused_gc(collect=True):  # startup makes a million long-lived objects
            self._build(config)
        self.compile_monitor.mark_ready()
        compiled = self.compile_monitor.during_startup()
        self.startup.finish(
            f"ready; compiled {compiled.torch_compile_graphs} torch.compile graph(s), "
            f"{compiled.triton_kernels} Triton kernel(s), captured {compiled.cuda_graphs} CUDA graph(s)"
        )

    def _build(self, config: EngineConfig) -> None:
        from tfbackend.model_source import resolve_model

        config.validate()
        self.config = config
        self.startup = StartupReport()
        self.compile_monitor = CompileMonitor()
        with self.startup.phase("resolve"):
            self.model_dir = resolve_model(config.model)
            hf_config = load_hf_config(self.model_dir, config.trust_remote_code)
            self.tokenizer = load_tokenizer(config.tokenizer or self.model_dir)
            self.eos_token_ids = eos_token_ids(self.model_dir, hf_config, self.tokenizer)
        self.hf_config = hf_config
        self.max_model_len = max_model_len(hf_config, config.max_model_len)
        self.dead: EngineDeadError | None = None
        # Several ranks: this process is rank 0 (the driver); the executor starts and drives the others.
        self.executor = None
        if config.world_size > 1:
            with self.startup.phase("start ranks"):  # their processes' imports, joining, the process groups
                self.executor = Executor(config, self.model_dir, hf_config)
        else:
            self.startup.skip("start ranks", "one rank")
        parallel = SINGLE_PROCESS if self.executor is None else self.executor.parallel
        if self.executor is not None:
            weakref.finalize(self, self.executor.shutdown)
        try:
            self.device = parallel.device or config.torch_device()
            self.sampler = Sampler(self.device, config.seed, self.eos_token_ids)
            send_step = None if self.executor is None else self.executor.send_step
            self.worker = Worker(config, self.model_dir, hf_config, parallel, self.sampler, send_step, self.startup)
        except BaseException as error:
            if self.executor is None:
                raise
            failure = self.executor.rank_failure()
            self.executor.shutdown()
            if failure is None or isinstance(error, ValueError):
                raise
            raise EngineDeadError(f"the engine lost a rank while starting: {failure}") from error
        worker = self.worker
        if self.executor is not None:
            self.executor.release_graphs = worker.runner.release_cuda_graphs
        self.dtype, self.model, self.runner = worker.dtype, worker.model, worker.runner
        self.model_impl, self.model_impl_reason = worker.model_impl, worker.model_impl_reason
        logger.info("model implementation: %s (%s)", self.model_impl, self.model_impl_reason)
        self.attention_backend, self.use_cuda_graphs, self.forward = (
            worker.attention_backend, worker.use_cuda_graphs, worker.forward
        )
        self.kv_cache = worker.kv_cache
        with self.startup.phase("build scheduler"):
            prefix_caching = config.enable_prefix_caching and self.model.supports_prefix_caching
            self.block_manager = BlockManager(self.kv_cache.num_blocks, config.block_size, prefix_caching)
            self.scheduler = Scheduler(self.block_manager, worker.max_num_seqs, worker.max_batched_tokens,
                                       self.model.supports_chunked_prefill)
            self.vocab_size = hf_config.get_text_config().vocab_size
            self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            self.output_processor = OutputProcessor(
                self.tokenizer, self.eos_token_ids, self.max_model_len, self.scheduler, self.grammars
            )
        self.run_ahead = self.device.type == "cuda"  # see step(); on a CPU nothing would overlap
        self._pending: PendingStep | None = None
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the other ranks of a multi-rank engine (nothing to do for a single-process one)."""
        if self.executor is not None:
            self.executor.shutdown()

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if a rank of this engine has died."""
        if self.dead is None and self.executor is not None and self.executor.failure is not None:
            self.dead = EngineDeadError(f"the engine lost a rank: {self.executor.failure}")
        if self.dead is not None:
            raise self.dead

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, stream: bool = True
    ) -> None:
        """Queue a request. ``prompt`` is text (needs a tokenizer) or token ids."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids instead of text")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        validate_request(
            token_ids, params, self.max_model_len, self.vocab_size, self.tokenizer is not None, self.grammars
        )
        seqs = [self._new_sequence(request_id, i, token_ids, params) for i in range(params.n)]
        self.requests[request_id] = Request(request_id, text, token_ids, params, seqs, stream)
        for seq in seqs:
            self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, index: int, token_ids: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(next(self._seq_ids), request_id, index, list(token_ids), len(token_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(hash((params.seed, index)) & (2**63 - 1))
        if params.logprobs is not None:
            seq.logprobs = []
        self.output_processor.start(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        self.model.release_sequences([seq.seq_id for seq in request.seqs])

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- stepping -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one model step; return outputs of streaming requests that progressed and of finished ones.

        With several ranks, any failure of a step leaves the ranks out of step: it raises ``EngineDeadError``
        (naming the rank that died, when one did), and so does every later call.
        """
        self.check_health()
        if self.executor is None:
            return self._step()
        try:
            return self._step()
        except Exception as error:
            failure = self.executor.rank_failure()
            self.dead = EngineDeadError(
                f"the engine lost a rank: {failure}" if failure else f"a step failed on the driver: {error}"
            )
            self.executor.shutdown()
            raise self.dead from error

    def _step(self) -> list[RequestOutput]:
        """One step (see ``step``).

        On CUDA the engine runs a step ahead: it queues step N+1 before it waits for step N's tokens, so the
        host's bookkeeping, scheduling and preparation overlap the GPU's work. Step N+1's inputs include step
        N's tokens as placeholders, which the device fills in. Stops are therefore seen one step late: a
        sequence that finished at step N also ran in step N+1, whose token for it is dropped. Batches whose
        sampling reads earlier tokens on the host (penalties) wait for step N first.
        """
        batch = self.scheduler.schedule()
        previous, self._pending = self._pending, None
        outputs: list[RequestOutput] = []
        if previous is not None and any(reads_token_history(seq.params) for seq in batch.seqs):
            outputs += self._process(previous)
            previous = None
            batch = _without_finished(batch)
        pending = self.runner.launch(batch, previous) if batch.seqs else None
        if (compiled := self.compile_monitor.check()) is not None:
            logger.warning(
                "compiled after ready, in a step of %d tokens over %d sequences (which stalled for it): %d "
                "torch.compile graph(s), %d Triton kernel(s), %d CUDA graph(s); %d since ready",
                batch.num_tokens, len(batch.seqs), compiled.torch_compile_graphs, compiled.triton_kernels,
                compiled.cuda_graphs, self.compile_monitor.after_ready().total,
            )
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
        if previous is not None:
            outputs += self._process(previous)
        for seq in batch.seqs:
            if not seq.is_finished:  # a finished sequence's blocks are freed
                self.block_manager.cache_full_blocks(seq)
        if pending is not None and self.run_ahead:
            self._pending = pending
            for row, seq in enumerate(pending.seqs):
                if not seq.is_finished:
                    seq.token_ids.append(placeholder(row))
        elif pending is not None:
            outputs += self._process(pending)
        if self.output_processor.ended_seq_ids:
            self.model.release_sequences(self.output_processor.ended_seq_ids)
            self.output_processor.ended_seq_ids = []
        return outputs

    def _process(self, pending: PendingStep) -> list[RequestOutput]:
        return self.output_processor.process(pending, self.requests, replaces_placeholder=self.run_ahead)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks_used=bm.num_used_blocks,
            num_kv_blocks_total=bm.num_blocks,
            kv_capacity_tokens=bm.num_blocks * bm.block_size,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            compilations_after_ready=self.compile_monitor.after_ready(),
            startup_seconds=dict(self.startup.seconds),
        )


def _without_finished(batch: ScheduledBatch) -> ScheduledBatch:
    kept = [(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens) if not seq.is_finished]
    return ScheduledBatch([seq for seq, _ in kept], [n for _, n in kept], batch.num_preempted)
