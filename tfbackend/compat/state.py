"""Row surgery on Hugging Face generation state, for any cache class.

HF ``generate`` keeps a batch's state as its token ids and a dict of model keyword arguments (attention mask,
position ids, the cache object: ``DynamicCache`` with attention, sliding-window, linear-attention or conv layers,
a model's own cache class, a list of recurrent states...). Continuous batching needs three operations on that
state that HF has no API for: drop rows (sequences that finished), append rows (sequences that just prefilled)
and trim leading padding. All three are done here generically, on every tensor of the state whose first
dimension is the batch, whatever object holds it.

Rows are aligned on the right, as in HF's left-padded batches: the last column of every growing tensor is the
newest token of every row. Which dimension of a tensor grows with the sequence (the keys' sequence axis; none for
a convolution or SSM state), and which integer counters count the timeline (a sliding-window layer's
``cumulative_length``), is learnt once by ``StateLayout.learn`` from the states of two prompts of different lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers import PretrainedConfig

Path = tuple  # keys, attribute names and indices from the state's root to a value
_LEAF_TYPES = (str, bytes, bool, type(None), float, torch.dtype, torch.device)


def _children(obj: Any) -> Iterator[tuple[Any, Any]]:
    """(key, child) pairs of a container or of an object's attributes; nothing for leaves and opaque objects."""
    if isinstance(obj, dict):
        yield from obj.items()
    elif isinstance(obj, (list, tuple)):
        yield from enumerate(obj)
    elif isinstance(obj, (torch.Tensor, nn.Module, PretrainedConfig, type, int, *_LEAF_TYPES)) or callable(obj):
        return
    elif hasattr(obj, "__dict__"):
        yield from vars(obj).items()


def walk(obj: Any, path: Path = (), seen: set[int] | None = None) -> Iterator[tuple[Path, Any]]:
    """Every tensor and int inside ``obj`` with its path (each object visited once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, (torch.Tensor, int)) and not isinstance(obj, bool):
        yield path, obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for key, child in _children(obj):
        yield from walk(child, (*path, key), seen)


def rebuild(obj: Any, fn: Callable[[Path, Any], Any], path: Path = (), done: dict[int, Any] | None = None) -> Any:
    """``obj`` with every tensor and int ``v`` at path ``p`` replaced by ``fn(p, v)``; containers are rebuilt,
    objects updated in place (so a cache object keeps its identity and class)."""
    done = {} if done is None else done
    if isinstance(obj, (torch.Tensor, int)) and not isinstance(obj, bool):
        return fn(path, obj)
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, dict):
        result = type(obj)((k, rebuild(v, fn, (*path, k), done)) for k, v in obj.items())
    elif isinstance(obj, list):
        result = [rebuild(v, fn, (*path, i), done) for i, v in enumerate(obj)]
    elif isinstance(obj, tuple):
        items = [rebuild(v, fn, (*path, i), done) for i, v in enumerate(obj)]
        result = type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    elif any(True for _ in _children(obj)) and not isinstance(obj, tuple):
        done[id(obj)] = obj
        for key, child in list(vars(obj).items()):
            setattr(obj, key, rebuild(child, fn, (*path, key), done))
        return obj
    else:
        result = obj
    done[id(obj)] = result
    return result


def tensor_bytes(state: Any) -> int:
    return sum(v.numel() * v.element_size() for _, v in walk(state) if isinstance(v, torch.Tensor))


def per_row(value: Any, batch_size: int) -> bool:
    """Tensors with the batch as their first dimension: every per-sequence state HF keeps is at least 2-D."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch_size


