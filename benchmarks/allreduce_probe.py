"""All-reduce latency on this machine's GPUs, by message size: NCCL against torch's symmetric-memory kernels.

Run from the repository root on a machine with 2+ GPUs: ``python3 benchmarks/allreduce_probe.py [--world-size 2]
[--hidden 4096]``. One process per GPU; for each token count T it all-reduces a [T, hidden] bf16 tensor 20 times
inside one CUDA graph (as a decode step does) and prints the microseconds per all-reduce of each method, after
checking each against NCCL's sum:

- ``nccl``: ``_c10d_functional.all_reduce``, NCCL picks its algorithm;
- ``one-shot``: ``symm_mem.one_shot_all_reduce_copy`` (the input copied into a buffer every rank can read, then
  each rank reads all the others' and sums);
- ``two-shot``: ``symm_mem.two_shot_all_reduce_out`` on that buffer (reduce-scatter then all-gather through
  peer memory), the copy in included;
- ``engine``: what ``CommGroup.all_reduce`` runs (``tfbackend.distributed.peer_all_reduce``: one of the above
  by size, set up by ``enable`` as the engine's ranks do).

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1), as the lent machines ask.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tfbackend.distributed import peer_all_reduce

TOKENS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 8192)
REPEATS = 20


def time_graph(fn, replays: int = 10) -> float:
    """Microseconds per call of ``fn``, captured ``REPEATS`` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * REPEATS)


def worker(rank: int, world_size: int, hidden: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    group = dist.group.WORLD.group_name
    functional = torch.ops._c10d_functional

    enabled = peer_all_reduce.enable(group, rank, world_size, device)
    buffer = peer_all_reduce.PeerBuffer(group, device)

    methods = {
        "nccl": lambda x: functional.wait_tensor(functional.all_reduce(x, "sum", group)),
        "one-shot": buffer.one_shot,
        "two-shot": buffer.two_shot,
        "engine": lambda x: torch.ops.tfbackend.peer_all_reduce(x, group),
    }

    rows = []
    for tokens in TOKENS:
        if tokens * hidden * 2 > peer_all_reduce.BUFFER_BYTES:
            break
        generator = torch.Generator(device=device).manual_seed(1000 * rank + tokens)
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device, generator=generator)
        expected = methods["nccl"](x.clone())
        row = [tokens, tokens * hidden * 2 / 2**20]
        for fn in methods.values():
            try:
                got = fn(x)
                torch.cuda.synchronize()
                if not torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=1e-2):
                    row.append("WRONG")
                    continue
                row.append(f"{time_graph(lambda fn=fn, x=x: fn(x)):.1f}")
            except Exception as error:  # noqa: BLE001 - a method this torch or machine lacks is reported, not fatal
                row.append(f"n/a ({type(error).__name__}: {str(error)[:60]})")
        rows.append(row)
    if rank == 0:
        print(f"all-reduce of [T, {hidden}] bf16 over {world_size} x {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}, "
              f"NCCL_PROTO={os.environ.get('NCCL_PROTO', 'default')}, engine's peer path "
              f"{'on' if enabled else 'OFF'}: microseconds per all-reduce (CUDA graph)")
        print(f"{'T':>6} {'MiB':>7} " + " ".join(f"{name:>10}" for name in methods))
        for tokens, mib, *times in rows:
            print(f"{tokens:>6} {mib:>7.3f} " + " ".join(f"{t:>10}" for t in times))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    for variable, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                            ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(variable, value)
    mp.spawn(worker, args=(args.world_size, args.hidden, args.port), nprocs=args.world_size)
