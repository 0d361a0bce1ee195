"""Tensor and pipeline parallelism for Hugging Face models (the Transformers fallback), applied in place.

**Tensor parallel.** The model's own plan says how to split it: ``base_model_tp_plan`` of its config and the
``_tp_plan`` of its class, which transformers merges into the instance's ``_tp_plan`` (module or parameter
name patterns -> a style). We read the plan and do the splitting ourselves, with our parallel layers and
collectives, so the HF modules keep running as written and attention still reaches the paged backend, now with
this rank's heads (the adapter's load-time probe then records the per-rank head counts by itself). The styles,
by transformers' names:

==============================================  ============================================================
``colwise``                                      a slice of the output features (of the heads, for q/k/v
                                                 projections: KV heads are replicated when fewer than ranks)
``rowwise``                                      the matching slice of the input features, outputs summed
``colwise_gather_output``, ``colwise_rep``       column slices whose outputs are gathered (replicated after)
``rowwise_split_input``, ``rowwise_rep``         row slices of a replicated input, outputs summed
``packed_colwise``                               fused projections (gate/up): a slice of each half
``moe_tp_experts``, ``all_reduce``               the module's output summed (its parameters have own entries)
``moe_identity_expert``                          its input divided by the rank count (the sum restores it)
``replicated_with_grad_allreduce``, ``replicate``,  nothing to do for inference
``mla_kv_a_proj``, ``local_params``
==============================================  ============================================================

A parameter entry (an MoE's 3-D expert weights) is cut in place: ``colwise`` along its output dimension,
``rowwise`` along its input dimension, ``packed_colwise`` each half of its output dimension. The input and
output embeddings are split by vocabulary whatever the plan says, when they are plain ``nn.Embedding`` /
bias-free ``nn.Linear`` (else they stay whole). A model without a plan gets one inferred from standard module
names (q/k/v with o_proj or out_proj, whose module's head counts such as ``num_heads`` then become this rank's;
gate/up with down_proj; GPT-2's fused ``c_attn`` with ``c_proj``, and ``c_fc`` with ``c_proj``), where a module's only linear children are exactly such a group and its other
children hold no weights (a norm over a projection's features would see only a slice). Anything else is
refused with the reason (``HFParallelLayout.refusal``, which the fallback's ``supports`` gives), found on an
empty (meta) copy before any weight is read.

**Pipeline parallel.** The config's ``base_model_pp_plan`` names the decoder layer list; a stage keeps its
own layers and stands in passthrough modules for the others (which hold no weights). The previous stage's
hidden states replace the input of the first local layer; the output of the last local layer is what the stage
sends on. Embeddings, final norm and LM head stay on every stage (they are cheap and keep the HF forward
intact); only the last stage's outputs are used.

Only this rank's share of the weights moves to the device: read from the memory-mapped checkpoint where its
tensors are the model's by name (``mapped_checkpoint.py``), else from a whole copy that transformers loads on
the CPU, the ranks of a node taking turns when host memory does not hold a copy per rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from tfbackend.distributed.comm import CommGroup
from tfbackend.distributed.layers import (
    ColumnParallelLinear,
    HeadSplit,
    OutputSlice,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    even_output,
    even_slice,
)
from tfbackend.distributed.mapped_checkpoint import detach_from_files, map_checkpoint
from tfbackend.distributed.pipeline import stage_layers
from tfbackend.distributed.state import ParallelContext, current_parallel
from tfbackend.model_interface import IntermediateTensors, UnsupportedModelError

# Styles with nothing to do in a forward pass without gradients.
_NO_OP_STYLES = {"replicated_with_grad_allreduce", "replicate", "mla_kv_a_proj", "local_params"}
# Vocabulary layers are split by their own rule (see the module docstring).
_VOCAB_STYLES = {"embedding_rowwise", "embedding_colwise"}
_QUERY_NAMES = ("q_proj", "query")
_KV_NAMES = ("k_proj", "v_proj", "key", "value")
# Inferred plans: a module whose linear children are exactly one of these groups gets the styles shown.
# "heads_colwise": colwise by heads, and the module's head counts (num_heads...) become this rank's.
_INFERRED_GROUPS: list[dict[str, str]] = [
    {"q_proj": "heads_colwise", "k_proj": "heads_colwise", "v_proj": "heads_colwise", "o_proj": "rowwise"},
    {"q_proj": "heads_colwise", "k_proj": "heads_colwise", "v_proj": "heads_colwise", "out_proj": "rowwise"},
    {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"},
    {"up_proj": "colwise", "down_proj": "rowwise"},
    {"c_attn": "fused_qkv", "c_proj": "rowwise"},  # GPT-2: one Conv1D for q|k|v, split by its split_size
    {"c_fc": "colwise", "c_proj": "rowwise"},
]
# Host memory that loading may take, as a fraction of what is available.
_HOST_MEMORY_SHARE = 0.8

Action = Callable[[], None]

logger = logging.getLogger(__name__)


class HFParallelLayout:
    """How this rank builds its share of an HF model: ``refusal`` checks the model can be split (the fallback's
    ``supports`` asks it), ``load`` loads this rank's share. On a single process ``load`` is
    transformers' own."""

    def __init__(self, model_dir: str | Path, device: torch.device):
        self.parallel = current_parallel()
        self.device = device
        self.model_dir = Path(model_dir)
        self.active = self.parallel.world_size > 1

    @staticmethod
    def refusal(hf_class: type, hf_config) -> str | None:
        """Why this rank's context cannot split the model (found on an empty copy), or None."""
        parallel = current_parallel()
        if parallel.world_size == 1:
            return None
        with torch.device("meta"):
            empty = hf_class._from_config(hf_config)
        try:
            _tensor_parallel_actions(empty, parallel.tp)
            if parallel.pp_size > 1:
                _pipeline_plan(empty)
        except ValueError as error:  # UnsupportedModelError, or sizes that do not divide
            return str(error)
        return None

    def load(self, from_pretrained: Callable[[torch.device], nn.Module], hf_class: type, hf_config,
             dtype: torch.dtype, attn_implementation: str) -> tuple[nn.Module, HFPipelineStage | None]:
        """This rank's share of the model on the device, and its pipeline stage if any.

        One process: ``from_pretrained`` onto the device. Several ranks: the model is built with its parameters
        viewing the checkpoint files (``map_checkpoint``), so cutting it reads and copies only this rank's
        share; where transformers would convert the checkpoint's tensors, ``from_pretrained`` loads the whole
        model on the CPU instead, in turns that host memory holds, and the rank cuts that copy."""
        if not self.active:
            return from_pretrained(self.device).eval().requires_grad_(False), None
        mapped = map_checkpoint(hf_class, hf_config, self.model_dir, dtype, attn_implementation)
        if mapped is not None:
            hf_model, storages = mapped
            stage = self._apply(hf_model)
            detach_from_files(hf_model, storages)
            logger.info("%s: this rank's share read from the memory-mapped checkpoint", hf_class.__name__)
            return hf_model, stage
        with self._loading_turn():
            hf_model = from_pretrained(torch.device("cpu")).eval().requires_grad_(False)
            return hf_model, self._apply(hf_model)

    @contextlib.contextmanager
    def _loading_turn(self) -> Iterator[None]:
        """Load inside this block: ranks of a node take turns in groups that host memory can hold at once."""
        parallel = self.parallel
        at_once = parallel.min_over_ranks(max(1, int(_available_host_bytes() * _HOST_MEMORY_SHARE
                                                     // max(1, _checkpoint_bytes(self.model_dir)))))
        turns, mine = math.ceil(parallel.local_size / at_once), parallel.local_rank // at_once
        for _ in range(mine):
            dist.barrier(group=parallel.world_cpu)
        try:
            yield
        finally:
            for _ in range(mine, turns):
                dist.barrier(group=parallel.world_cpu)

    def _apply(self, hf_model: nn.Module) -> HFPipelineStage | None:
        """Cut the loaded model to this rank's share and move it to the device; the pipeline stage, if any."""
        stage = HFPipelineStage(hf_model, self.parallel) if self.parallel.pp_size > 1 else None
        # The split layers are built on the device and filled straight from the loaded (or mapped) tensors:
        # building them on the host first and moving the model after ran 3x slower (benchmarks/load_probe.py).
        with torch.device(self.device):
            for action in _tensor_parallel_actions(hf_model, self.parallel.tp):
                action()
        hf_model.to(self.device)
        return stage


# ---- tensor parallel --------------------------------------------------------------------------------------


def _tensor_parallel_actions(hf_model: nn.Module, tp: CommGroup) -> list[Action]:
    """What splitting ``hf_model`` takes, one action per module or parameter; raises if it cannot be split."""
    if tp.size == 1:
        return []
    plan = _tensor_parallel_plan(hf_model)
    modules = dict(hf_model.named_modules())
    parameters = dict(hf_model.named_parameters())
    actions = _vocabulary_actions(hf_model, tp)
    for pattern, style in plan.items():
        if style in _NO_OP_STYLES:
            continue
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        for name in [n for n in modules if regex.fullmatch(n)]:
            actions.append(_module_action(hf_model, modules, name, style, tp))
        for name in [n for n in parameters if regex.fullmatch(n)]:
            actions.append(_parameter_action(modules, name, style, tp))
    return actions


def _tensor_parallel_plan(hf_model: nn.Module) -> dict[str, str]:
    """The model's plan (names relative to ``hf_model``; embeddings excluded), else one inferred from standard
    names when the model declares none at all."""
    declared = getattr(hf_model, "_tp_plan", None) or {}
    if declared:
        vocabulary = _vocabulary_names(hf_model)
        return {name: style for name, style in declared.items() if style not in _VOCAB_STYLES and name not in vocabulary}
    plan = {}
    for name, module in hf_model.named_modules():
        children = dict(module.named_children())
        linear = {child for child, sub in children.items() if _is_linear(sub)}
        group = next((g for g in _INFERRED_GROUPS if linear == set(g)), None)
        # Only where nothing else in the module has weights (a norm over a split projection would see a part of
        # it, per-head parameters such as attention sinks would not be split).
        others = [sub for child, sub in children.items() if child not in linear]
        weighted = next(module.parameters(recurse=False), None) is not None or any(
            next(sub.parameters(), None) is not None for sub in others)
        if group is not None and not weighted:
            plan.update({f"{name}.{child}" if name else child: style for child, style in group.items()})
    if not plan:
        raise UnsupportedModelError(
            f"{type(hf_model).__name__} has no tensor-parallel plan (base_model_tp_plan) and no standard "
            f"projection names (q/k/v/o_proj, gate/up/down_proj) to infer one from"
        )
    return plan


def _vocabulary_names(hf_model: nn.Module) -> set[str]:
    layers = {id(hf_model.get_input_embeddings()), id(hf_model.get_output_embeddings())}
    return {name for name, module in hf_model.named_modules() if id(module) in layers}


def _vocabulary_actions(hf_model: nn.Module, tp: CommGroup) -> list[Action]:
    """Split the input embedding and the LM head by vocabulary rows when both (or the only one) are plain;
    tied ones share the split weight."""
    embedding, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    embedding_ok = type(embedding) is nn.Embedding and embedding.max_norm is None
    head_ok = head is not None and type(head) is nn.Linear and head.bias is None
    tied = head is not None and head.weight is embedding.weight
    if tied and not (embedding_ok and head_ok):
        return []
    actions = []
    new_embedding = None
    if embedding_ok:
        new_embedding = VocabParallelEmbedding(embedding.num_embeddings, embedding.embedding_dim, tp)

        def split_embedding() -> None:
            new_embedding.to(embedding.weight.dtype).load_full(embedding.weight.data)
            _replace(hf_model, embedding, new_embedding)

        actions.append(split_embedding)
    if head_ok:

        def split_head() -> None:
            new_head = ParallelLMHead(head.out_features, head.in_features, tp).to(head.weight.dtype)
            if tied:
                new_head.weight = new_embedding.weight
            else:
                new_head.load_full(head.weight.data)
            _replace(hf_model, head, new_head)

        actions.append(split_head)
    return actions


def _module_action(hf_model: nn.Module, modules: dict[str, nn.Module], name: str, style: str, tp: CommGroup) -> Action:
    module = modules[name]
    parent_name, _, leaf = name.rpartition(".")
    parent = modules[parent_name]
    if style in ("moe_tp_experts", "all_reduce"):
        return lambda: module.register_forward_hook(lambda _, args, output: tp.all_reduce(output))
    if style == "moe_identity_expert":
        return lambda: module.register_forward_pre_hook(lambda _, args: (args[0] / tp.size, *args[1:]))
    if not _is_linear(module):
        raise UnsupportedModelError(f"tensor-parallel style {style!r} of {name} needs a linear layer, not "
                                    f"{type(module).__name__}")
    out_features, in_features = _linear_weights(module)[0].shape
    has_bias = module.bias is not None
    what = f"the output features of {name}"
    if style in ("rowwise", "rowwise_split_input", "rowwise_rep"):
        even_slice(in_features, tp, f"the input features of {name}")

        def build() -> nn.Module:
            return RowParallelLinear(in_features, out_features, has_bias, tp, input_is_parallel=style == "rowwise")
    elif style in ("colwise", "colwise_gather_output", "colwise_rep", "heads_colwise"):
        slices = [_column_slice(modules, parent_name, leaf, out_features, tp, what)]

        def build() -> nn.Module:
            return ColumnParallelLinear(in_features, slices, has_bias, tp, gather_output=style.startswith("colwise_"))
    elif style == "packed_colwise":
        if out_features % 2:
            raise UnsupportedModelError(f"{name} packs two projections into an odd {out_features} features")
        slices = [even_output(None, out_features // 2, tp, what)] * 2

        def build() -> nn.Module:
            return ColumnParallelLinear(in_features, slices, has_bias, tp)
    elif style == "fused_qkv":  # q|k|v of equal widths, split by the module's split_size (GPT-2)
        width = getattr(parent, "split_size", None)
        if width is None or 3 * width != out_features:
            raise UnsupportedModelError(f"{name} is not three projections of its split_size laid end to end")
        heads = width // _head_dim(parent, width)
        split = _head_split(heads, heads, tp, name)
        slices = [split.query(None, width // heads)] * 3

        def build() -> nn.Module:
            return ColumnParallelLinear(in_features, slices, has_bias, tp)
    else:
        raise UnsupportedModelError(f"{name} asks for tensor-parallel style {style!r}, which tfbackend does not implement")

    def split() -> None:
        weight, bias = _linear_weights(module)
        layer = build().to(weight.dtype).load_full(weight, bias)
        setattr(parent, leaf, layer)
        if style == "fused_qkv":  # GPT-2 splits its c_attn output by this
            parent.split_size = layer.out_features // 3
        if style == "heads_colwise" and leaf in _QUERY_NAMES + _KV_NAMES:
            _localize_head_counts(parent, leaf, layer.out_features)

    return split


def _localize_head_counts(attention: nn.Module, leaf: str, local_features: int) -> None:
    """Attention modules of models without a plan may shape their heads by these attributes (OPT does)."""
    names = ("num_heads", "num_attention_heads") if leaf in _QUERY_NAMES else ("num_key_value_heads", "num_kv_heads")
    for name in names:
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, local_features // attention.head_dim)


def _head_split(num_heads: int, num_kv_heads: int, tp: CommGroup, where: str) -> HeadSplit:
    try:
        return HeadSplit.of(num_heads, num_kv_heads, tp)
    except ValueError as error:
        raise UnsupportedModelError(f"{where}: {error}") from None


def _column_slice(modules, parent_name: str, leaf: str, out_features: int, tp: CommGroup, what: str) -> OutputSlice:
    """This rank's output features of a column-parallel projection: whole heads for query/key/value."""
    if leaf not in _QUERY_NAMES + _KV_NAMES:
        return even_output(None, out_features, tp, what)
    parent = modules[parent_name]
    head_dim = _head_dim(parent, out_features)
    counts = {}
    for names in (_QUERY_NAMES, _KV_NAMES):
        sibling = next((getattr(parent, n) for n in names if _is_linear(getattr(parent, n, None))), None)
        counts[names] = (_linear_weights(sibling)[0].shape[0] if sibling is not None else out_features) // head_dim
    heads = _head_split(counts[_QUERY_NAMES], counts[_KV_NAMES], tp, parent_name)
    return heads.query(None, head_dim) if leaf in _QUERY_NAMES else heads.key_value(None, head_dim)


def _head_dim(attention: nn.Module, width: int) -> int:
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or width % head_dim:
        raise UnsupportedModelError(
            f"{type(attention).__name__} has no head_dim that divides its projections ({width} features), "
            f"so its heads cannot be split"
        )
    return head_dim


def _parameter_action(modules: dict[str, nn.Module], name: str, style: str, tp: CommGroup) -> Action:
    module_name, _, leaf = name.rpartition(".")
    module = modules[module_name]
    param = getattr(module, leaf)
    dim = param.dim() - 2 if param.dim() >= 2 else 0
    if style == "rowwise":
        if param.dim() < 2:
            return lambda: None  # a bias, added after the sum
        dim = param.dim() - 1
    elif style not in ("colwise", "packed_colwise"):
        raise UnsupportedModelError(f"{name} asks for tensor-parallel style {style!r} on a parameter, which "
                                    f"tfbackend does not implement")
    parts = 2 if style == "packed_colwise" else 1
    full = param.shape[dim] // parts
    if param.shape[dim] % parts:
        raise UnsupportedModelError(f"{name} packs {parts} projections into {param.shape[dim]} features")
    start, size = even_slice(full, tp, f"dimension {dim} of {name}")

    def split() -> None:
        halves = param.data.split(full, dim=dim)
        local = torch.cat([half.narrow(dim, start, size) for half in halves], dim=dim).clone()
        module._parameters[leaf] = nn.Parameter(local, requires_grad=False)

    return split


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (which stores W^T)."""
    weight = module.weight.data if isinstance(module, nn.Linear) else module.weight.data.t()
    return weight, None if module.bias is None else module.bias.data


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is attached under ``root``."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)


# ---- pipeline parallel ------------------------------------------------------------------------------------


class _MissingLayer(nn.Module):
    """Stands in for a decoder layer of another stage: passes the hidden states through, holds no weights, and
    keeps the layer's plain attributes (e.g. ``attention_type``) that the model's forward may read."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
                setattr(self, key, value)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _pipeline_plan(hf_model: nn.Module) -> tuple[nn.Module, str]:
    """``(the module holding the decoder layer list, the list's attribute name)`` from ``base_model_pp_plan``."""
    plan = getattr(hf_model.config.get_text_config(), "base_model_pp_plan", None) or {}
    for root in hf_model.modules():
        for name in plan:
            if isinstance(getattr(root, name, None), nn.ModuleList):
                return root, name
    raise UnsupportedModelError(
        f"{type(hf_model).__name__} has no pipeline-parallel plan (base_model_pp_plan) naming its decoder layers"
    )


class HFPipelineStage:
    """One pipeline stage of an HF model: its own decoder layers, stand-ins for the others, and hooks that
    feed the received hidden states into the first local layer and catch the output of the last one."""

    def __init__(self, hf_model: nn.Module, parallel: ParallelContext):
        root, name = _pipeline_plan(hf_model)
        layers: nn.ModuleList = getattr(root, name)
        self.local = stage_layers(len(layers), parallel.pp_rank, parallel.pp_size)
        self.is_last = parallel.is_last_stage
        for index in range(len(layers)):
            if index not in self.local:
                layers[index] = _MissingLayer(layers[index])
        self.incoming: torch.Tensor | None = None
        self.outgoing: torch.Tensor | None = None
        layers[self.local.start].register_forward_pre_hook(self._feed, with_kwargs=True)
        layers[self.local.stop - 1].register_forward_hook(self._catch)

    def _feed(self, module, args, kwargs):
        if self.incoming is None:  # the first stage, or the adapter's load checks: the layer's own input
            return None
        hidden = self.incoming.unsqueeze(0)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _catch(self, module, args, output) -> None:
        self.outgoing = (output[0] if isinstance(output, tuple) else output)[0]

    def forward(self, run_model: Callable[[], torch.Tensor], intermediate: IntermediateTensors | None):
        """Run the model with this stage's input; the last stage's hidden states, else what to send on."""
        self.incoming = None if intermediate is None else intermediate["hidden"]
        try:
            hidden = run_model()
        finally:
            self.incoming = None
        if self.is_last:
            return hidden
        outgoing, self.outgoing = self.outgoing, None
        return {"hidden": outgoing}


# ---- host memory ------------------------------------------------------------------------------------------


def _checkpoint_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.iterdir() if path.suffix in (".safetensors", ".bin"))


def _available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (free memory plus what the page cache would give back)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
