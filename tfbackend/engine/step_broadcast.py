"""Each step's inputs, from the driver to every other rank, without pickling.

The driver flattens a step once (``model_runner.flatten_step``); the other ranks need the very same arrays.
They travel over the gloo host group as two broadcasts: a fixed-size int64 header (what kind of message, the
sizes and scalar fields) and one byte buffer with every array back to back. The fields are read from
``StepInputs`` itself, so a field added there travels without changes here. When the step's input ids include
placeholders for tokens the previous step sampled (the engine running a step ahead), those tokens follow on
the device group: they never visit the host.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from tfbackend.distributed import ParallelContext
from tfbackend.engine.model_runner import StepInputs

_STEP, _STOP = 1, 2
_INT, _LIST, _ARRAY = 0, 1, 2  # how a field travels; arrays add their dtype's index in _DTYPES
_DTYPES = [np.dtype(t) for t in (np.int64, np.int32, np.bool_, np.float32, np.float64)]
_HEADER = 64
_FIELDS = dataclasses.fields(StepInputs)


class StepBroadcast:
    def __init__(self, parallel: ParallelContext, device: torch.device):
        self.parallel = parallel
        self.device = device

    # ---- driver -------------------------------------------------------------------------------------------

    def send(self, step: StepInputs, pending_tokens: torch.Tensor | None) -> None:
        header = np.zeros(_HEADER, dtype=np.int64)
        header[:2] = _STEP, 0 if pending_tokens is None else pending_tokens.numel()
        arrays, slot = [], 2
        # Per field 4 slots: (_INT, value), or (_LIST or _ARRAY + dtype code, ndim, *shape) with the data in the payload.
        for field in _FIELDS:
            value = getattr(step, field.name)
            if isinstance(value, int):
                header[slot : slot + 2] = _INT, value
            else:
                kind = _LIST if isinstance(value, list) else _ARRAY
                array = np.asarray(value, dtype=np.int64) if kind == _LIST else value
                if array.ndim > 2:
                    raise TypeError(f"StepInputs.{field.name} has {array.ndim} dimensions; at most 2 travel")
                code = kind + (_DTYPES.index(array.dtype) if kind == _ARRAY else 0)
                header[slot : slot + 4] = code, array.ndim, *(*array.shape, 1, 1)[:2]
                arrays.append(np.ascontiguousarray(array).view(np.uint8).ravel())
            slot += 4
        if slot > _HEADER:
            raise RuntimeError("StepInputs has grown past the broadcast header")
        self._broadcast(torch.from_numpy(header))
        payload = np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)
        self._broadcast(torch.from_numpy(payload))
        if pending_tokens is not None:
            self.parallel.world_device.broadcast(pending_tokens.to(torch.int64).contiguous(), src=0)

    def send_stop(self) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = _STOP
        self._broadcast(header)

    # ---- other ranks --------------------------------------------------------------------------------------

    def receive(self) -> tuple[StepInputs, torch.Tensor | None] | None:
        """The next step and the previous step's sampled tokens (when it has placeholders); None: stop."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        self._broadcast(header)
        header = header.numpy()
        if header[0] == _STOP:
            return None
        scalars, arrays, total = {}, [], 0
        for index, field in enumerate(_FIELDS):
            code, value_or_ndim, *dims = header[2 + 4 * index : 6 + 4 * index].tolist()
            if code == _INT:
                scalars[field.name] = value_or_ndim
                continue
            dtype = np.dtype(np.int64) if code == _LIST else _DTYPES[code - _ARRAY]
            shape = tuple(dims[:value_or_ndim])
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            arrays.append((field.name, code == _LIST, dtype, shape, total, size))
            total += size
        payload = torch.empty(total, dtype=torch.uint8)
        self._broadcast(payload)
        raw = payload.numpy()
        for name, is_list, dtype, shape, offset, size in arrays:
            array = raw[offset : offset + size].view(dtype).reshape(shape)
            scalars[name] = array.tolist() if is_list else array
        pending = None
        if header[1]:
            pending = torch.empty(int(header[1]), dtype=torch.int64, device=self.device)
            self.parallel.world_device.broadcast(pending, src=0)
        return StepInputs(**scalars), pending

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0, group=self.parallel.world_cpu)
