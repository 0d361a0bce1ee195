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
