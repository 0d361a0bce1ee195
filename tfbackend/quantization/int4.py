"""4-bit weight-only linears (W4A16) from AWQ and GPTQ checkpoints.

Both formats store ``w[k, n] = (q[k, n] - z[g, n]) * s[g, n]`` with 4-bit codes and zero points per group of
``group_size`` input rows, packed eight to an int32, but pack differently:

- AWQ (``version: gemm``): ``qweight[K, N // 8]`` and ``qzeros[G, N // 8]`` pack eight *output columns* per word,
  column ``8c + AWQ_ORDER[i]`` in bits ``4i``; ``scales[G, N]``.
- GPTQ: ``qweight[K // 8, N]`` packs eight *input rows* per word, row ``8j + i`` in bits ``4i``; ``qzeros[G, N // 8]``
  packs columns in order; ``scales[G, N]``; ``g_idx[K]`` gives each input row's group (act-order checkpoints
  permute it). The original ``gptq`` checkpoint format stores each zero point minus one.

At load both become one layout, GPTQ's ``qweight`` with unpacked ``zeros[G, N]`` (uint8) and float32 ``scales``,
which the Triton kernel and the reference read; fused shards concatenate along N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tfbackend.quantization.fp8 import CLIP_RATIOS
from tfbackend.quantization.linear import QuantizedLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class Int4Format:
    layout: str  # "awq" | "gptq"
    group_size: int  # -1: one group spanning all input features
    zero_minus_one: bool = False  # GPTQ's original checkpoint format
    has_g_idx: bool = False  # the checkpoint stores g_idx (GPTQ)
    online: bool = False  # dense weights rounded to 4 bits at load (``round_to_nearest``), for evaluations


def asymmetric_grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the 16-level grid spanning ``[low, high]`` widened to include 0."""
    low, high = low.clamp(max=0), high.clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-8)
    return scales, torch.round(-low / scales).clamp(0, 15)


