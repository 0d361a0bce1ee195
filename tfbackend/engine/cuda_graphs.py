"""CUDA graphs for decode steps, and the compiled forward they capture, for any model (native or fallback).

A decode step of a small model is about a millisecond of GPU work spread over hundreds of kernels, which an
eager forward launches one by one from Python (the HF fallback: some twenty per layer); launching then costs
more than the work. Replaying a captured graph launches them all at once.

One graph is captured per padded batch size (1, 2, 4, 8, 16, 32, then every 16, every 32 beyond 256, up to
the largest batch). A graph reads its inputs from static buffers it was captured with: each step copies its
arrays into them and pads the batch up to the graph's size with rows that store nothing (slot -1) and
attend to a single key of block 0, so padding never touches a real sequence's cache. The metadata's
``max_seq_len`` is fixed at ``max_model_len``, so the launch configuration the attention backend derives
from it at capture time holds for any sequence; it is only an upper bound: the Triton kernel reads each
sequence's length on the device and splits its keys into as many partitions as that length fills, so one
graph per batch size serves short and long contexts alike, with no per-length graphs and no host sync. Only
backends that read the step's metadata from device tensors alone can be captured: the torch reference loops
over host lists and always runs eagerly.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tfbackend.attention import AttentionBackend, AttentionMetadata, ForwardContext, forward_context
from tfbackend.engine.compile_monitor import count_cuda_graph_capture
from tfbackend.engine.device import resolve_placeholders
from tfbackend.engine.piecewise_compile import piecewise_inductor
from tfbackend.kv_cache import KVCache

if TYPE_CHECKING:
    from tfbackend.engine.model_runner import StepInputs

logger = logging.getLogger(__name__)

GRAPH_SAFE_BACKENDS = ("triton",)


class CompiledForward:
    """``model.forward`` through ``torch.compile``, which fuses the model's elementwise work (norms, RoPE,
    activations, residual adds) into a few Triton kernels: a graph of an HF model has some 40 kernels per
    layer, and each costs GPU time and replay time however small. Attention is one opaque custom op, so dynamo
    traces the whole model as one graph (Inductor compiles it piece by piece between the attention calls, so
    that identical layers compile once), and one compilation serves every step size, one token included.

    The token dimension is marked *unbacked*: a dynamic size whose value dynamo never guards on. A plain
    dynamic size is specialized at 1 (a one-token step, the batch-1 decode, compiled a second graph: another
    full Inductor compile at startup) and, past that, guarded on anything the model's code asks of it. Code
    that must branch on the token count still can; that part then specializes as it would have anyway.
    Should a model's graph not compile with the unbacked size, it compiles with a plain dynamic one; should
    that fail too, the first call says so and the model runs as written from then on.

    Given ``aot_path``, the first call compiles ahead of time and saves the result there (``aot_compile.py``),
    and the next start of the same model loads it instead of tracing and compiling again.
    """

    # torch.compile's backend: Inductor, piece by piece between attention calls (piecewise_compile.py); tests
    # on a CPU use "eager" (tracing only, no code generation).
    backend: Callable | str = staticmethod(piecewise_inductor)

    def __init__(self, model: torch.nn.Module, aot_path: Path | None = None):
        """``aot_path``: where the compiled forward is saved, to be loaded by the next start instead of traced
        and compiled again (``aot_compile.py``); None compiles in process only."""
        self.model = model
        self.compiled = torch.compile(model.forward, dynamic=True, backend=self.backend)
        self.unbacked_tokens = True
        # The model's float attributes (norm epsilons, scales) are constants: specialized, dynamo need not lift
        # them to tensors, and a compile does not restart to specialize them after all (that restart traced and
        # compiled the model twice). One patch, entered per call (making one per call costs ~3x more).
        self.specialize_floats = torch._dynamo.config.patch(specialize_float=True)
        # Saved and loaded only with the production backend (tests pick others, which have nothing to save).
        self.aot_path = aot_path if type(self).backend is piecewise_inductor else None
        self.aot_function: Callable[..., torch.Tensor] | None = None
        self.aot_loaded = False  # the forward came from aot_path, not from a compile in this process

    def compiles_with_inductor(self) -> bool:
        """Whether the first call will run Inductor: the production backend and no saved forward to load."""
        return (self.compiled is not None and type(self).backend is piecewise_inductor
                and (self.aot_path is None or not self.aot_path.is_file()))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.aot_function is not None:
            return self.aot_function(self.model, input_ids, positions)
        if self.aot_path is not None:
            out = self._first_aot_call(input_ids, positions)
            if out is not None:
                return out
        if self.compiled is not None:
            if self.unbacked_tokens:
                _mark_tokens_unbacked(input_ids, positions)
            try:
                with self.specialize_floats:
                    return self.compiled(input_ids, positions)
            except torch._dynamo.exc.TorchDynamoException as error:
                name = type(self.model).__name__
                if self.unbacked_tokens:
                    logger.info("%s does not compile with an unbacked token count; compiling with a dynamic one "
                                "(one more graph, for one-token steps): %s", name, error)
                    self.unbacked_tokens = False
                    return self(input_ids.clone(), positions.clone())  # the clones carry no unbacked marks
                logger.warning("torch.compile failed, running %s uncompiled: %s", name, error)  # eager still works
                self.compiled = None
        return self.model(input_ids, positions)

    def _first_aot_call(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Load the saved forward, or compile and save it, and run it; None when this model has no saved
        forward to use (then torch.compile runs in process, on Inductor's caches). A model whose forward cannot
        be compiled ahead of time or saved is marked so, and later starts do not try again."""
        from tfbackend.engine import aot_compile

        path, self.aot_path = self.aot_path, None
        skip_marker = path.with_suffix(".skip")
        if skip_marker.is_file():
            return None
        forward = self.model.forward
        with self.specialize_floats:
            if path.is_file():
                try:
                    function = aot_compile.load(path, forward)
                    out = function(self.model, input_ids, positions)  # checks the saved guards
                    function.disable_guard_check()  # checked once: later calls pass tensors of the same kinds
                    self.aot_function, self.aot_loaded = function, True
                    logger.info("compiled forward loaded from %s", path)
                    return out
                except Exception as error:  # stale or unreadable: compile it again
                    logger.info("the saved compiled forward %s does not load (%s); compiling it again", path, error)
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
            try:
                _mark_tokens_unbacked(input_ids, positions)
                function = aot_compile.compile_and_save(forward, (input_ids, positions), path)
                out = function(self.model, input_ids, positions)
                function.disable_guard_check()
            except Exception as error:
                logger.info("%s does not compile ahead of time (%s: %s); compiling in process from now on",
                            type(self.model).__name__, type(error).__name__, error)
                with contextlib.suppress(OSError):  # a read-only cache: the next start tries again, no harm done
                    skip_marker.parent.mkdir(parents=True, exist_ok=True)
                    skip_marker.write_text(f"{type(error).__name__}: {error}\n")
                return None
        self.aot_function = function
        logger.info("compiled forward saved to %s", path)
        return out


