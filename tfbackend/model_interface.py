"""The model contract: what every implementation (native port, Transformers fallback, compat tier) offers.

The engine never looks inside a model. It asks the class whether it can serve a config (``supports``),
loads it (``load``), asks the loaded model which attention call sites need KV cache and in what layout
(``attention_layers``) to size and allocate the cache, and then runs steps through ``forward`` and
``compute_logits``. Runner, CUDA graphs, sampler and tensor parallelism work the same for all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


class UnsupportedModelError(ValueError):
    """Raised by ``load`` when the model turns out to need something this implementation cannot do.

    Most refusals come from ``supports`` before anything is loaded; this one is for what only shows once the
    modules exist (e.g. a layer that passes its own attention mask). ``model_impl="auto"`` then tries the
    next implementation, as it does after a refusal by ``supports``.
    """


@dataclass(frozen=True)
class AttentionLayerSpec:
    """The KV cache layout of one attention call site.

    A call site is one call of ``paged_attention`` per step: usually one per decoder layer, two for a layer
    that attends twice. Call sites are numbered in the order a forward pass reaches them; that number is the
    ``layer_idx`` the model passes to ``paged_attention`` and the index into the engine's KV cache.
    """

    num_kv_heads: int
    head_dim: int  # width of a cached key
    v_head_dim: int  # width of a cached value (MLA caches keys wider than values)
    sliding_window: int | None = None  # the site never looks further back than this many tokens
    shares_kv_with: int | None = None  # reads the cache of this earlier site and writes none of its own

    def __post_init__(self) -> None:
        if min(self.num_kv_heads, self.head_dim, self.v_head_dim) < 1:
            raise ValueError(f"an attention layer needs positive head counts and widths, got {self}")

    @property
    def owns_cache(self) -> bool:
        return self.shares_kv_with is None


@dataclass(frozen=True)
class SequenceStateSpec:
    """Memory a model keeps for each sequence outside the paged KV cache: ``fixed_bytes`` whatever the length
    (recurrent or convolution states) plus ``bytes_per_token`` (keys and values in its own cache objects)."""

    fixed_bytes: int
    bytes_per_token: int
    # Sequences the model can hold at once; None: as many as memory allows. 1 for a model that keeps its state
    # on its modules rather than in a cache object (each forward overwrites the last one's).
    max_sequences: int | None = None

    def sequence_bytes(self, num_tokens: int) -> int:
        return self.fixed_bytes + self.bytes_per_token * num_tokens


# The activations a pipeline stage hands the next one, by name; each ``[T, width]`` in the model dtype.
IntermediateTensors = dict[str, torch.Tensor]


class CausalLM(nn.Module, ABC):
    """A decoder the engine can run: a flattened step of tokens in, hidden states out, logits on demand.

    A step is one batch of ``T`` tokens with no padding: prefill chunks and decode tokens of many sequences
    laid end to end. The model only sees token ids and their positions; which sequence a token belongs to,
    causality and the KV cache reach its attention through the forward context that the runner sets
    (``tfbackend.attention.paged_attention``).

    The class attributes say which engine features the implementation allows: prompts split over several
    steps, prefix caching (a prompt resuming from another sequence's cached blocks) and CUDA graphs.

    Several ranks (``tfbackend.distributed``): ``load`` runs in every rank's process, and
    ``tfbackend.distributed.current_parallel()`` says which rank it builds. A class that sets
    ``supports_tensor_parallel`` holds only its rank's share of the weights and heads, declares only its own
    heads in ``attention_layers`` and returns full logits from ``compute_logits`` on every rank of its stage.
    One that sets ``supports_pipeline_parallel`` builds only its stage's layers (``attention_layers`` lists
    those, numbered from 0), its ``forward`` takes the previous stage's ``intermediate`` tensors (None on the
    first stage) and returns ``IntermediateTensors`` on every stage but the last, as ``pipeline_intermediates``
    declares them; ``compute_logits`` runs on the last stage only. The registry refuses a class for a
    parallel layout it does not declare.
    """

    supports_chunked_prefill: bool = True
    supports_prefix_caching: bool = True
    supports_cuda_graphs: bool = True
    supports_tensor_parallel: bool = False
    supports_pipeline_parallel: bool = False

    @classmethod
    def supports(cls, hf_config) -> str | None:
        """None if this class can serve ``hf_config``, else the reason it cannot (shown to the user)."""
        return None

    @classmethod
    @abstractmethod
    def load(cls, model_dir: str | Path, hf_config, dtype: torch.dtype, device: torch.device) -> CausalLM:
        """A ready model on ``device`` in ``dtype`` with the checkpoint's weights.

        May raise ``UnsupportedModelError`` for what ``supports`` could not see from the config alone.
        """

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids[T]``, ``positions[T]`` -> ``hidden[T, H]``: the whole step, after the final norm."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden[N, H]`` -> ``logits[N, V]``, for the rows that sample (LM head and any final transform)."""

    @abstractmethod
    def attention_layers(self) -> list[AttentionLayerSpec]:
        """Every attention call site of a forward pass, in call order, with its KV cache layout.

        The engine allocates the cache from this list alone. An empty list means the model keeps no paged KV.
        """

    def release_sequences(self, seq_ids: list[int]) -> None:
        """These sequences have ended (finished or aborted): free whatever the model keeps for them."""

    def sequence_state(self) -> SequenceStateSpec | None:
        """Per-sequence memory kept outside the paged KV cache, which bounds how many sequences run at once;
        None when everything lives in the paged cache."""
        return None

    def pipeline_intermediates(self) -> dict[str, int]:
        """Pipeline-parallel classes: the name and width of each tensor one stage hands the next."""
        raise NotImplementedError(f"{type(self).__name__} does not implement pipeline parallelism")
