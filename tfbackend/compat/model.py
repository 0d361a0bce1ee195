"""The compat tier: any HF causal LM that ``generate`` can run, continuously batched.

For models the paged-KV fallback cannot serve (attention outside the attention interface, recurrent or
convolution state, custom caches), the HF model runs with its own attention and its own cache objects, driven
the way HF ``generate`` drives it: the model's ``prepare_inputs_for_generation`` builds each call's inputs and its
``_update_model_kwargs_for_generation`` carries the state to the next step. What ``generate`` cannot do, this
tier adds: the running batch changes every step. Sequences that finished leave (their rows are dropped from
every state tensor), new ones prefill and then join (their state is appended, left-padded to the batch's
timeline, with the attention mask hiding the padding), and padding no row needs any more is trimmed
(``state.StateLayout``).

Each engine step therefore runs one decode forward for all running sequences and a few prefill forwards for the
prompts that arrived: left-padded groups, as ``generate`` pads a batch, each at most as many tokens (padding
included) as the step itself, so no forward is larger than the step the engine profiled. Padding is used only
where the load-time batching check showed it changes nothing; a model whose padded prefill differs from its
unpadded one prefills in groups of equal length (no padding), and one whose batched decode differs runs every
sequence alone. Prompts are never split over steps and blocks are never shared, so the engine turns chunked
prefill and prefix caching off for this tier. Attention caches grow in place (``growing_cache``), and a decode
step of the same rows as the step before uploads nothing new to the device.

CUDA graphs (and torch.compile) are off: a graph replays fixed shapes and addresses, and this tier's state
changes shape every step (caches and the attention mask grow by a column, rows join and leave). Capturing the
decode step would take, per cache class: keys and values preallocated to [rows, heads, max_model_len, dim] and
written at the shared timeline column (left-padded alignment holds; conv and SSM states are fixed-size already),
rows as slots in batch-size buckets (a prefilled row is copied into a free slot right-aligned at the timeline; a
row that leaves is masked), the attention mask updated in place, and trimming replaced by shifting the timeline
when it reaches max_model_len. HF's own static caches cover attention layers only, not every model's cache
classes, so this is not generic; until then the step runs eagerly (launch-bound on a GPU).

The engine's contract asks for hidden states and computes logits from the rows that sample. This tier gets
logits from HF's own forward (its head, scaling and softcapping included), so ``forward`` returns, for each token,
the row of this step's logits that belongs to it (``-1`` for tokens that do not end their sequence's chunk), and
``compute_logits`` looks those rows up.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from tfbackend.attention import get_forward_context
from tfbackend.compat.growing_cache import use_growing_layers, with_room
from tfbackend.compat.state import StateLayout, tensor_bytes
from tfbackend.hf_classes import causal_lm_class, padding_unsafe_layer_types
from tfbackend.kernels.hf_experts import use_fused_experts
from tfbackend.model_interface import AttentionLayerSpec, CausalLM, SequenceStateSpec, UnsupportedModelError
from tfbackend.quantization.config import quantization_method
from tfbackend.quantization.hf_loading import load_quantized_hf_model

logger = logging.getLogger(__name__)

# Prompt lengths of the load-time comparison that tells which state dimensions grow with the sequence.
LAYOUT_PROBE_LENGTHS = (3, 11)
# The batching check: a short prompt padded to a long one's length, decoded for a few steps, against each alone.
# Long enough that padding meets what small windows, top-k selections and chunks do with it.
BATCHING_CHECK_LENGTHS = (12, 40)
BATCHING_CHECK_STEPS = 4


@dataclass
class RunningBatch:
    """The sequences decoding together: their rows, in order, and HF's generation state for all of them."""

    seq_ids: list[int]
    lengths: list[int]  # tokens of each row in the state (the timeline is the longest)
    state: dict[str, Any]  # {"input_ids": [B, S], "kwargs": HF's model kwargs: cache, attention_mask, ...}

    @property
    def size(self) -> int:
        return len(self.seq_ids)

    @property
    def timeline(self) -> int:
        return self.state["input_ids"].shape[1]


