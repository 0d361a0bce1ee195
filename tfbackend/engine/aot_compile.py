"""Ahead-of-time compilation: the compiled forward saved to disk, so that a warm start skips dynamo's trace too.

Inductor's and Triton's caches (``compile_cache.py``) spare a second start the code generation, not dynamo's
trace of the model: 5-15 s of a warm start on a GPU machine, the larger part of it. torch's precompile
(``torch.compile(...).aot_compile``) traces the whole model once and saves what dynamo made of it (the
transformed bytecode, the guards) together with the backend's output, provided that output can serialize
itself. Ours can (``PiecewiseArtifact``): the graph split at the attention calls, and each distinct piece's
Inductor output as a standalone artifact (``torch._inductor.standalone_compile``). Loading it runs no trace and
no compile, only the loads.

The artifact is keyed by everything the compiled code depends on (``compile_cache.aot_artifact_path``): the
model's class and config, dtype, device, ranks, quantization and the versions of torch, triton, transformers and
this package's own sources. Guards on object identities (which no other process can satisfy) are not saved; the key stands in
for them. torch calls these APIs experimental: whatever fails here (an older torch, a model that does not trace
as one graph, a guard that cannot be saved, a saved function whose guards reject the inputs) falls back to the
plain torch.compile path, with a log line saying why.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from tfbackend.engine.piecewise_compile import compile_pieces, install_piece, split_at_attention

logger = logging.getLogger(__name__)

try:  # torch's precompile API (2.10+); without it, nothing here is used
    from torch._dynamo.aot_compile import SerializableCallable
except ImportError:  # pragma: no cover - depends on the installed torch
    SerializableCallable = object


class PiecewiseArtifact(SerializableCallable):
    """The piecewise backend's output in a form torch's precompile can save: the dynamo graph split at its
    attention calls (``split``), each distinct piece compiled by ``torch._inductor.standalone_compile``
    (``artifacts``; ``pieces`` maps each compiled piece's target in ``split`` to its artifact). A graph without
    attention calls is one artifact, ``split`` None."""

    def __init__(self, split: fx.GraphModule | None, pieces: dict[str, int], artifacts: list[Any]):
        self.split = split
        self.pieces = pieces
        self.artifacts = artifacts
        self.run = split if split is not None else artifacts[0]

    def __call__(self, *args: Any) -> Any:
        return self.run(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: PiecewiseArtifact) -> bytes:
        from torch.fx._graph_pickler import GraphPickler, Options

        split = None
        if fn.split is not None:
            # The split graph itself, not dynamo's: splitting again needs the tracing metadata (which symbolic
            # sizes each piece takes), and fake tensors do not pickle. Its pieces without the compiled
            # functions that shadow them (the artifacts are saved apart).
            for module in fn.split.modules():
                for node in module.graph.nodes:
                    for key in ("example_value", "val", "source_fn_stack", "nn_module_stack"):
                        node.meta.pop(key, None)
            compiled = {target: fn.split.__dict__.pop(target) for target in fn.pieces}
            try:
                split = GraphPickler.dumps(fn.split, Options(ops_filter=None))
            finally:
                fn.split.__dict__.update(compiled)
        return pickle.dumps({
            "split": split, "pieces": fn.pieces,
            "artifacts": [(piece.artifact.serialize(), piece.single_output) for piece in fn.artifacts],
        })

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> PiecewiseArtifact:
        from torch._inductor.standalone_compile import AOTCompiledArtifact
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        state = pickle.loads(data)
        artifacts = [_Piece(AOTCompiledArtifact.deserialize(raw), single) for raw, single in state["artifacts"]]
        split = None
        if state["split"] is not None:
            split = GraphPickler.loads(state["split"], FakeTensorMode(shape_env=ShapeEnv()))
            for module in split.modules():  # their code is generated, not pickled
                module.recompile()
            for target, index in state["pieces"].items():
                install_piece(split, target, artifacts[index])
        return cls(split, state["pieces"], artifacts)


class _Piece:
    """A piece's artifact, called as the piece was: a loaded artifact returns its outputs as a list, where the
    piece (a submodule of ``split_module``) returns its only output as itself."""

    def __init__(self, artifact: Any, single_output: bool):
        self.artifact, self.single_output = artifact, single_output

    def __call__(self, *args: Any) -> Any:
        out = self.artifact(*args)
        return out[0] if self.single_output and isinstance(out, (list, tuple)) else out


def _returns_one_value(piece: fx.GraphModule) -> bool:
    output = next(node for node in reversed(piece.graph.nodes) if node.op == "output")
    return not isinstance(output.args[0], (tuple, list))


def piecewise_standalone(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> PiecewiseArtifact:
    """The AOT backend: ``piecewise_inductor``'s pieces, each compiled as a standalone (saveable) artifact."""
    from torch._inductor import standalone_compile

    def compile_piece(piece: fx.GraphModule, inputs: list[Any]) -> Any:
        single_output = _returns_one_value(piece)
        return _Piece(standalone_compile(piece, inputs, dynamic_shapes="from_tracing_context", aot=True),
                      single_output)

    split = split_at_attention(gm)
    if split is None:
        return PiecewiseArtifact(None, {}, [compile_piece(gm, list(example_inputs))])
    pieces, artifacts = compile_pieces(split, example_inputs, compile_piece)
    return PiecewiseArtifact(split, pieces, artifacts)


def _serializable_guards(entries) -> list[bool]:
    """Keep the guards another process can check: not those on object identities or globals (the artifact's key
    stands in for them)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaveable = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [not (entry.is_global or entry.guard_type in unsaveable
                 or unsaveable.intersection(entry.derived_guard_types or ()))
            for entry in entries]


def _precompile_enabled():
    """torch 2.11 keeps precompile behind a dynamo flag that is off by default (2.13 turns it on):
    ``torch.compile`` gives its wrapper ``aot_compile`` only while the flag is on."""
    return torch._dynamo.config.patch(enable_aot_compile=True)


def compile_and_save(forward: Callable[..., Any], example_args: tuple[Any, ...], path: Path) -> Callable[..., Any]:
    """Trace ``forward`` (a bound method) as one graph for ``example_args``, compile it piecewise, save it to
    ``path``; returns the compiled function, called as ``fn(module, *args)``. Raises if any of it fails."""
    with _precompile_enabled():
        compiled = torch.compile(forward, fullgraph=True, dynamic=True, backend=piecewise_standalone,
                                 options={"guard_filter_fn": _serializable_guards})
        function = compiled.aot_compile((example_args, {}))
        path.parent.mkdir(parents=True, exist_ok=True)
        function.save_compiled_function(str(path))  # written atomically
    return function


def load(path: Path, forward: Callable[..., Any]) -> Callable[..., Any]:
    """The function ``compile_and_save`` saved to ``path``, for the method ``forward`` of a module."""
    with _precompile_enabled(), open(path, "rb") as file:
        return torch.compiler.load_compiled_function(file, f_globals=forward.__func__.__globals__)