def _mark_tokens_unbacked(*tensors: torch.Tensor) -> None:
    """The token dimension is a size dynamo never guards on (see CompiledForward)."""
    for tensor in tensors:
        torch._dynamo.decorators.mark_unbacked(tensor, 0)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The padded batch sizes to capture: powers of two to 32, then steps of 16 (32 beyond 256)."""
    sizes = [1, 2, 4, 8, 16, 32, *range(48, 257, 16), *range(288, max_batch_size + 1, 32)]
    sizes = [size for size in sizes if size < max_batch_size]
    return [*sizes, max_batch_size]


class CUDAGraphRunner:
    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        kv_cache: KVCache,
        backend: AttentionBackend,
        max_batch_size: int,
        max_model_len: int,
    ):
        if backend.name not in GRAPH_SAFE_BACKENDS:
            raise ValueError(f"the {backend.name!r} attention backend cannot be captured in CUDA graphs")
        self.forward = forward
        self.kv_cache = kv_cache
        self.backend = backend
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        device = kv_cache.storage.device
        size = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // kv_cache.spec.block_size)
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)  # never changes
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)
        # Pinned host staging, written in place each step: allocating pinned memory per copy costs more than
        # the copies. ``staged`` marks when the last step's copies have read it.
        pinned = device.type == "cuda"
        self.host_tokens = torch.empty(3, size, dtype=torch.int64, pin_memory=pinned)  # ids, positions, slots
        self.host_seq_lens = torch.empty(size, dtype=torch.int32, pin_memory=pinned)
        self.host_block_tables = torch.empty(size * max_blocks, dtype=torch.int32, pin_memory=pinned)
        self.staged = torch.cuda.Event() if pinned else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def capture(self) -> None:
        """Capture every batch size, largest first, so smaller graphs reuse its memory in the shared pool."""
        start, reserved = time.perf_counter(), torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        for batch_size in reversed(self.batch_sizes):
            context = ForwardContext(self.metadata(batch_size), self.kv_cache, self.backend)
            input_ids, positions = self.input_ids[:batch_size], self.positions[:batch_size]
            with forward_context(context):
                # Warm-up outside the graph: Triton compiles, cuBLAS picks its kernels, lazy buffers appear.
                self.forward(input_ids, positions)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[batch_size] = self.forward(input_ids, positions)
            self.graphs[batch_size] = graph
            count_cuda_graph_capture()
        # A graph's first launch uploads it to the device first: milliseconds that the first decode step of each
        # batch size would wait for (its TTFT). Launch each once now, on the inputs it was captured with (every
        # rank alike: the graphs hold the step's collectives).
        for batch_size in reversed(self.batch_sizes):
            self.graphs[batch_size].replay()
        torch.cuda.synchronize()
        logger.info(
            "captured %d CUDA graphs (batch sizes %d..%d) in %.1f s, %.0f MiB",
            len(self.graphs), self.batch_sizes[0], self.batch_sizes[-1], time.perf_counter() - start,
            (torch.cuda.memory_reserved() - reserved) / 2**20,
        )

    def release(self) -> None:
        """Free the graphs. A graph that captured a collective holds a reference on its NCCL communicator, and
        tearing the communicator down waits until that reference is gone: release before leaving the groups."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def can_run(self, step: StepInputs) -> bool:
        return step.max_query_len == 1 and step.num_seqs <= self.batch_sizes[-1]

    def run(self, step: StepInputs, pending_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the smallest graph that holds the step; returns its hidden states, ``[B, H]``.

        ``pending_tokens``: the previous step's sampled ids, for input ids that are placeholders of them."""
        num_seqs, width = step.num_seqs, step.block_tables.shape[1]
        size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_seqs)]
        if self.staged is not None:
            self.staged.synchronize()  # normally long done: the sampler waited for the last step
        tokens = self.host_tokens.numpy()
        for row, values, pad in ((0, step.input_ids, 0), (1, step.positions, 0), (2, step.slot_mapping, -1)):
            tokens[row, :num_seqs] = values
            tokens[row, num_seqs:size] = pad
        seq_lens = self.host_seq_lens.numpy()
        seq_lens[:num_seqs] = step.seq_lens
        seq_lens[num_seqs:size] = 1
        tables = self.host_block_tables[: size * width].view(size, width)
        tables.numpy()[:num_seqs] = step.block_tables
        tables.numpy()[num_seqs:] = 0
        for static, staged in (
            (self.input_ids, self.host_tokens[0]),
            (self.positions, self.host_tokens[1]),
            (self.slot_mapping, self.host_tokens[2]),
            (self.seq_lens, self.host_seq_lens),
        ):
            static[:size].copy_(staged[:size], non_blocking=True)
        self.block_tables[:size, :width].copy_(tables, non_blocking=True)
        if self.staged is not None:
            self.staged.record()
        if pending_tokens is not None:
            self.input_ids[:size].copy_(resolve_placeholders(self.input_ids[:size], pending_tokens))
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]
