"""The engine: requests in, one scheduled model step at a time, outputs out.

``LLMEngine`` is synchronous and single-threaded; ``tfbackend.llm.LLM`` drives it to completion for
offline batches and the server's async loop steps it while requests arrive.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from tfbackend.attention import get_attention_backend
from tfbackend.config import EngineConfig
from tfbackend.engine.block_manager import BlockManager
from tfbackend.engine.cuda_graphs import GRAPH_SAFE_BACKENDS, CompiledForward
from tfbackend.engine.detokenizer import Detokenizer, find_stop_string
from tfbackend.engine.device import placeholder
from tfbackend.engine.model_runner import ModelRunner, PendingStep
from tfbackend.engine.sampler import Sampler, reads_token_history
from tfbackend.engine.scheduler import ScheduledBatch, Scheduler
from tfbackend.engine.sequence import Sequence
from tfbackend.kv_cache import KVCache, KVCacheSpec, num_blocks_for_budget
from tfbackend.outputs import CompletionOutput, Logprob, RequestOutput
from tfbackend.registry import resolve
from tfbackend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# Kept free for the CUDA graphs' memory pool, allocated after the KV cache. Decode activations are small
# (hidden states of at most max_num_seqs tokens); capture logs what the pool really took.
CUDA_GRAPH_MEMORY_RESERVE = 512 << 20


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    stream: bool  # report progress every step, not only when finished
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


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
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.hf_config = hf_config
        resolved = resolve(hf_config, config.model_impl)
        self.model_impl, self.model_impl_reason = resolved.model_impl, resolved.reason
        logger.info("model implementation: %s (%s)", self.model_impl, self.model_impl_reason)

        self.device = config.torch_device()
        self.dtype = config.torch_dtype(hf_config, self.device)
        torch.manual_seed(config.seed)
        self.model = resolved.model_class.load(self.model_dir, hf_config, self.dtype, self.device)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_dir)
        self.max_model_len = self._max_model_len(hf_config)
        self.eos_token_ids = eos_token_ids(self.model_dir, hf_config, self.tokenizer)

        self.attention_backend = get_attention_backend(config.attention_backend, self.device)
        self.use_cuda_graphs = self._use_cuda_graphs()
        # Graph mode compiles the model too (enforce_eager turns both off); the profiling run compiles it.
        self.forward = CompiledForward(self.model) if self.use_cuda_graphs else self.model
        self.sampler = Sampler(self.device, config.seed, self.eos_token_ids)
        spec = KVCacheSpec.from_hf_config(hf_config, self.dtype, config.block_size)
        num_blocks = num_blocks_for_budget(spec, self._kv_cache_budget(spec), self.max_model_len)
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB)",
            num_blocks, spec.block_size, num_blocks * spec.block_size, num_blocks * spec.bytes_per_block / 2**20,
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model, self.kv_cache, self.attention_backend, self.sampler, self.device, self.forward
        )
        self.run_ahead = self.device.type == "cuda"  # see step(); on a CPU nothing would overlap
        self._pending: PendingStep | None = None
        if self.use_cuda_graphs:
            max_batch = min(config.max_num_seqs, config.max_num_batched_tokens)
            self.runner.capture_cuda_graphs(max_batch, self.max_model_len)
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, stream: bool = True
    ) -> None:
        """Queue a request. ``prompt`` is text (needs a tokenizer) or token ids."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids instead of text")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt and at least one generated token)"
            )
        vocab = self.hf_config.get_text_config().vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs must be at most the vocabulary size {vocab}, got {params.logprobs}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
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
        if self.detokenizer is not None:
            self.detokenizer.start(seq)
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
        return outputs

    def _process(self, pending: PendingStep) -> list[RequestOutput]:
        """Take a launched step's tokens (waiting for the device) and apply them to its sequences."""
        sampled = pending.fetch()
        now = time.monotonic()
        progressed: dict[str, Request] = {}
        for row, seq in enumerate(pending.seqs):
            if seq.is_finished:  # finished or aborted while its step ran ahead
                continue
            token = sampled.token_ids[row]
            if self.run_ahead:
                seq.token_ids[-1] = token  # its placeholder
            else:
                seq.token_ids.append(token)
            self._accept_token(seq, token, sampled.logprobs[row], now)
            progressed[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for request in progressed.values():
            if request.finished:
                del self.requests[request.request_id]
            if request.stream or request.finished:
                outputs.append(self._make_output(request))
        return outputs

    def _accept_token(self, seq: Sequence, token: int, logprobs, now: float) -> None:
        """Bookkeeping for a token just placed at the end of ``seq``: timing, logprobs, stop conditions."""
        if seq.first_token_time is None:
            seq.first_token_time = now
        if logprobs is not None:
            seq.logprobs.append(self._logprob_dict(token, logprobs))
        params = seq.params
        request = self.requests[seq.request_id]
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return self._finish(seq, "stop", token)
        if self.detokenizer is not None and (request.stream or params.stop):
            new_text = self.detokenizer.decode_new_tokens(seq)
            if params.stop and new_text:
                stop = find_stop_string(seq, len(new_text))
                if stop is not None:
                    return self._finish(seq, "stop", stop)
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or (
            seq.num_tokens >= self.max_model_len
        ):
            return self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        if self.detokenizer is not None and not isinstance(stop_reason, str):
            self.detokenizer.decode_new_tokens(seq, final=True)  # the text not yet decoded, with its context

    def _logprob_dict(self, token: int, logprobs) -> dict[int, Logprob]:
        chosen, rank, top_ids, top_values = logprobs
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
        result = {t: Logprob(v, r + 1, decode(t)) for r, (t, v) in enumerate(zip(top_ids, top_values))}
        if token not in result:
            result[token] = Logprob(chosen, rank, decode(token))
        return result

    def _make_output(self, request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=self._visible_text(seq),
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            )
            for seq in request.seqs
        ]
        first_token_times = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.finished,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            metrics={"arrival_time": request.arrival_time, "first_token_time": min(first_token_times, default=0.0)},
        )

    @staticmethod
    def _visible_text(seq: Sequence) -> str:
        """While a sequence runs, hold back text that could be the start of a stop string.

        Streamed text must never include characters that a stop string found later would cut off.
        """
        if seq.is_finished or not seq.params.stop:
            return seq.output_text
        hold = max(len(stop) for stop in seq.params.stop) - 1
        return seq.output_text[: max(len(seq.output_text) - hold, 0)]

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

    def _max_model_len(self, hf_config) -> int:
        model_max = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
        requested = self.config.max_model_len
        if requested is None:
            if model_max is None:
                raise ValueError("the model config has no max_position_embeddings: pass max_model_len")
            return model_max
        if model_max is not None and requested > model_max:
            raise ValueError(f"max_model_len={requested} exceeds the model's max_position_embeddings={model_max}")
        return requested

    def _use_cuda_graphs(self) -> bool:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return False
        if self.attention_backend.name not in GRAPH_SAFE_BACKENDS:
            logger.info("no CUDA graphs: the %s attention backend runs eagerly", self.attention_backend.name)
            return False
        return True

    def _kv_cache_budget(self, spec: KVCacheSpec) -> int:
        """Bytes for the KV cache: what ``gpu_memory_utilization`` of the GPU leaves after the peak of a
        profiled largest step (weights, activations, sampler temporaries), other processes' memory and the
        CUDA graphs' pool."""
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_CACHE_BYTES
        peak = self._profile_peak_memory(spec)
        free, total = torch.cuda.mem_get_info(self.device)
        used_elsewhere = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, other processes
        graphs = CUDA_GRAPH_MEMORY_RESERVE if self.use_cuda_graphs else 0
        budget = int(total * self.config.gpu_memory_utilization) - used_elsewhere - peak - graphs
        logger.info(
            "GPU memory: %.2f GiB total, %.2f GiB used elsewhere, peak of the largest step %.2f GiB, "
            "CUDA graph reserve %.2f GiB -> KV cache %.2f GiB",
            total / 2**30, used_elsewhere / 2**30, peak / 2**30, graphs / 2**30, budget / 2**30,
        )
        if budget <= 0:
            raise ValueError(
                f"no GPU memory is left for the KV cache at gpu_memory_utilization="
                f"{self.config.gpu_memory_utilization} (largest step peaks at {peak / 2**30:.2f} GiB): raise it, "
                f"or lower max_num_batched_tokens / max_num_seqs"
            )
        return budget

    def _profile_peak_memory(self, spec: KVCacheSpec) -> int:
        """Peak allocated bytes of the largest step, run with a one-block KV cache and a throwaway sampler."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        sampler = Sampler(self.device, self.config.seed, self.eos_token_ids)  # leaves self.sampler's RNG as is
        runner = ModelRunner(
            self.model, KVCache(spec, 1, self.device), self.attention_backend, sampler, self.device, self.forward
        )
        runner.profile_run(self.config.max_num_batched_tokens, self.config.max_num_seqs, self.max_model_len)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del runner
        torch.cuda.empty_cache()  # hand the activations' cached blocks back, for the KV cache's one allocation
        return peak


def _without_finished(batch: ScheduledBatch) -> ScheduledBatch:
    kept = [(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens) if not seq.is_finished]
    return ScheduledBatch([seq for seq, _ in kept], [n for _, n in kept], batch.num_preempted)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path):
    """The checkpoint's tokenizer, or None for a checkpoint that ships none (it then runs on token ids)."""
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        logger.info("%s has no tokenizer files: prompts must be token ids and outputs carry no text", path)
        return None
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(model_dir, hf_config, tokenizer) -> set[int]:
    """End-of-sequence ids as HF ``generate`` would use them (generation config first)."""
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation_config = GenerationConfig.from_model_config(hf_config)
    eos = generation_config.eos_token_id
    if eos is None:
        eos = getattr(hf_config.get_text_config(), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}
