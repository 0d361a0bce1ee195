"""GGUF weights kept quantized: Q8_0, Q4_1 and Q4_K linears run from their blocks; other types are dequantized.

A GGUF checkpoint, as ``tfbackend.model_source`` converts it, stores each weight as ``<name>.qweight`` (the GGUF
blocks of each row, uint8 ``[N, row_bytes]``) and ``<name>.qweight_type`` (its ``GGMLQuantizationType``), under
Hugging Face tensor names. At load the blocks of the kernel types are split into aligned planar arrays
(``PlanarGGUF``: the same bits, fields apart), which the Triton GEMM reads tile by tile; weights of any other
type, and tensors that are not linear weights (embeddings, norms), are dequantized with the ``gguf`` package.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import dequantize as gguf_dequantize

from tfbackend.quantization.linear import QuantizedLinear

KERNEL_TYPES = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)
QWEIGHT, QWEIGHT_TYPE = "qweight", "qweight_type"


@dataclass
class PlanarGGUF:
    """The blocks of a Q8_0 / Q4_1 / Q4_K weight ``[N, K]`` with each field in its own array (rows = N).

    ``qs``: the codes (int8 ``[N, K]`` for Q8_0; for 4-bit types the blocks' code bytes, uint8 ``[N, K / 2]``, in
    their GGUF order). ``d``: float16 scale per 32 (Q8_0, Q4_1) or per 256 (Q4_K) elements. ``m``: Q4_1's
    float16 minimum per 32, Q4_K's ``dmin`` per 256. ``sc``/``mn``: Q4_K's 6-bit sub-block scales and
    minimums per 32 elements, unpacked to uint8.
    """

    qtype: GGMLQuantizationType
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        per_byte = 1 if self.qtype == GGMLQuantizationType.Q8_0 else 2
        return self.qs.shape[0], self.qs.shape[1] * per_byte

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, qtype: GGMLQuantizationType) -> PlanarGGUF:
        """Split ``[N, row_bytes]`` uint8 GGUF rows (a CPU tensor) into fields.

        The byte copies run in numpy, on one thread: as torch ops each of them opened an OpenMP region whose
        threads spin-wait, which on a busy machine made loading a 135M-parameter model take seconds."""
        rows = blocks.shape[0]
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        per_row = blocks.numpy().reshape(rows, -1, type_size)

        def half(start: int) -> torch.Tensor:  # a float16 field at byte offset ``start`` of every block
            field = np.ascontiguousarray(per_row[..., start : start + 2])
            return torch.from_numpy(field.view(np.float16)).reshape(rows, -1)

        def codes(start: int) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(per_row[..., start:])).reshape(rows, -1)

        if qtype == GGMLQuantizationType.Q8_0:
            return cls(qtype, codes(2).view(torch.int8), half(0))
        if qtype == GGMLQuantizationType.Q4_1:
            return cls(qtype, codes(4), half(0), m=half(2))
        if qtype == GGMLQuantizationType.Q4_K:
            sc, mn = _unpack_q4_k_scales(torch.from_numpy(per_row[..., 4:16]))
            return cls(qtype, codes(16), half(0), m=half(2), sc=sc.reshape(rows, -1), mn=mn.reshape(rows, -1))
        kernel_types = ", ".join(t.name for t in KERNEL_TYPES)
        raise ValueError(f"no planar layout for GGUF type {qtype.name}; the kernel types are {kernel_types}")

    def dequantize(self) -> torch.Tensor:
        """``[N, K]`` float32, exactly as ``gguf.dequantize`` computes it."""
        rows, cols = self.shape
        if self.qtype == GGMLQuantizationType.Q8_0:
            return (self.qs.view(rows, -1, 32).float() * self.d.float()[..., None]).reshape(rows, cols)
        if self.qtype == GGMLQuantizationType.Q4_1:
            q = _nibbles(self.qs, 16).view(rows, -1, 32)
            return (q * self.d.float()[..., None] + self.m.float()[..., None]).reshape(rows, cols)
        q = _nibbles(self.qs, 32).view(rows, -1, 32)  # [N, K / 32, 32]: one sub-block per row
        scale = self.d.float().repeat_interleave(8, dim=1) * self.sc.float()
        minimum = self.m.float().repeat_interleave(8, dim=1) * self.mn.float()
        return (q * scale[..., None] - minimum[..., None]).reshape(rows, cols)

    def to(self, device: torch.device) -> PlanarGGUF:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return PlanarGGUF(**moved)

    @classmethod
    def cat(cls, parts: list[PlanarGGUF]) -> PlanarGGUF:
        """Stack weights of one type along the output dim."""
        joined = {}
        for f in fields(cls):
            values = [getattr(part, f.name) for part in parts]
            joined[f.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]
        return cls(**joined)


def _unpack_q4_k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 scale bytes -> 8 six-bit scales and 8 six-bit minimums (the layout ``gguf.quants.Q4_K`` reads)."""
    packed = packed.to(torch.int32)
    d, m, m_d = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    minimums = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales.to(torch.uint8), minimums.to(torch.uint8)


def _nibbles(qs: torch.Tensor, half: int) -> torch.Tensor:
    """Codes of 4-bit blocks whose ``half`` bytes hold element i low and element i + half high, float32."""
    rows = qs.shape[0]
    grouped = qs.view(rows, -1, half)
    return torch.cat([grouped & 0x0F, grouped >> 4], dim=-1).reshape(rows, -1).float()