@dataclass(frozen=True)
class StateLayout:
    """Which dimension of each per-row tensor grows with the sequence, and which ints count the timeline."""

    growing_dims: dict[Path, tuple[int, ...]]
    # How many columns past the newest token each growing dimension reaches: 1 for an attention mask that
    # already covers the token about to be generated, 0 for keys and values.
    lead: dict[tuple[Path, int], int]
    counters: frozenset[Path]
    fixed_bytes: int  # per sequence, whatever its length (recurrent and conv states)
    bytes_per_token: int

    @classmethod
    def learn(cls, short: Any, long: Any, short_len: int, long_len: int) -> StateLayout:
        """Compare the states of one sequence (batch of 1) of ``short_len`` and of ``long_len`` tokens."""
        short_leaves, long_leaves = dict(walk(short)), dict(walk(long))
        if short_leaves.keys() != long_leaves.keys():
            raise ValueError("the generation state has a different structure for prompts of different lengths")
        growing, lead, counters = {}, {}, set()
        short_bytes = long_bytes = 0
        for path, a in short_leaves.items():
            b = long_leaves[path]
            if isinstance(a, int):
                if b - a == long_len - short_len and a != b:
                    counters.add(path)
                continue
            if not per_row(a, 1):
                continue
            if a.dim() != b.dim():
                raise ValueError(f"state tensor {path} changes rank with the sequence length")
            growing[path] = tuple(d for d in range(1, a.dim()) if a.shape[d] != b.shape[d])
            lead.update({(path, d): a.shape[d] - short_len for d in growing[path]})
            short_bytes += a.numel() * a.element_size()
            long_bytes += b.numel() * b.element_size()
        per_token = max(0, (long_bytes - short_bytes) // (long_len - short_len))
        return cls(growing, lead, frozenset(counters), max(0, short_bytes - per_token * short_len), per_token)

    def sequence_bytes(self, num_tokens: int) -> int:
        return self.fixed_bytes + self.bytes_per_token * num_tokens

    def select_rows(self, state: Any, rows: torch.Tensor, batch_size: int) -> Any:
        """Keep only ``rows`` (indices into the batch) of every per-row tensor."""
        return rebuild(state, lambda path, v: v.index_select(0, rows.to(v.device)) if self._is_row(path, v, batch_size) else v)

    def concat_rows(self, states: list[Any], sizes: list[int]) -> Any:
        """The rows of every state in turn (``sizes[i]`` rows in ``states[i]``), in one copy per tensor, growing
        dimensions left-padded with zeros to the longest (padding is masked out). Counters take the largest value
        (the longest timeline). The result reuses the first state's objects (its cache keeps its identity)."""
        leaves = [dict(walk(state)) for state in states]
        for other in leaves[1:]:
            self._check_joinable(leaves[0], other, sizes[0])

        def join(path: Path, first: Any) -> Any:
            values = [state_leaves[path] for state_leaves in leaves]
            if isinstance(first, int):
                return max(values) if path in self.counters else first
            if not self._is_row(path, first, sizes[0]):
                return first
            return _cat_right_aligned(values, self.growing_dims.get(path, ()))

        return rebuild(states[0], join)

    def check_joinable(self, first: Any, second: Any, first_size: int) -> None:
        """Raise ValueError if ``second``'s rows cannot join ``first``'s (a shape the layout probe did not show)."""
        self._check_joinable(dict(walk(first)), dict(walk(second)), first_size)

    def _check_joinable(self, first: dict[Path, Any], second: dict[Path, Any], first_size: int) -> None:
        """Raise ValueError, before anything is modified, if the two states cannot be joined row-wise."""
        if first.keys() != second.keys():
            raise ValueError("the generation states differ in structure")
        for path, a in first.items():
            b = second[path]
            if isinstance(a, int) or isinstance(b, int):
                if path not in self.counters and a != b:
                    raise ValueError(f"the generation states disagree at {path}: {a} vs {b}")
            elif self._is_row(path, a, first_size):
                growing = self.growing_dims[path]
                if a.dim() != b.dim() or any(
                    a.shape[d] != b.shape[d] for d in range(1, a.dim()) if d not in growing
                ):
                    raise ValueError(f"state tensor {path} has shapes {tuple(a.shape)} and {tuple(b.shape)}")

    def trim(self, state: Any, timeline: int, drop: int, batch_size: int) -> Any:
        """Drop the first ``drop`` of ``timeline`` columns (padding in every row) from every growing tensor. A
        tensor of n columns ends ``lead`` columns past the timeline; one that holds only its last columns (a
        sliding window) loses only those of the dropped columns it holds."""

        def cut(path: Path, v: Any) -> Any:
            if isinstance(v, int):
                return v - drop if path in self.counters else v
            if not self._is_row(path, v, batch_size):
                return v
            for dim in self.growing_dims.get(path, ()):
                n = v.shape[dim]
                first_column = timeline + self.lead[path, dim] - n
                removed = min(n, max(0, drop - first_column))
                v = v.narrow(dim, removed, n - removed)
            return v

        return rebuild(state, cut)

    def _is_row(self, path: Path, value: Any, batch_size: int) -> bool:
        return path in self.growing_dims and per_row(value, batch_size)


def _cat_right_aligned(tensors: list[torch.Tensor], growing: tuple[int, ...]) -> torch.Tensor:
    """Concatenate along dimension 0, each tensor's growing dimensions right-aligned in zeros to the longest."""
    shape = list(tensors[0].shape)
    shape[0] = sum(t.shape[0] for t in tensors)
    for dim in growing:
        shape[dim] = max(t.shape[dim] for t in tensors)
    if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat([t.to(tensors[0].device) for t in tensors])
    out = tensors[0].new_zeros(shape)
    row = 0
    for tensor in tensors:
        target = out.narrow(0, row, tensor.shape[0])
        for dim in growing:
            target = target.narrow(dim, shape[dim] - tensor.shape[dim], tensor.shape[dim])
        target.copy_(tensor)
        row += tensor.shape[0]
    return out
