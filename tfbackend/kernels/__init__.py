"""Compute kernels shared by native ports and the Transformers fallback (attention lives in ``attention/``).

``moe.fused_experts`` runs a mixture-of-experts layer's experts: a Triton grouped GEMM on CUDA
(``fused_moe.py``), the torch reference elsewhere (``fused_moe_reference.py``). ``hf_experts`` registers it
as a transformers experts implementation for the fallback.
"""
