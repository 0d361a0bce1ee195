"""Triton GEMMs for quantized weights. Importing a module registers its ``torch.ops.tfbackend`` op, an opaque
call for ``torch.compile``; they run on GPU, and on CPU under ``TRITON_INTERPRET=1`` for tests."""
