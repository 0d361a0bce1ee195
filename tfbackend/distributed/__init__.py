"""Running one model over several processes: tensor parallelism within a pipeline stage, pipeline stages over
nodes, on torch.distributed (NCCL on GPUs, gloo on CPUs).

This package holds what models and the engine share: the parallel context and its process groups
(``state``), collectives that compile and capture (``comm``), tensor-parallel layers (``layers``), sharding of
Hugging Face modules by their tensor-parallel plan and pipeline stages (``hf_parallel``, ``pipeline``),
rendezvous and process launch (``rendezvous``, ``launch``). The engine's side (driver and worker processes)
lives in ``tfbackend.engine.executor`` and ``tfbackend.engine.worker``.
"""

from tfbackend.distributed.comm import CommGroup
from tfbackend.distributed.state import SINGLE_PROCESS, ParallelContext, current_parallel, use_parallel

__all__ = ["SINGLE_PROCESS", "CommGroup", "ParallelContext", "current_parallel", "use_parallel"]
