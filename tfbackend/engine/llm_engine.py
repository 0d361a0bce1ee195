"""The engine: requests in, one scheduled model step at a time, outputs out.

``LLMEngine`` is synchronous and single-threaded; ``tfbackend.llm.LLM`` drives it to completion for
offline batches and the server's async loop steps it while requests arrive. Construction (model, KV cache,
CUDA graphs) and stepping live here; checking requests is ``request.py``, turning sampled tokens into
outputs ``output_processor.py``, sizing the KV cache ``memory.py``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from tfbackend.attention import get_attention_backend
from tfbackend.config import EngineConfig
from tfbackend.engine.block_manager import BlockManager
from tfbackend.engine.cuda_graphs import GRAPH_SAFE_BACKENDS, CompiledForward
from tfbackend.engine.device import placeholder
from tfbackend.engine.memory import kv_cache_budget, plan_cache
from tfbackend.engine.model_files import eos_token_ids, load_tokenizer, max_model_len
from tfbackend.engine.model_runner import ModelRunner, PendingStep
from tfbackend.engine.output_processor import OutputProcessor
from tfbackend.engine.request import Request, validate_request
from tfbackend.engine.sampler import Sampler, reads_token_history
from tfbackend.engine.scheduler import ScheduledBatch, Scheduler
from tfbackend.engine.sequence import Sequence
from tfbackend.kv_cache import KVCache, KVCacheSpec
from tfbackend.outputs import RequestOutput
from tfbackend.hf_classes import load_hf_config
from tfbackend.registry import load_model
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


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from tfbackend.model_source import resolve_model

        config.validate()
        self.config = config
        self.model_dir = resolve_model(config.model)
        hf_config = load_hf_config(self.model_dir, config.trust_remote_code)
        self.hf_config = hf_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(hf_config, self.device)
        torch.manual_seed(config.seed)
        self.model, resolved = load_model(self.model_dir, hf_config, config.model_impl, self.dtype, self.device)
        self.model_impl, self.model_impl_reason = resolved.model_impl, resolved.reason
        logger.info("model implementation: %s (%s)", self.model_impl, self.model_impl_reason)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_dir)
        self.max_model_len = max_model_len(hf_config, config.max_model_len)
        self.eos_token_ids = eos_token_ids(self.model_dir, hf_config, self.tokenizer)

        self.attention_backend = get_attention_backend(config.attention_backend, self.device)
        self.use_cuda_graphs = self._use_cuda_graphs()
        # Graph mode compiles the model too (enforce_eager turns both off); the profiling run compiles it.
        self.forward = CompiledForward(self.model) if self.use_cuda_graphs else self.model
        self.sampler = Sampler(self.device, config.seed, self.eos_token_ids)
        spec = KVCacheSpec(tuple(self.model.attention_layers()), self.dtype, config.block_size)
        # A model that cannot resume a prefill needs a step budget that holds the longest prompt.
        max_batched_tokens = config.max_num_batched_tokens
        if not self.model.supports_chunked_prefill:
            max_batched_tokens = max(max_batched_tokens, self.max_model_len)
        plan = plan_cache(
            config, spec, self.model.sequence_state(), self.max_model_len,
            lambda full_batch_bytes: kv_cache_budget(
                config, self.device, self.use_cuda_graphs, lambda: self._profile_run(spec, max_batched_tokens),
                full_batch_bytes,
            ),
        )
        self.kv_cache = KVCache(spec, plan.num_blocks, self.device)
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB), at most %d sequences",
            plan.num_blocks, spec.block_size, plan.num_blocks * spec.block_size,
            self.kv_cache.storage.numel() * self.kv_cache.storage.element_size() / 2**20, plan.max_num_seqs,
        )
        prefix_caching = config.enable_prefix_caching and self.model.supports_prefix_caching
        self.block_manager = BlockManager(plan.num_blocks, config.block_size, prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, plan.max_num_seqs, max_batched_tokens, self.model.supports_chunked_prefill
        )
        self.runner = ModelRunner(
            self.model, self.kv_cache, self.attention_backend, self.sampler, self.device, self.forward
        )
        self.run_ahead = self.device.type == "cuda"  # see step(); on a CPU nothing would overlap
        self._pending: PendingStep | None = None
        if self.use_cuda_graphs:
            max_batch = min(plan.max_num_seqs, max_batched_tokens)
            self.runner.capture_cuda_graphs(max_batch, self.max_model_len)
        self.vocab_size = hf_config.get_text_config().vocab_size
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.output_processor = OutputProcessor(
            self.tokenizer, self.eos_token_ids, self.max_model_len, self.scheduler, self.grammars
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()

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
        )

    # ---- sizing ---------------------------------------------------------------------------------------

    def _use_cuda_graphs(self) -> bool:
        if self.device.type != "cuda" or self.config.enforce_eager or not self.model.supports_cuda_graphs:
            return False
        if self.attention_backend.name not in GRAPH_SAFE_BACKENDS:
            logger.info("no CUDA graphs: the %s attention backend runs eagerly", self.attention_backend.name)
            return False
        return True

    def _profile_run(self, spec: KVCacheSpec, max_batched_tokens: int) -> None:
        """Run the largest step with a one-block KV cache and a throwaway sampler (self.sampler's RNG stays)."""
        sampler = Sampler(self.device, self.config.seed, self.eos_token_ids)
        runner = ModelRunner(
            self.model, KVCache(spec, 1, self.device), self.attention_backend, sampler, self.device, self.forward
        )
        runner.profile_run(max_batched_tokens, self.config.max_num_seqs, self.max_model_len)


def _without_finished(batch: ScheduledBatch) -> ScheduledBatch:
    kept = [(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens) if not seq.is_finished]
    return ScheduledBatch([seq for seq, _ in kept], [n for _, n in kept], batch.num_preempted)
