"""Engine configuration, one dataclass with vLLM's option names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfbackend.quantization.config import QUANTIZATION_METHODS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; fp8 means E4M3


@dataclass
class EngineConfig:
    model: str | None = None  # local HF folder, .gguf file or Hub id; None: the embedded default model
    tokenizer: str | None = None  # defaults to the model folder
    model_impl: str = "auto"  # auto | native | transformers
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto | triton | torch
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes; default on CPU 1 GiB
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    seed: int = 0
    trust_remote_code: bool = False  # run modeling code that a checkpoint ships (its auto_map)
    # Several GPUs (or CPU processes): ranks = tensor_parallel_size x pipeline_parallel_size, one process each,
    # spread evenly over nnodes nodes that meet at master_addr:master_port (node 0 runs the engine).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # default on one node: any free port; several nodes must name one
    # None: the checkpoint's own quantization_config, if any. "fp8" also quantizes a bf16/fp32 checkpoint's
    # linear layers at load; a format name (awq, gptq, ...) insists that the checkpoint is in it.
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # auto: the model dtype | fp8 (E4M3, per-layer scales)

    def validate(self) -> None:
        positive = {
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "nnodes": self.nnodes,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        self._validate_parallel()

    def _validate_parallel(self) -> None:
        if self.world_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} ranks cannot be spread evenly "
                f"over {self.nnodes} nodes"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("several nodes need a --master-port to meet at (and the same --master-addr)")
        if self.world_size > 1 and self.device.startswith("cuda:"):
            raise ValueError(
                f"device {self.device!r} names one GPU; with several ranks pass 'cuda' (rank i of a node uses cuda:i)"
            )

    @property
    def world_size(self) -> int:
        """Processes that run the model: one per tensor-parallel rank of each pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, hf_config, device: torch.device) -> torch.dtype:
        """``auto``: the checkpoint's dtype on GPU (float16/bfloat16), float32 on CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        checkpoint = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(checkpoint, str):
            checkpoint = DTYPES.get(checkpoint)
        return checkpoint if checkpoint in (torch.float16, torch.bfloat16) else torch.bfloat16
