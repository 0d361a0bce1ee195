"""Tensor-parallel layers: each rank holds a slice of a weight and the forward pass sums or gathers the slices.

* ``ColumnParallelLinear``: a slice of the output features (rows of W); the output stays split, so what
  follows must work per feature (an activation, attention per head). Fused projections (q/k/v, gate/up) are
  one such layer holding a slice of each part, so they stay one matmul per rank.
* ``RowParallelLinear``: the matching slice of the input features (columns of W); the partial products are
  all-reduced and the bias is added once, after the sum.
* ``VocabParallelEmbedding`` and ``vocab_parallel_logits``: a slice of the vocabulary each; lookups of ids
  outside the slice give zeros and the sum over ranks completes them; logit slices are gathered.

On one rank every layer is the plain operation, with the same arithmetic as ``nn.Linear`` / ``F.embedding``.
Layers that load from checkpoints name the tensors they need in ``checkpoint_views`` (see
``tfbackend.native.layers.NativeCausalLM.checkpoint_targets``): the full tensor is read and ``take`` cuts this
rank's slice from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F

from tfbackend.distributed.comm import CommGroup

Take = Callable[[torch.Tensor], torch.Tensor]  # full checkpoint tensor -> the part a parameter holds
CheckpointView = tuple[str, torch.Tensor, Take | None]  # checkpoint name, the tensor it fills, what to cut first


@dataclass(frozen=True)
class OutputSlice:
    """Rows ``start:start + size`` of one projection of ``full`` output features that a column-parallel
    layer holds.

    ``name``: the checkpoint name of that projection relative to the layer's parent module (``"q_proj"``), or
    None for a layer that is itself one projection.
    """

    name: str | None
    start: int
    size: int
    full: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(0, self.start, self.size)


def even_slice(total: int, tp: CommGroup, what: str) -> tuple[int, int]:
    """``(start, size)`` of this rank's equal share of ``total`` features; raises unless they divide evenly."""
    if total % tp.size:
        raise ValueError(f"{what} ({total}) cannot be split evenly over {tp.size} tensor-parallel ranks")
    size = total // tp.size
    return tp.rank * size, size


def even_output(name: str | None, full: int, tp: CommGroup, what: str) -> OutputSlice:
    """This rank's equal share of a projection's ``full`` output features."""
    return OutputSlice(name, *even_slice(full, tp, what), full)


