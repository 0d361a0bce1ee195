"""Piecewise compilation: the model's graph split at its attention calls, each piece compiled by Inductor.

Compiled as one graph, a decoder costs Inductor the lowering, scheduling and code generation of every layer
(most of a cold start: ~30 s for a 16-layer model on an H100). Yet between two attention calls every layer
runs the same code on its own weights (output projection, residual, norm, MLP, the next layer's norm, QKV
projection, rotary). Split at the attention calls, which are opaque ops Inductor fuses nothing across
anyway, the pieces between them are one graph up to their inputs' names (``piece_signature``): each distinct
piece is compiled once and the identical ones share its compiled function, each call passing its own
weights. A compile then costs three pieces (before the first attention call, one layer's, after the last),
cold or warm, and the generated code is what the whole-graph compile produces for each piece. Dynamo still
traces the model once, so guards and the unbacked token count work as before.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

logger = logging.getLogger(__name__)


def split_targets() -> tuple[Any, ...]:
    """The ops the graph is cut at, as dynamo's graphs name them (the overload packet) and as AOT does."""
    import tfbackend.attention.context  # noqa: F401  (registers the op)

    op = torch.ops.tfbackend.paged_attention
    return (op, op.default)


# Compiles one piece (a graph without attention calls) for the fake inputs it receives: Inductor's compile_fx,
# or (aot_compile.py) a compile whose output can be saved.
PieceCompiler = Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]


def start_compile_workers(device: torch.device, ranks_on_node: int = 1) -> None:
    """Start Inductor's compile subprocesses now, ahead of the trace that precedes the first compile.

    Inductor compiles a Triton kernel in the calling process, one after another, whenever its subprocess pool
    is not ready yet, and the pool takes seconds to start (each worker imports torch). Left to itself, the
    pool starts at the first kernel (``compile_fx``, which ``piecewise_inductor`` calls; torch's own Inductor
    backend starts it when called, after dynamo's trace at best), so a cold start compiled its first kernels
    serially. The worker calls this before the compile phase of a cold start, so the pool starts while dynamo
    traces. A no-op for a CPU model (Inductor's C++ kernels use no pool) and where Inductor uses none (one
    compile thread, no Triton). ``ranks_on_node``: the ranks of this node, each with its own pool, share its
    cores (Inductor sizes every pool for all of them: 4 ranks on 64 cores started 128 workers), unless
    ``TORCHINDUCTOR_COMPILE_THREADS`` says otherwise."""
    if device.type != "cuda":
        return
    from torch._inductor import config
    from torch._inductor.async_compile import get_compile_threads, maybe_warm_pool

    if ranks_on_node > 1 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        config.compile_threads = max(1, get_compile_threads() // ranks_on_node)
    maybe_warm_pool()


def piecewise_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """A torch.compile backend: Inductor on each piece between the graph's attention calls.

    A graph without attention calls (a graph break's tail, a model without paged attention) compiles whole.
    """
    from torch._inductor.compile_fx import compile_fx

    split = split_at_attention(gm)
    if split is None:
        return compile_fx(gm, list(example_inputs))
    compile_pieces(split, example_inputs, compile_fx)
    return split


def split_at_attention(gm: fx.GraphModule) -> fx.GraphModule | None:
    """``gm`` as a graph of submodules: the nodes between two attention calls form one piece, each call a piece
    of its own; None for a graph without attention calls. Deterministic: the same graph splits the same way."""
    from torch.fx.passes.split_module import split_module

    targets = split_targets()
    cuts = {node for node in gm.graph.nodes if node.op == "call_function" and node.target in targets}
    if not cuts:
        return None
    piece_of: dict[fx.Node, int] = {}
    piece = 0
    for node in gm.graph.nodes:
        if node in cuts:
            piece_of[node] = piece + 1
            piece += 2
        else:
            piece_of[node] = piece
    return split_module(gm, None, lambda node: piece_of[node], keep_original_order=True)


def compile_pieces(
    split: fx.GraphModule, example_inputs: Sequence[Any], compile_piece: PieceCompiler
) -> tuple[dict[str, int], list[Callable[..., Any]]]:
    """Run ``split`` on fake inputs, compiling each piece without an attention call on the fake inputs it
    receives, once per distinct piece; the compiled functions replace the pieces in ``split``. Returns which
    compiled function (an index into the list, also returned) each piece's target runs."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._dynamo.utils import counters, detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    fake_mode = detect_fake_mode(example_inputs)
    # Dynamo passes a few inputs as real tensors (a module's float attributes, lifted); propagation needs fakes.
    fake_inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor)
                   else x for x in example_inputs]
    targets = split_targets()
    start, hits_before = time.perf_counter(), counters["inductor"]["fxgraph_cache_hit"]
    pieces = 0
    index_of: dict[str, int] = {}  # by signature: one compile per distinct piece
    compiled: list[Callable[..., Any]] = []
    compiled_targets: dict[str, int] = {}

    class CompilePieces(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            nonlocal pieces
            piece = self.fetch_attr(target)
            out = super().call_module(target, args, kwargs)
            pieces += 1
            if not any(node.op == "call_function" and node.target in targets for node in piece.graph.nodes):
                signature = piece_signature(piece, args)
                if signature not in index_of:
                    index_of[signature] = len(compiled)
                    compiled.append(compile_piece(piece, list(args)))
                compiled_targets[target] = index_of[signature]
                install_piece(split, target, compiled[index_of[signature]])
            return out

    # As dynamo propagates fakes: composite ops (a linear over [1, T, H]) decompose in Python, where sizes
    # may be symbolic, instead of in C++, which would ask a symbolic size for its value.
    with fake_mode, enable_python_dispatcher():
        CompilePieces(split).run(*fake_inputs)
    logger.info("piecewise compile: %d pieces, %d distinct compiled by Inductor (%d from its cache) in %.1f s",
                pieces, len(compiled), counters["inductor"]["fxgraph_cache_hit"] - hits_before,
                time.perf_counter() - start)
    return compiled_targets, compiled


def install_piece(split: fx.GraphModule, target: str, compiled: Callable[..., Any]) -> None:
    """Run ``compiled`` for the piece ``target`` of ``split``. The instance attribute shadows the registered
    submodule: the split graph's code calls ``self.<target>(...)``, and a function cannot be registered as one."""
    split.__dict__[target] = compiled


def piece_signature(piece: fx.GraphModule, inputs: Sequence[Any]) -> str:
    """What a piece computes, up to its inputs' names: pieces with one signature compile to the same code, so
    they share one compiled function (each call passes its own weights). Its nodes in order, each with its op,
    target and arguments (earlier nodes by position), then its inputs' dtypes, sizes, strides and devices."""
    position: dict[fx.Node, str] = {}
    lines = []
    for node in piece.graph.nodes:
        position[node] = f"%{len(position)}"
        if node.op == "placeholder":
            target = ""  # its target is its name
        elif node.op == "get_attr":  # a tensor the compiled code embeds: pieces share code only if they share it
            target = f"{node.target} id {id(operator.attrgetter(node.target)(piece))}"
        else:
            target = repr(node.target)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), position.__getitem__)
        lines.append(f"{node.op} {target} {args!r} {kwargs!r}")
    for value in inputs:
        if isinstance(value, torch.Tensor):
            lines.append(f"tensor {value.dtype} {value.device} {tuple(map(str, value.shape))} "
                         f"{tuple(map(str, value.stride()))} {value.storage_offset()}")
        else:
            lines.append(f"{type(value).__name__} {value}")
    return "\n".join(lines)
