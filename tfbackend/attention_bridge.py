"""The "tfbackend" attention implementation for Hugging Face models, and the probe that maps a model's calls.

Registered in transformers' ``AttentionInterface``, it replaces the model's attention with our paged
attention: HF hands us Q/K/V of the whole flattened step as one batch row (``[1, H, T, D]``, RoPE already
applied); we look up which call site this is and attend per sequence using the step metadata of the forward
context. Because "tfbackend" is not a registered mask type, transformers builds no attention mask: causality
and sequence boundaries come from our metadata.

Which cache a call uses, and its sliding window, is learnt once at load by ``probe_attention_calls``: a
forward pass under a second implementation, "tfbackend_probe", that records every call (the module, the
shapes of K and V, whether K is a tensor an earlier call already received, i.e. shared KV) and asks HF to
describe each layer's mask, so that windows which HF expresses only through its mask are found too.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from tfbackend.attention import LayerAttentionOptions, get_forward_context, paged_attention
from tfbackend.attention.torch_backend import reference_attention

ATTN_IMPLEMENTATION = "tfbackend"
PROBE_IMPLEMENTATION = "tfbackend_probe"


@dataclass(frozen=True)
class CallSite:
    """Where one attention call of a module goes: its index in the KV cache and the window it sees."""

    index: int
    sliding_window: int | None
    chunk_size: int | None


CALL_SITES_ATTRIBUTE = "_tfbackend_call_sites"


def tfbackend_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H_q, T, D_k]
    key: torch.Tensor,  # [1, H_kv, T, D_k]
    value: torch.Tensor,  # [1, H_kv, T, D_v]
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    sites: tuple[CallSite, ...] | None = getattr(module, CALL_SITES_ATTRIBUTE, None)
    if sites is None:
        raise RuntimeError(f"{type(module).__name__} was not mapped to the KV cache at load (no call sites)")
    if query.shape[0] != 1:
        raise RuntimeError("the tfbackend attention expects the whole step flattened into one batch row")
    site = sites[0] if len(sites) == 1 else sites[get_forward_context().call_number(module, len(sites))]
    options = LayerAttentionOptions(
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=site.sliding_window,
        softcap=softcap,
        sinks=s_aux,
        chunk_size=site.chunk_size,
    )
    out = paged_attention(
        site.index,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        options,
    )
    return out.unsqueeze(0), None  # [1, T, H_q, D_v], as HF's attention functions return


# ---- the probe ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskDescription:
    """What a layer's HF mask allows, found by evaluating HF's own mask function at far-apart positions."""

    causal: bool  # no query sees a later key
    sliding_window: int | None  # a query at i sees keys i - w < j <= i (None: unbounded)
    chunk_size: int | None  # a query sees only keys of its own chunk of this many positions


@dataclass
class RecordedCall:
    module: torch.nn.Module
    key: torch.Tensor
    value: torch.Tensor
    sliding_window: int | None  # the kwarg, when HF passes one
    mask: object  # a MaskDescription, None (no mask) or whatever else the model passed


@dataclass
class _Recorder:
    calls: list[RecordedCall] = field(default_factory=list)


_active_probe: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("tfbackend_probe", default=None)

# Far beyond any real context, so that a probe never runs into the start of the sequence.
_PROBE_POSITION = 1 << 40


def describe_mask(mask_function: Callable) -> MaskDescription:
    """Probe an HF index-based mask function (batch, head, q_idx, kv_idx) -> bool for its shape."""

    def visible(q: int, kv: int) -> bool:
        zero = torch.tensor(0)
        return bool(mask_function(zero, zero, torch.tensor(q), torch.tensor(kv)))

    def largest(holds: Callable[[int], bool]) -> int:
        """The largest d in [1, 2**40] with ``holds(d)``, for a predicate true up to some d and false after."""
        low, high = 1, _PROBE_POSITION + 1
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if holds(mid) else (low, mid)
        return low

    def reach(q: int) -> int:
        """How many keys back from ``q`` (itself included) are visible."""
        return largest(lambda d: visible(q, q - d + 1))

    q = _PROBE_POSITION
    causal = not visible(q, q + 1)
    if not visible(q, q):
        raise ValueError("the mask hides every token from itself")
    far = reach(q)
    if far >= _PROBE_POSITION:
        return MaskDescription(causal, None, None)
    # A sliding window reaches equally far from every position; a chunk reaches back to its own start only.
    if reach(q + 1) == far:
        return MaskDescription(causal, far, None)
    chunk_start = q - far + 1
    return MaskDescription(causal, None, largest(lambda d: visible(chunk_start + d - 1, chunk_start)))


def _probe_mask(mask_function: Callable, **kwargs) -> MaskDescription:
    """The mask implementation of the probe: no tensor, a description of what HF would have masked."""
    return describe_mask(mask_function)


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                     s_aux=None, sliding_window=None, **kwargs):
    """Record the call, then compute dense attention over this call's own K/V so the forward goes on."""
    recorder = _active_probe.get()
    if recorder is None:
        raise RuntimeError("the tfbackend probe attention ran outside probe_attention_calls()")
    recorder.calls.append(RecordedCall(module, key, value, sliding_window, attention_mask))
    window = sliding_window
    if isinstance(attention_mask, MaskDescription) and attention_mask.sliding_window is not None:
        window = attention_mask.sliding_window
    options = LayerAttentionOptions(
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5, sliding_window=window,
        softcap=softcap, sinks=s_aux,
    )
    positions = torch.arange(key.shape[2], device=query.device)
    out = reference_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                              positions[-query.shape[2]:], options)
    return out.contiguous().unsqueeze(0), None  # contiguous, like the paged backends' outputs


@contextlib.contextmanager
def probe_attention_calls() -> Iterator[list[RecordedCall]]:
    """Record every attention call of the forward passes run inside (under ``PROBE_IMPLEMENTATION``)."""
    recorder = _Recorder()
    token = _active_probe.set(recorder)
    try:
        yield recorder.calls
    finally:
        _active_probe.reset(token)


AttentionInterface.register(ATTN_IMPLEMENTATION, tfbackend_attention)
AttentionInterface.register(PROBE_IMPLEMENTATION, _probe_attention)
AttentionMaskInterface.register(PROBE_IMPLEMENTATION, _probe_mask)