class CompatCausalLM(CausalLM):
    """Wraps an HF causal LM, with its own attention and caches, behind the engine's model contract."""

    supports_chunked_prefill = False
    supports_prefix_caching = False
    supports_cuda_graphs = False

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config
        parameters = set(inspect.signature(hf_model.forward).parameters)
        self.accepts_attention_mask = "attention_mask" in parameters
        self.accepts_position_ids = "position_ids" in parameters
        self.keeps_one_logit = hf_model._supports_logits_to_keep()
        pad_token_id = getattr(self.config.get_text_config(), "pad_token_id", None)
        self.pad_token_id = pad_token_id if isinstance(pad_token_id, int) else 0  # any id: padding is masked
        # Sequences decoding together, one group per batched forward: a single group, or one per sequence for a
        # model whose batched forward is not row-independent (see _check_batching).
        self.groups: list[RunningBatch] = []
        self.batched = True
        self.padded_prefill = True  # prompts of different lengths prefill in one left-padded forward
        self.layout: StateLayout | None = None  # None: the state cannot be joined, each sequence runs alone
        self.state_spec: SequenceStateSpec | None = None
        self._step_logits: torch.Tensor | None = None
        self._every_token_has_logits = False
        # Index tensors of the last steps, by purpose: a step like the one before (a decode of the same rows)
        # reuses them instead of copying new ones to the device (a copy from pageable memory waits for the GPU).
        self._indices: dict[str, tuple[list[int], torch.Tensor]] = {}

    @classmethod
    def supports(cls, hf_config) -> str | None:
        hf_class = causal_lm_class(hf_config)
        if hf_class is None:
            return f"transformers has no causal-LM class for model type {hf_config.model_type!r}"
        if not hasattr(hf_class, "prepare_inputs_for_generation"):
            return f"{hf_class.__name__} cannot generate"
        return None

    @classmethod
    def load(
        cls, model_dir: str | Path, hf_config, dtype: torch.dtype, device: torch.device, quantization: str | None = None
    ) -> CompatCausalLM:
        hf_class = causal_lm_class(hf_config)
        method = quantization_method(hf_config, quantization)
        if method is not None:  # HF's own attention and caches, our quantized linears (as in the fallback)
            hf_model = load_quantized_hf_model(hf_class, model_dir, hf_config, dtype, device, method)
        else:
            hf_model = hf_class.from_pretrained(model_dir, config=hf_config, dtype=dtype, device_map=str(device))
        hf_model.eval().requires_grad_(False)
        use_fused_experts(hf_model)  # MoE experts through our fused kernel where it reproduces them; else HF's
        model = cls(hf_model)
        try:
            model._probe(hf_config)
        except UnsupportedModelError:
            raise
        except Exception as error:  # the model's own code fails on a probe: refuse now, not on a user's request
            raise UnsupportedModelError(
                f"{hf_class.__name__} fails when driven as generate drives it ({type(error).__name__}: {error})"
            ) from error
        return model

    def _probe(self, hf_config) -> None:
        """Learn the state layout and whether rows may share a padded batch (load-time forwards)."""
        name = type(self.hf_model).__name__
        with torch.inference_mode():
            self._learn_layout()
            held = self._module_held_state()
            if held:
                logger.warning("%s keeps state on its modules (%s), outside its cache: one sequence runs at a time",
                               name, ", ".join(held[:3]))
                self.layout = None
                self.state_spec = dataclasses.replace(self.state_spec, max_sequences=1)
            if self.layout is not None and not self.accepts_attention_mask and any(self.layout.growing_dims.values()):
                logger.warning("%s keeps per-token state but takes no attention mask: each sequence runs alone",
                               name)
                self.layout = None
            unsafe = padding_unsafe_layer_types(hf_config)
            if unsafe:
                logger.warning("%s: each sequence runs alone (HF does not mask padding in its %s layers)",
                               name, ", ".join(unsafe))
            self.batched = self.layout is not None and not unsafe
            if self.batched:
                self.batched, self.padded_prefill = self._check_batching()
            else:
                self.padded_prefill = False

    def attention_layers(self) -> list[AttentionLayerSpec]:
        return []  # the HF model keeps its own caches

    def release_sequences(self, seq_ids: list[int]) -> None:
        ended = set(seq_ids)
        self._keep_rows({s for group in self.groups for s in group.seq_ids if s not in ended})

    def sequence_state(self) -> SequenceStateSpec:
        return self.state_spec

    # ---- a step -------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Advance every sequence of the step; return, per token, its row of this step's logits (or -1)."""
        metadata = get_forward_context().metadata
        starts, seq_lens, seq_ids = metadata.query_start_loc_host, metadata.seq_lens_host, metadata.seq_ids_host
        if seq_ids is None:
            raise RuntimeError("the compat tier needs the step's sequence ids in its metadata")
        chunks = {seq_id: (starts[b], starts[b + 1], seq_lens[b]) for b, seq_id in enumerate(seq_ids)}
        decoding = {s for s, (start, end, seq_len) in chunks.items() if end - start < seq_len}
        for seq_id, (start, end, seq_len) in chunks.items():
            if seq_id in decoding and end - start != 1:
                raise RuntimeError("the compat tier feeds a running sequence one token per step")
        self._keep_rows(decoding)
        running = {s: n for group in self.groups for s, n in zip(group.seq_ids, group.lengths)}
        if decoding != running.keys():
            raise RuntimeError(f"sequences {sorted(decoding - running.keys())} continue without state in the compat tier")
        for seq_id, length in running.items():
            if chunks[seq_id][2] != length + 1:
                raise RuntimeError(f"sequence {seq_id} is out of step with its cached state")
        logits_parts, row_of_seq = [], {}

        def collect(seq_ids: list[int], logits: torch.Tensor) -> None:
            offset = sum(part.shape[0] for part in logits_parts)
            row_of_seq.update({seq_id: offset + i for i, seq_id in enumerate(seq_ids)})
            logits_parts.append(logits)

        for index, group in enumerate(self.groups):
            token_rows = self._device_index(f"tokens of group {index}", [chunks[s][0] for s in group.seq_ids],
                                            input_ids.device)
            collect(group.seq_ids, self._decode(group, input_ids[token_rows][:, None]))
        prompt_lengths = {s: end - start for s, (start, end, _) in chunks.items() if s not in decoding}
        prefilled = []
        for new_seqs in self._prefill_groups(prompt_lengths, input_ids.shape[0]):
            logits, batch = self._prefill(new_seqs, [input_ids[chunks[s][0] : chunks[s][1]] for s in new_seqs])
            collect(new_seqs, logits)
            prefilled.append(batch)
        self._join(prefilled)
        if len(logits_parts) == 1:  # a decode step: its logits as they are, no copy
            self._step_logits = logits_parts[0]
        else:
            self._step_logits = torch.cat(logits_parts) if logits_parts else None
        handles = [-1] * input_ids.shape[0]
        for seq_id, (_, end, _) in chunks.items():
            handles[end - 1] = row_of_seq[seq_id]
        self._every_token_has_logits = -1 not in handles
        return self._device_index("handles", handles, input_ids.device).float()[:, None]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows of tokens that end no chunk (handle -1) come back as NaN: this tier computes no logits there."""
        rows = hidden[:, 0].long()
        if self._every_token_has_logits:  # a decode step: no row to blank
            return self._step_logits.index_select(0, rows)
        logits = self._step_logits[rows.clamp_min(0)]
        return logits.masked_fill((rows < 0)[:, None], float("nan"))

    def _device_index(self, purpose: str, values: list[int], device: torch.device) -> torch.Tensor:
        """``values`` as an int64 tensor on ``device``; the previous step's tensor for ``purpose`` if it held the
        same values (rows change only when sequences join or leave)."""
        cached = self._indices.get(purpose)
        if cached is None or cached[0] != values:
            cached = (values, torch.tensor(values, dtype=torch.int64, device=device))
            self._indices[purpose] = cached
        return cached[1]

    # ---- HF generation, one batch ---------------------------------------------------------------------------

    def _prefill_groups(self, prompt_lengths: dict[int, int], token_limit: int) -> list[list[int]]:
        """The new sequences, split into the groups that prefill in one forward each."""
        if not self.batched:
            return [[seq_id] for seq_id in prompt_lengths]
        if not self.padded_prefill:
            return equal_length_groups(prompt_lengths)
        return padded_prefill_groups(prompt_lengths, token_limit)

    def _fresh_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        """The model kwargs ``generate`` starts a batch of left-padded prompts with (positions count real tokens)."""
        kwargs: dict[str, Any] = {"use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.accepts_position_ids:
            if attention_mask is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).repeat(len(input_ids), 1)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            kwargs["position_ids"] = positions
        if self.keeps_one_logit:
            kwargs["logits_to_keep"] = 1
        if self.hf_model._supports_default_dynamic_cache():
            kwargs["cache"] = use_growing_layers(DynamicCache(config=self.config.get_text_config(decoder=True)))
        return kwargs

    def _run(self, input_ids: torch.Tensor, kwargs: dict[str, Any], padded: bool, first: bool):
        """One forward as ``generate`` makes it; returns the last position's logits and the updated kwargs.

        ``kwargs`` carries an attention mask always (rows may join others later); like ``generate``, the call
        gets it only when some row is padded."""
        call_kwargs = dict(kwargs)
        if not padded:
            call_kwargs.pop("attention_mask", None)
        if first:
            inputs = self.hf_model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **call_kwargs)
        else:
            inputs = self.hf_model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **call_kwargs)
        outputs = self.hf_model(**inputs, return_dict=True)
        kwargs = self.hf_model._update_model_kwargs_for_generation(outputs, kwargs, is_encoder_decoder=False)
        return outputs.logits[:, -1].float(), kwargs

    def _prefill(self, seq_ids: list[int], prompts: list[torch.Tensor]) -> tuple[torch.Tensor, RunningBatch]:
        """Prefill ``prompts`` (1-D token ids) in one forward, left-padded to the longest."""
        lengths = [len(prompt) for prompt in prompts]
        width = max(lengths)
        input_ids = prompts[0].new_full((len(prompts), width), self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = prompt
            attention_mask[row, width - len(prompt) :] = 1
        padded = min(lengths) < width
        if padded and not self.accepts_attention_mask:
            raise RuntimeError("prompts of different lengths cannot share a forward without an attention mask")
        kwargs = self._fresh_kwargs(input_ids, attention_mask if self.accepts_attention_mask else None)
        logits, kwargs = self._run(input_ids, kwargs, padded=padded, first=True)
        return logits, RunningBatch(list(seq_ids), lengths, {"input_ids": input_ids, "kwargs": kwargs})

    def _decode(self, batch: RunningBatch, tokens: torch.Tensor) -> torch.Tensor:
        batch.state["input_ids"] = torch.cat([batch.state["input_ids"], tokens.to(batch.state["input_ids"].dtype)], 1)
        batch.lengths = [n + 1 for n in batch.lengths]
        padded = min(batch.lengths) < batch.timeline
        logits, batch.state["kwargs"] = self._run(batch.state["input_ids"], batch.state["kwargs"], padded, first=False)
        return logits

    # ---- the running batch changes --------------------------------------------------------------------------

    def _keep_rows(self, seq_ids: set[int]) -> None:
        """Drop the rows of sequences not decoding in this step (finished, aborted, preempted, restarting)."""
        kept = []
        for batch in self.groups:
            keep = [i for i, s in enumerate(batch.seq_ids) if s in seq_ids]
            if not keep:
                continue
            if len(keep) < batch.size:
                rows = torch.tensor(keep, device=batch.state["input_ids"].device)
                batch.state = self.layout.select_rows(batch.state, rows, batch.size)
                batch.seq_ids = [batch.seq_ids[i] for i in keep]
                batch.lengths = [batch.lengths[i] for i in keep]
            unused = batch.timeline - max(batch.lengths)
            if unused > 0:  # leading columns that are padding in every row
                batch.state = self.layout.trim(batch.state, batch.timeline, unused, batch.size)
            kept.append(batch)
        self.groups = kept

    def _join(self, new: list[RunningBatch]) -> None:
        """Add newly prefilled rows to the running batch, all in one copy of its state; rows whose state cannot
        be joined (a shape the layout probe did not show) decode in a group of their own instead."""
        if not self.batched or not new:
            self.groups.extend(new)
            return
        if not self.groups:
            self.groups.append(new.pop(0))
        base, joining = self.groups[0], []
        for batch in new:
            try:
                self.layout.check_joinable(base.state, batch.state, base.size)
                joining.append(batch)
            except ValueError as error:
                logger.warning("%s: sequences decode in separate groups: %s", type(self.hf_model).__name__, error)
                self.groups.append(batch)
        if not joining:
            return
        members = [base, *joining]
        base.state = self.layout.concat_rows([b.state for b in members], [b.size for b in members])
        for batch in joining:
            base.seq_ids += batch.seq_ids
            base.lengths += batch.lengths

    def _check_batching(self) -> tuple[bool, bool]:
        """Whether rows decode in one padded batch exactly as each decodes alone, and whether prompts of
        different lengths may also prefill in one left-padded forward. HF's batched forward is not
        row-independent for some models (RWKV's state update mixes rows; Doge's top-k key selection sees the
        padding): those run each sequence in a forward of its own; a model whose padded prefill alone differs
        prefills prompts of equal length together."""
        device = self.hf_model.device
        prompts = [_probe_prompt(self.config, length, device) for length in BATCHING_CHECK_LENGTHS]
        alone = torch.cat([self._probe_generate([[prompt]]) for prompt in prompts])
        joined = self._probe_generate([[prompt] for prompt in prompts])
        tolerance = 1e-4 if self.hf_model.dtype == torch.float32 else 3e-2
        name = type(self.hf_model).__name__
        joined_error = _relative_error(joined, alone)
        if joined_error > tolerance:
            logger.warning("%s: a batched decode differs from decoding each sequence alone (relative error %.1e); "
                           "running each sequence in a forward of its own", name, joined_error)
            return False, False
        if not self.accepts_attention_mask:  # nothing would hide a padded prompt's padding
            return True, False
        padded_error = _relative_error(self._probe_generate([prompts]), alone)
        if padded_error > tolerance:
            logger.warning("%s: a left-padded prefill differs from prefilling each prompt alone (relative error "
                           "%.1e); prompts prefill in groups of equal length", name, padded_error)
            return True, False
        return True, True

    def _probe_generate(self, groups: list[list[torch.Tensor]]) -> torch.Tensor | None:
        """Prefill each group of prompts in one forward, join all rows, decode a few probe tokens: the logits of
        each row's prefill and steps, [rows, 1 + BATCHING_CHECK_STEPS, vocab]; None if the rows do not join."""
        self.groups, prefilled, first_logits = [], [], []
        for prompts in groups:
            logits, batch = self._prefill(list(range(len(prompts))), prompts)
            first_logits.append(logits)
            prefilled.append(batch)
        self._join(prefilled)
        if len(self.groups) != 1:
            self.groups = []
            return None
        batch = self.groups[0]
        tokens = [torch.full((batch.size, 1), 3 + i, device=self.hf_model.device) for i in range(BATCHING_CHECK_STEPS)]
        steps = [self._decode(batch, token) for token in tokens]
        self.groups = []
        return torch.stack([torch.cat(first_logits), *steps], dim=1)

    def _module_held_state(self) -> list[str]:
        """Tensors that a forward leaves on the modules themselves (RecurrentGemma's recurrent and conv states):
        two sequences in separate forwards would overwrite each other's. Found by prefilling a probe after a
        longer one (so lazily built constants, e.g. rotary tables, already exist) and seeing what changed."""
        def module_tensors() -> dict[str, torch.Tensor]:
            return {f"{module_name}.{attr}": value for module_name, module in self.hf_model.named_modules()
                    for attr, value in vars(module).items() if isinstance(value, torch.Tensor)}

        before = {key: value.clone() for key, value in module_tensors().items()}
        self._prefill([0], [_probe_prompt(self.config, LAYOUT_PROBE_LENGTHS[0], self.hf_model.device)])
        return [key for key, value in module_tensors().items()
                if key not in before or value.shape != before[key].shape or not torch.equal(value, before[key])]

    def _learn_layout(self) -> None:
        """Prefill two prompts of different lengths and compare their states (``StateLayout.learn``), which also
        gives the memory a sequence needs. A state whose structure changes with the length cannot be joined
        row-wise: each sequence then decodes alone, and its memory is estimated from the longer prompt."""
        states = []
        for length in LAYOUT_PROBE_LENGTHS:
            _, batch = self._prefill([0], [_probe_prompt(self.config, length, self.hf_model.device)])
            states.append(batch.state)
        short, long = LAYOUT_PROBE_LENGTHS
        try:
            self.layout = StateLayout.learn(states[0], states[1], short, long)
        except ValueError as error:
            logger.warning("%s: each sequence runs alone (%s)", type(self.hf_model).__name__, error)
            self.layout = None
            self.state_spec = with_room(SequenceStateSpec(0, -(-tensor_bytes(states[1]) // long)))
            return
        self.state_spec = with_room(SequenceStateSpec(self.layout.fixed_bytes, self.layout.bytes_per_token))


def equal_length_groups(prompt_lengths: dict[int, int]) -> list[list[int]]:
    """Sequences (id -> prompt length) grouped by prompt length: groups that prefill without padding."""
    groups: dict[int, list[int]] = defaultdict(list)
    for seq_id, length in prompt_lengths.items():
        groups[length].append(seq_id)
    return list(groups.values())


def padded_prefill_groups(prompt_lengths: dict[int, int], token_limit: int) -> list[list[int]]:
    """Sequences (id -> prompt length) split into left-padded prefill groups, longest prompts first: each group
    takes prompts while all of them, padded to its longest, hold at most ``token_limit`` tokens (a prompt longer
    than that goes alone). Sorting by length keeps the padding small."""
    groups: list[list[int]] = []
    for seq_id in sorted(prompt_lengths, key=prompt_lengths.__getitem__, reverse=True):
        if groups and (len(groups[-1]) + 1) * prompt_lengths[groups[-1][0]] <= token_limit:
            groups[-1].append(seq_id)
        else:
            groups.append([seq_id])
    return groups


def _relative_error(actual: torch.Tensor | None, expected: torch.Tensor) -> float:
    if actual is None:
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _probe_prompt(config, length: int, device: torch.device) -> torch.Tensor:
    """Token ids from the lower half of the vocabulary (special tokens tend to sit at the top)."""
    vocab = config.get_text_config().vocab_size
    prompt = torch.randint(1, max(2, vocab // 2), (length,), generator=torch.Generator().manual_seed(length))
    return prompt.to(device)