def round_to_nearest(
    weight: torch.Tensor, group_size: int, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit round-to-nearest of ``weight[N, K]`` in groups of ``group_size`` input features: codes
    ``[K, N]`` and zero points ``[G, N]`` (uint8), scales ``[G, N]`` (float32). The grid spans each group's range
    including 0, as GPTQ's and AWQ's quantizers lay it out (without their calibration). With ``clip_search`` each
    group's range is shrunk by the ``CLIP_RATIOS`` ratio that rounds it with the least squared error (GPTQ's
    quantizer does this search with its ``mse`` option)."""
    w = weight.detach().to(torch.float32).T  # [K, N]
    in_features = w.shape[0]
    # A last, narrower group is padded with zeros, which leave its range (it always includes 0) unchanged and
    # round exactly (to the zero point).
    padded = torch.nn.functional.pad(w, (0, 0, 0, -in_features % group_size))
    grouped = padded.reshape(-1, group_size, w.shape[1])  # [G, group, N]
    full_low, full_high = grouped.amin(dim=1), grouped.amax(dim=1)
    best_error = None
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        scales, zeros = asymmetric_grid(full_low * ratio, full_high * ratio)
        codes = torch.clamp(torch.round(grouped / scales[:, None]) + zeros[:, None], 0, 15)
        error = ((codes - zeros[:, None]) * scales[:, None] - grouped).square().sum(dim=1)
        if best_error is None:
            best_error, best = error, (codes, zeros, scales)
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = tuple(torch.where(better[:, None] if old.dim() == 3 else better, new, old)
                     for new, old in zip((codes, zeros, scales), best))
    codes, zeros, scales = best
    return codes.reshape(padded.shape)[:in_features].to(torch.uint8), zeros.to(torch.uint8), scales


def unpack_columns(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """``[R, C // 8]`` int32 words -> ``[R, C]`` codes, where column ``8c + order[i]`` sits in bits ``4i``."""
    nibbles = (packed.to(torch.int32)[..., None] >> _SHIFTS.to(packed.device)) & 0xF  # [R, C/8, 8]: nibble i of word c
    inverse = [order.index(column) for column in range(8)]
    return nibbles[..., inverse].reshape(packed.shape[0], -1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """``[R // 8, C]`` int32 words -> ``[R, C]`` codes, where row ``8j + i`` sits in bits ``4i``."""
    nibbles = (packed.to(torch.int32)[:, None, :] >> _SHIFTS.to(packed.device)[None, :, None]) & 0xF  # [R/8, 8, C]
    return nibbles.reshape(-1, packed.shape[1]).to(torch.uint8)


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_columns`` in column order: ``[R, C]`` codes (C a multiple of 8) -> ``[R, C // 8]``."""
    return pack_rows(codes.T.contiguous()).T.contiguous()


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_rows``: ``[R, C]`` codes (R a multiple of 8) -> ``[R // 8, C]`` int32."""
    shifted = codes.to(torch.int32).reshape(-1, 8, codes.shape[1]) << _SHIFTS.to(codes.device)[None, :, None]
    word = shifted[:, 0]
    for i in range(1, 8):  # the nibbles do not overlap: OR them into one word
        word = word | shifted[:, i]
    return word.contiguous()  # the kernels step along N with unit stride


class Int4Linear(QuantizedLinear):
    def __init__(self, in_features, output_sizes, prefixes, bias, dtype, device, fmt: Int4Format):
        super().__init__(in_features, output_sizes, prefixes, bias, dtype, device)
        self.format = fmt
        self.group_size = in_features if fmt.group_size == -1 else fmt.group_size
        if in_features % 8 or any(size % 8 for size in output_sizes):
            raise ValueError(
                f"{prefixes}: int4 packs 8 values to a word, so input features ({in_features}) and output features "
                f"({output_sizes}) must be multiples of 8"
            )
        # Like AutoGPTQ, a last group may be narrower when the group size does not divide the input features.
        self.num_groups = -(-in_features // self.group_size)

    def checkpoint_leaves(self) -> dict[str, str]:
        if self.format.online:
            return {"weight": "weight"}
        leaves = {"qweight": "qweight", "qzeros": "qzeros", "scales": "scales"}
        if self.format.has_g_idx:
            leaves["g_idx"] = "g_idx"
        return leaves

    def _shard_codes(self, shard: int, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One shard's weight codes ``[K, n]`` and zero points ``[G, n]`` in input-row order."""
        size, groups, k = self.output_sizes[shard], self.num_groups, self.in_features
        for name in ("qweight", "qzeros"):
            if fields[name].dtype != torch.int32:
                raise ValueError(f"{self.prefixes[shard]}.{name} is {fields[name].dtype}; int4 checkpoints pack int32")
        self._check_shape(shard, "qzeros", fields["qzeros"], (groups, size // 8))
        if self.format.layout == "awq":
            self._check_shape(shard, "qweight", fields["qweight"], (k, size // 8))
            return unpack_columns(fields["qweight"], AWQ_ORDER), unpack_columns(fields["qzeros"], AWQ_ORDER)
        self._check_shape(shard, "qweight", fields["qweight"], (k // 8, size))
        zeros = unpack_columns(fields["qzeros"])
        if self.format.zero_minus_one:
            zeros = zeros + 1  # 0..16, as GPTQ's kernels read them (a stored 15 wraps a zero point of 0)
        return unpack_rows(fields["qweight"]), zeros

    def build(self, shards: list[dict[str, torch.Tensor]]) -> None:
        if self.format.online:
            weight = torch.cat([fields["weight"] for fields in shards]).to(self.target_device)
            self._check_shape(0, "weight", weight, (self.out_features, self.in_features))
            codes, zeros, scales = round_to_nearest(weight, self.group_size, clip_search=True)
            self._store(codes, zeros, scales)
            self.g_idx = None
            return
        codes, zeros, scales = [], [], []
        for shard, fields in enumerate(shards):
            shard_codes, shard_zeros = self._shard_codes(shard, fields)
            self._check_shape(shard, "scales", fields["scales"], (self.num_groups, self.output_sizes[shard]))
            if not torch.isfinite(fields["scales"]).all():
                raise ValueError(f"{self.prefixes[shard]}.scales has non-finite values")
            codes.append(shard_codes)
            zeros.append(shard_zeros)
            scales.append(fields["scales"].to(torch.float32))
        self._store(torch.cat(codes, dim=1), torch.cat(zeros, dim=1), torch.cat(scales, dim=1))
        self.g_idx = self._group_index(shards)

    def _store(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> None:
        """Keep codes ``[K, N]`` packed, zero points and scales ``[G, N]`` on the target device."""
        device = self.target_device
        self.qweight = nn.Parameter(pack_rows(codes).to(device), requires_grad=False)  # contiguous
        self.zeros = nn.Parameter(zeros.contiguous().to(device), requires_grad=False)
        self.scales = nn.Parameter(scales.contiguous().to(device), requires_grad=False)
        if device.type == "cuda":
            import tfbackend.quantization.kernels.w4a16_gemm  # noqa: F401  (registers torch.ops.tfbackend.w4a16_gemm)

    def _group_index(self, shards: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """The shared ``g_idx`` of an act-order checkpoint; None when it is the trivial ``k // group_size``."""
        if not self.format.has_g_idx:
            return None
        first = shards[0]["g_idx"].to(torch.int32)
        self._check_shape(0, "g_idx", first, (self.in_features,))
        for shard, fields in enumerate(shards[1:], start=1):
            if not torch.equal(fields["g_idx"].to(torch.int32), first):
                raise ValueError(
                    f"{self.prefixes[shard]}.g_idx differs from {self.prefixes[0]}.g_idx; fused projections "
                    f"must share their act-order permutation"
                )
        if first.min() < 0 or first.max() >= self.num_groups:
            raise ValueError(f"{self.prefixes[0]}.g_idx has groups outside [0, {self.num_groups})")
        trivial = torch.arange(self.in_features, dtype=torch.int32) // self.group_size
        return None if torch.equal(first, trivial) else first.to(self.target_device)

    def _groups_of_rows(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        codes = unpack_rows(self.qweight).to(torch.float32)  # [K, N]
        groups = self._groups_of_rows()
        weight = (codes - self.zeros[groups].to(torch.float32)) * self.scales[groups]
        return weight.T.contiguous()

    def apply_gpu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tfbackend.w4a16_gemm(x, self.qweight, self.scales, self.zeros, self.g_idx, self.group_size)
