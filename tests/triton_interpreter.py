"""Helpers for running Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import numpy as np
import pytest
import triton.language as tl
from triton.runtime import interpreter


@pytest.fixture(scope="module")
def interpreter_bf16_dot():
    """Triton's interpreter (3.9) stores bf16 as uint16 and ``tl.dot`` multiplies those raw bit patterns.

    Widen bf16 operands to fp32 (exact) before the interpreter's matmul; compiled GPU kernels are unaffected.
    """
    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
        yield


@pytest.fixture(scope="module")
def interpreter_fp8_casts():
    """Triton's interpreter (3.9) rounds float32 -> fp8e4nv by bumping the truncated mantissa without carrying
    into the exponent (7.8 becomes 4.0, not 8.0). Convert through torch instead: round to nearest even,
    saturating at ±448, as the GPU's conversion does; compiled kernels are unaffected."""
    import torch

    original = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar != tl.float8e4nv or src.dtype.scalar != tl.float32:
            return original(self, src, dst_type, rounding_mode)
        wide = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        return interpreter.TensorHandle(wide.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), dst_type.scalar)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.InterpreterBuilder, "create_fp_to_fp", create_fp_to_fp)
        yield
