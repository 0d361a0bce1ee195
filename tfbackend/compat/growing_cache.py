"""Keys and values that grow in place: HF's ``DynamicLayer`` without a copy of the whole cache per step.

``DynamicLayer.update`` appends a step's keys with ``torch.cat``, so every decode step copies every layer's
whole cache (and, on CPU, maps fresh pages for it): on a batch of long rows that costs more than the forward.
``GrowingLayer`` keeps its keys and values as views of buffers with room for more columns and writes a step's
tokens into that room. The tensors the model sees (and the compat tier's state surgery walks) are those views,
with exactly the values ``DynamicLayer`` would hold: selecting rows, joining batches or trimming padding makes
new tensors, which the next update moves into a new buffer with room again.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache, DynamicLayer

from tfbackend.model_interface import SequenceStateSpec

# Room a buffer gets past its tokens: an eighth of them, at least MIN_ROOM columns. Copies of a row's cache then
# cost about 8 columns per step instead of all of them; memory, at most an eighth more (``with_room``).
MIN_ROOM = 32
ROOM_DIVISOR = 8


def room(length: int) -> int:
    """Columns a new buffer gets past a cache of ``length`` tokens."""
    return max(MIN_ROOM, length // ROOM_DIVISOR)


def with_room(spec: SequenceStateSpec) -> SequenceStateSpec:
    """``spec`` (a sequence's state as its prefill leaves it) with the room its caches may hold past their
    tokens counted: a buffer of n tokens holds at most n + ``room(n)`` <= n * (1 + 1/ROOM_DIVISOR) + MIN_ROOM."""
    per_token = spec.bytes_per_token
    return dataclasses.replace(spec, fixed_bytes=spec.fixed_bytes + MIN_ROOM * per_token,
                               bytes_per_token=per_token + -(-per_token // ROOM_DIVISOR))


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose update writes into preallocated room instead of concatenating."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = _append(self.keys, key_states)
        self.values = _append(self.values, value_states)
        return self.keys, self.values


def use_growing_layers(cache: DynamicCache) -> DynamicCache:
    """Make the plain attention layers of ``cache`` (built, or built on first use) grow in place."""
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def _append(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cache`` with ``new`` appended along dimension -2; in place when ``cache`` is the start of a buffer
    with room for it."""
    if cache.numel() == 0:  # the prefill: a copy of its keys, as DynamicLayer makes (a decode step makes room)
        return new.clone(memory_format=torch.contiguous_format)
    length, added = cache.shape[-2], new.shape[-2]
    grown = _extended(cache, length + added)
    if grown is None:
        grown = cache.new_empty((*cache.shape[:-2], length + added + room(length), cache.shape[-1])).narrow(-2, 0, length + added)
        grown.narrow(-2, 0, length).copy_(cache)
    grown.narrow(-2, length, added).copy_(new)
    return grown


def _extended(cache: torch.Tensor, length: int) -> torch.Tensor | None:
    """``cache`` extended to ``length`` columns (dimension -2) within its storage, if it is the start of a
    buffer of [..., capacity, width] as ``_append`` allocates, with capacity >= ``length``; else None. Views
    made under inference mode do not record their base, so the buffer is recognised by its strides. Writing past
    the view's end is safe because a layer's tensors are its own: its prefill copy, buffers ``_append`` made,
    or new tensors from the compat tier's row surgery."""
    if cache.dim() < 3 or cache.storage_offset() != 0:
        return None
    *outer, _, width = cache.shape
    capacity = cache.stride(-3) // max(width, 1)
    strides, step = [], 1
    for size in reversed((*outer, capacity, width)):
        strides.insert(0, step)
        step *= size
    if capacity < length or tuple(strides) != cache.stride():
        return None
    if cache.untyped_storage().nbytes() < step * cache.element_size():
        return None
    return cache.as_strided((*outer, length, width), cache.stride())
