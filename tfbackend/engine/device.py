"""Moving step data between host and device without making the host wait for the GPU."""

from __future__ import annotations

import torch


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``.

    On CUDA it is staged in pinned memory and copied with ``non_blocking=True``: a copy from pageable memory
    (what ``torch.tensor(values, device=cuda)`` does) waits for every kernel queued before it, so a step that
    made one would stall until the GPU had finished the step's work so far. The caching host allocator keeps
    the pinned buffer alive until the copy has run.
    """
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def placeholder(row: int) -> int:
    """The stand-in id of a sampled token not yet on the host: row ``row`` of the pending step's samples.

    When the engine runs a step ahead, the next step is prepared before the tokens it feeds are known; the
    sequences carry these negative ids meanwhile and the device swaps in the real tokens.
    """
    return -1 - row


def resolve_placeholders(input_ids: torch.Tensor, pending_tokens: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with every placeholder replaced by its token from ``pending_tokens``, on the device."""
    return torch.where(input_ids < 0, pending_tokens[(-1 - input_ids).clamp_min(0)], input_ids)
