"""Turning logits into tokens on the device: penalties, logit bias, grammar masks, temperature, top-k/top-p/min-p,
seeded sampling.

Order (as vLLM): penalties on the raw logits -> ``logit_bias`` -> ``min_tokens`` masking of stop tokens ->
the structured-output grammar's token mask -> greedy rows take the argmax; sampled rows are divided by their
temperature, top-k and top-p filtered, softmaxed, min-p filtered and drawn with the exponential race (argmax
of p / q, q ~ Exp(1)), which needs no host sync.
Rows with a seed draw their noise from their own generator, so a seeded request samples the same tokens
whatever else shares its batch. Logprobs are those of the raw model distribution.

Per-row parameters reach the GPU with non-blocking copies (``device.upload``): the only wait for the GPU is
the final fetch of the sampled tokens (and of logprobs, when asked for). Grammar masks are computed on the
host from each sequence's matcher (which needs the previous token, so such sequences never run a step ahead)
and uploaded as one bitmask for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfbackend.engine.device import upload
from tfbackend.engine.sequence import Sequence
from tfbackend.sampling_params import SamplingParams
from tfbackend.structured_output import apply_token_bitmask, fill_token_bitmask


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, when logprobs were requested: (sampled logprob, sampled rank, top ids, top logprobs).
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


@dataclass
class SamplingTensors:
    """The per-row sampling parameters of one step, gathered from its sequences."""

    temperature: torch.Tensor  # [N]; 0 rows are greedy
    top_k: torch.Tensor  # [N] int; V disables
    top_p: torch.Tensor  # [N]
    min_p: torch.Tensor  # [N]
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingTensors:
        params = [seq.params for seq in seqs]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        return cls(
            temperature=host_tensor([p.temperature for p in params], torch.float32, device),
            top_k=host_tensor(top_k, torch.long, device),
            top_p=host_tensor([p.top_p for p in params], torch.float32, device),
            min_p=host_tensor([p.min_p for p in params], torch.float32, device),
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
        )


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: set[int]):
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device)  # for rows without their own seed
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        sampled, raw_logits = self.sample_on_device(logits, seqs)
        return SamplerOutput(sampled.tolist(), self.gather_logprobs(raw_logits, sampled, seqs))

    def sample_on_device(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queue the sampling; returns the sampled ids (``[N]``, still on the device) and the raw logits,
        kept only when a row asks for logprobs (a run-ahead step holds them while the next one runs)."""
        logits = logits.float()
        raw_logits = logits if any(seq.params.logprobs is not None for seq in seqs) else None
        logits = self.apply_penalties(logits, seqs)
        logits = apply_logit_bias(logits, seqs)
        logits = self.mask_stop_tokens_before_min_tokens(logits, seqs)
        logits = apply_grammars(logits, seqs)
        if all(seq.params.greedy for seq in seqs):  # no per-row tensors to build
            sampled = logits.argmax(dim=-1)
        else:
            sampled = self.sample(logits, seqs, SamplingTensors.from_sequences(seqs, logits.shape[-1], logits.device))
        return sampled, raw_logits

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], t: SamplingTensors) -> torch.Tensor:
        greedy_rows = t.temperature == 0
        temperature = torch.where(greedy_rows, torch.ones_like(t.temperature), t.temperature)
        logits = logits / temperature[:, None]
        if t.any_top_k or t.any_top_p:
            logits = apply_top_k_top_p(logits, t.top_k if t.any_top_k else None, t.top_p if t.any_top_p else None)
        probs = torch.softmax(logits, dim=-1)
        if t.any_min_p:
            probs = apply_min_p(probs, t.min_p)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy_rows, logits.argmax(dim=-1), sampled)

    def apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [seq.params for seq in seqs]
        if not any(has_penalties(p) for p in params):
            return logits
        num_rows, vocab = logits.shape
        device = logits.device
        # Every (row, token) pair of the batch in one upload each, rather than tensors per row.
        out_rows = [row for row, seq in enumerate(seqs) for _ in range(seq.num_output_tokens)]
        out_ids = [token for seq in seqs for token in seq.output_token_ids]
        all_rows = [row for row, seq in enumerate(seqs) for _ in range(seq.num_tokens)]
        all_ids = [token for seq in seqs for token in seq.token_ids]
        output_counts = torch.zeros(num_rows, vocab, device=device)
        output_counts.index_put_(
            (host_tensor(out_rows, torch.long, device), host_tensor(out_ids, torch.long, device)),
            torch.ones(len(out_ids), device=device),
            accumulate=True,
        )
        seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
        seen[host_tensor(all_rows, torch.long, device), host_tensor(all_ids, torch.long, device)] = True
        repetition = host_tensor([p.repetition_penalty for p in params], torch.float32, device)[:, None]
        presence = host_tensor([p.presence_penalty for p in params], torch.float32, device)[:, None]
        frequency = host_tensor([p.frequency_penalty for p in params], torch.float32, device)[:, None]
        # Repetition (prompt and output tokens): shrink positive logits, push negative ones further down.
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits)
        # OpenAI's presence and frequency penalties look at generated tokens only.
        logits = logits - frequency * output_counts - presence * (output_counts > 0)
        return logits

    def mask_stop_tokens_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows, cols = [], []
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                stop_ids = set(seq.params.stop_token_ids)
                if not seq.params.ignore_eos:
                    stop_ids |= self.eos_token_ids
                for token in stop_ids:
                    rows.append(row)
                    cols.append(token)
        if rows:
            logits = logits.clone()
            device = logits.device
            logits[host_tensor(rows, torch.long, device), host_tensor(cols, torch.long, device)] = float("-inf")
        return logits

    def gather_logprobs(self, raw_logits: torch.Tensor | None, sampled: torch.Tensor, seqs: list[Sequence]):
        if raw_logits is None:
            return [None] * len(seqs)
        wanted = [seq.params.logprobs for seq in seqs]
        rows = [row for row, k in enumerate(wanted) if k is not None]
        logprobs = torch.log_softmax(raw_logits[rows], dim=-1)
        chosen = sampled[rows]
        chosen_logprob = logprobs.gather(1, chosen[:, None])
        ranks = (logprobs > chosen_logprob).sum(dim=-1) + 1
        max_k = max(wanted[row] for row in rows)
        top_logprobs, top_ids = logprobs.topk(max(max_k, 1), dim=-1)
        chosen_logprob, ranks = chosen_logprob[:, 0].tolist(), ranks.tolist()
        top_logprobs, top_ids = top_logprobs.tolist(), top_ids.tolist()
        result: list[tuple[float, int, list[int], list[float]] | None] = [None] * len(seqs)
        for i, row in enumerate(rows):
            k = wanted[row]
            result[row] = (chosen_logprob[i], ranks[i], top_ids[i][:k], top_logprobs[i][:k])
        return result


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Add each row's ``logit_bias`` to its logits, all rows in one scatter."""
    rows, cols, values = [], [], []
    for row, seq in enumerate(seqs):
        for token, bias in (seq.params.logit_bias or {}).items():
            rows.append(row)
            cols.append(token)
            values.append(bias)
    if not rows:
        return logits
    device = logits.device
    logits = logits.clone()  # the raw logits may be kept for logprobs
    index = (host_tensor(rows, torch.long, device), host_tensor(cols, torch.long, device))
    logits.index_put_(index, host_tensor(values, torch.float32, device), accumulate=True)
    return logits


def apply_grammars(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Forbid, in rows with a structured-output grammar, every token the grammar does not allow next."""
    if all(seq.grammar is None for seq in seqs):
        return logits
    bitmask = fill_token_bitmask([seq.grammar for seq in seqs], logits.shape[-1])
    return apply_token_bitmask(logits, upload(bitmask, logits.device))


def reads_token_history(params: SamplingParams) -> bool:
    """Whether sampling for these params reads the sequence's earlier tokens on the host: the penalties, and
    a grammar (its mask depends on every token so far)."""
    return has_penalties(params) or params.structured_outputs is not None


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def host_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return upload(torch.tensor(values, dtype=dtype), device)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's top-k logits and the smallest set whose probability reaches top_p; -inf the rest."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        remove |= torch.arange(vocab, device=logits.device)[None, :] >= top_k[:, None]
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
        remove |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens less likely than min_p times the row's most likely token."""
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return probs.masked_fill(probs < threshold, 0.0)