@dataclass(frozen=True)
class HeadSplit:
    """Which attention heads one rank computes: a contiguous run of query heads and the KV heads they read.

    With fewer KV heads than ranks each KV head is replicated on ``tp / num_kv_heads`` ranks (those whose
    query heads read it), so every rank still holds exactly one.
    """

    num_heads: int
    num_kv_heads: int
    q_start: int
    num_q: int
    kv_start: int
    num_kv: int

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, tp: CommGroup) -> HeadSplit:
        check_head_split(num_heads, num_kv_heads, tp.size)
        num_q = num_heads // tp.size
        if num_kv_heads % tp.size == 0:
            num_kv = num_kv_heads // tp.size
            return cls(num_heads, num_kv_heads, tp.rank * num_q, num_q, tp.rank * num_kv, num_kv)
        return cls(num_heads, num_kv_heads, tp.rank * num_q, num_q, tp.rank * num_kv_heads // tp.size, 1)

    def query(self, name: str | None, head_dim: int) -> OutputSlice:
        """This rank's query heads of a projection with ``head_dim`` features per head."""
        return OutputSlice(name, self.q_start * head_dim, self.num_q * head_dim, self.num_heads * head_dim)

    def key_value(self, name: str | None, head_dim: int) -> OutputSlice:
        """This rank's KV heads of a key or value projection with ``head_dim`` features per head."""
        return OutputSlice(name, self.kv_start * head_dim, self.num_kv * head_dim, self.num_kv_heads * head_dim)


def check_head_split(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Raise ValueError unless ``tp_size`` ranks can share the heads: query heads split evenly, and KV heads
    either split evenly or (fewer KV heads than ranks) replicated evenly."""
    if num_heads % tp_size:
        raise ValueError(
            f"{num_heads} attention heads cannot be split evenly over {tp_size} tensor-parallel ranks: "
            f"choose a tensor_parallel_size that divides {num_heads}"
        )
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"{num_kv_heads} key/value heads can be neither split nor replicated evenly over {tp_size} "
            f"tensor-parallel ranks: choose a tensor_parallel_size that divides {num_kv_heads} or is a "
            f"multiple of it"
        )


class ColumnParallelLinear(nn.Module):
    """``x W^T + b`` for this rank's slices of one or more projections' output features, in one matmul.

    ``slices`` lists what the layer holds, in output order: for fused q/k/v, three slices of the checkpoint's
    q_proj, k_proj and v_proj. ``gather_output`` all-gathers the result, so every rank gets all features.
    """

    def __init__(
        self, in_features: int, slices: list[OutputSlice], bias: bool, tp: CommGroup, gather_output: bool = False
    ):
        super().__init__()
        self.in_features = in_features
        self.slices = slices
        self.output_sizes = [s.size for s in slices]
        self.out_features = sum(self.output_sizes)
        self.tp = tp
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self.tp.all_gather(y) if self.gather_output else y

    def checkpoint_views(self, module_name: str, leaf: str, param: torch.Tensor) -> Iterator[CheckpointView]:
        parent = module_name.rpartition(".")[0]
        for s, offset in zip(self.slices, accumulate([0, *self.output_sizes])):
            name = _dotted(module_name, leaf) if s.name is None else _dotted(parent, s.name, leaf)
            yield name, param.data.narrow(0, offset, s.size), s.take

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None) -> ColumnParallelLinear:
        """Fill from the unsplit weight and bias of an existing layer whose output features are the full
        projections of ``slices`` laid end to end."""
        full_sizes = [s.full for s in self.slices]
        for param, full in ((self.weight, weight), (self.bias, bias)):
            if param is not None:  # each slice copied into its rows: no host-side concatenation first
                parts = full.split(full_sizes, dim=0)
                for s, part, offset in zip(self.slices, parts, accumulate([0, *self.output_sizes])):
                    param.narrow(0, offset, s.size).copy_(s.take(part))
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (rank {self.tp.rank} of {self.tp.size})"


class RowParallelLinear(nn.Module):
    """``x W^T + b`` where this rank holds columns ``start:start + size`` of W; the partial products of all
    ranks are summed and the (replicated) bias is added once.

    ``input_is_parallel``: ``x`` is already this rank's slice of the input features (the output of a
    column-parallel layer), else the full input, which the layer slices itself.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: CommGroup, input_is_parallel: bool = True):
        super().__init__()
        self.start, self.size = even_slice(in_features, tp, "the input features of a row-parallel layer")
        self.in_features, self.out_features = in_features, out_features
        self.tp = tp
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, self.size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp.size > 1:
            x = x.narrow(-1, self.start, self.size)
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(-1, self.start, self.size)

    def checkpoint_views(self, module_name: str, leaf: str, param: torch.Tensor) -> Iterator[CheckpointView]:
        yield _dotted(module_name, leaf), param.data, (self.take if leaf == "weight" else _whole)

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None) -> RowParallelLinear:
        self.weight.copy_(self.take(weight))
        if self.bias is not None:
            self.bias.copy_(bias)
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (rank {self.tp.rank} of {self.tp.size})"


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by rows: rank r holds ids ``r * n : (r + 1) * n`` of the vocabulary padded
    to a multiple of the rank count (padding rows are zeros and never looked up)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: CommGroup):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tp = num_embeddings, embedding_dim, tp
        self.rows = -(-num_embeddings // tp.size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full ``[vocab, dim]`` table, zero-padded past the vocabulary's end."""
        rows = full[self.start : self.start + self.rows]
        if rows.shape[0] < self.rows:
            rows = torch.cat([rows, rows.new_zeros(self.rows - rows.shape[0], *rows.shape[1:])])
        return rows

    def checkpoint_views(self, module_name: str, leaf: str, param: torch.Tensor) -> Iterator[CheckpointView]:
        yield _dotted(module_name, leaf), param.data, self.take

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor) -> VocabParallelEmbedding:
        self.weight.copy_(self.take(weight))
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (rows {self.start}+{self.rows}, rank {self.tp.rank})"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to the vocabulary, split by rows like ``VocabParallelEmbedding`` (whose weight it
    shares when embeddings are tied); calling it gives the full logits on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logits(hidden, self.weight, self.tp, self.num_embeddings)


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, tp: CommGroup, vocab_size: int) -> torch.Tensor:
    """``hidden[N, H]`` times this rank's rows of the output embedding, gathered: ``logits[N, vocab_size]``."""
    logits = F.linear(hidden, weight)
    if tp.size == 1:
        return logits
    return tp.all_gather(logits)[..., :vocab_size]


def _whole(full: torch.Tensor) -> torch.Tensor:
    return full


def _dotted(*parts: str) -> str:
    return ".".join(part for part in parts if part)