def dequantize_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Any GGUF type's rows -> float32 ``[N, K]``: the kernel types through ``PlanarGGUF`` (the same values,
    with ~40% less CPU: it matters for a large embedding at load), the others by the ``gguf`` package."""
    if qtype in KERNEL_TYPES:
        return PlanarGGUF.from_blocks(blocks, qtype).dequantize()
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(blocks.numpy(), qtype), dtype=np.float32))


def ggml_type(tensor: torch.Tensor, where: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(tensor.reshape(-1)[0]))
    except ValueError:
        raise ValueError(f"{where}: unknown GGUF tensor type {int(tensor.reshape(-1)[0])}") from None


def _check_row_bytes(blocks: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], where: str) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block_size or tuple(blocks.shape) != (rows, cols // block_size * type_size):
        raise ValueError(
            f"{where}: {qtype.name} blocks of shape {tuple(blocks.shape)} do not hold a {rows}x{cols} weight "
            f"(blocks of {block_size} elements in {type_size} bytes)"
        )


class GGUFLinear(QuantizedLinear):
    """A linear from GGUF blocks. Fused shards of one kernel type share one GEMM; a shard of another type
    (llama.cpp mixes types, e.g. Q6_K for some v projections) gets its own, dense, part of the output."""

    def checkpoint_leaves(self) -> dict[str, str]:
        return {QWEIGHT: QWEIGHT, QWEIGHT_TYPE: QWEIGHT_TYPE}

    def build(self, shards: list[dict[str, torch.Tensor]]) -> None:
        # Runs of consecutive shards of one type become one part: (first row, rows, planar or dense weight).
        runs: list[tuple[GGMLQuantizationType, list[torch.Tensor]]] = []
        for shard, fields_ in enumerate(shards):
            where = f"{self.prefixes[shard]}.{QWEIGHT}"
            qtype = ggml_type(fields_[QWEIGHT_TYPE], where)
            blocks = fields_[QWEIGHT]
            if blocks.dtype != torch.uint8:
                raise ValueError(f"{where} is {blocks.dtype}; GGUF blocks are uint8")
            _check_row_bytes(blocks, qtype, (self.output_sizes[shard], self.in_features), where)
            if runs and runs[-1][0] == qtype and qtype in KERNEL_TYPES:
                runs[-1][1].append(blocks)
            else:
                runs.append((qtype, [blocks]))
        self.parts: list[tuple[int, int, PlanarGGUF | torch.Tensor]] = []
        start = 0
        for qtype, blocks in runs:
            joined = torch.from_numpy(np.concatenate([shard.numpy() for shard in blocks]))  # numpy: see from_blocks
            if qtype in KERNEL_TYPES:
                weight: PlanarGGUF | torch.Tensor = PlanarGGUF.from_blocks(joined, qtype).to(self.target_device)
            else:
                weight = dequantize_blocks(joined, qtype).to(self.dtype).to(self.target_device)
            self.parts.append((start, joined.shape[0], weight))
            start += joined.shape[0]
        self._register_part_tensors()
        if self.target_device.type == "cuda":
            import tfbackend.quantization.kernels.gguf_gemm  # noqa: F401  (registers torch.ops.tfbackend.gguf_gemm)

    def _register_part_tensors(self) -> None:
        """Register the parts' tensors as buffers, so ``state_dict`` and memory accounting see them."""
        for index, (_, _, weight) in enumerate(self.parts):
            if isinstance(weight, torch.Tensor):
                tensors = {"weight": weight}
            else:
                tensors = {f.name: getattr(weight, f.name) for f in fields(weight)}
                tensors = {name: tensor for name, tensor in tensors.items() if isinstance(tensor, torch.Tensor)}
            for name, tensor in tensors.items():
                self.register_buffer(f"part{index}_{name}", tensor, persistent=False)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([
            weight.dequantize() if isinstance(weight, PlanarGGUF) else weight.float() for _, _, weight in self.parts
        ])

    def apply_gpu(self, x: torch.Tensor) -> torch.Tensor:
        from tfbackend.quantization.kernels.gguf_gemm import KERNEL_TYPES as KERNEL_IDS

        outputs = []
        for _, _, weight in self.parts:
            if isinstance(weight, PlanarGGUF):
                outputs.append(torch.ops.tfbackend.gguf_gemm(
                    x, KERNEL_IDS[weight.qtype.name], weight.qs, weight.d, weight.m, weight.sc, weight.mn
                ))
            else:
                outputs.append(nn.functional.linear(x, weight))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def dequantize_unclaimed(
    weights: Iterable[tuple[str, torch.Tensor]], claimed: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, except ``X.qweight``/``X.qweight_type`` pairs that no quantized layer takes
    (``X.qweight`` not in ``claimed``): those become one dequantized float32 ``X.weight``."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if leaf not in (QWEIGHT, QWEIGHT_TYPE) or f"{prefix}.{QWEIGHT}" in claimed:
            yield name, tensor
            continue
        pair = pending.setdefault(prefix, {})
        pair[leaf] = tensor
        if len(pair) == 2:
            del pending[prefix]
            qtype = ggml_type(pair[QWEIGHT_TYPE], f"{prefix}.{QWEIGHT_TYPE}")
            yield f"{prefix}.weight", dequantize_blocks(pair[QWEIGHT], qtype)
    for prefix, pair in pending.items():
        missing = QWEIGHT_TYPE if QWEIGHT in pair else QWEIGHT
        raise ValueError(f"GGUF checkpoint has {prefix}.{next(iter(pair))} but no {prefix}.{missing}")
