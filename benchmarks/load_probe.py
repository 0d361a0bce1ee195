"""How fast can tensor-parallel ranks copy their share of a safetensors checkpoint to their GPUs? (issue 10)

Writes a checkpoint of Llama-3.1-70B-shaped layers (bf16, ``--layers`` of them, 1.7 GB each), warms the page
cache, then for each strategy starts one process per GPU at once; each copies its tensor-parallel share (q/k/v
and gate/up by rows, o and down by columns, as a rank of a TP group does) to its GPU. Prints GB/s of
checkpoint bytes per rank and the slowest rank's seconds.

    python3 benchmarks/load_probe.py --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tfbackend.native.weights import MappedFiles, tensor_entries  # noqa: E402

HIDDEN, KV, INTERMEDIATE = 8192, 1024, 28672
SHAPES = {  # name -> (shape, dimension split across ranks)
    "q_proj": ((HIDDEN, HIDDEN), 0), "k_proj": ((KV, HIDDEN), 0), "v_proj": ((KV, HIDDEN), 0),
    "o_proj": ((HIDDEN, HIDDEN), 1), "gate_proj": ((INTERMEDIATE, HIDDEN), 0),
    "up_proj": ((INTERMEDIATE, HIDDEN), 0), "down_proj": ((HIDDEN, INTERMEDIATE), 1),
}
STRATEGIES = ["mmap-slice-then-device", "mmap-copy-into-device", "read-whole", "pread-pinned-slice-on-gpu",
              "mmap-populate-slice"]


def write_checkpoint(path: Path, layers: int) -> None:
    if path.exists():
        return
    from safetensors.torch import save_file
    tensors = {f"layers.{i}.{name}.weight": torch.full(shape, 0.01, dtype=torch.bfloat16)
               for i in range(layers) for name, (shape, _) in SHAPES.items()}
    save_file(tensors, str(path))


def share(tensor: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    size = tensor.shape[dim] // world
    return tensor.narrow(dim, rank * size, size)


def rank_main(path: Path, strategy: str, rank: int, world: int) -> None:
    device = torch.device("cuda", 0)
    torch.cuda.init()
    table = tensor_entries([path])
    targets = {}
    for name, entry in table.items():
        dim = SHAPES[name.split(".")[2]][1]
        local = list(entry.shape)
        local[dim] //= world
        targets[name] = (torch.empty(local, dtype=torch.bfloat16, device=device), dim)
    torch.cuda.synchronize()
    started = time.perf_counter()
    if strategy.startswith("mmap"):  # as the engine maps checkpoints (native/weights.py)
        files = MappedFiles()
        views = {name: files.tensor(entry) for name, entry in table.items()}
        if strategy == "mmap-populate-slice":
            files.maps[path].madvise(22)  # MADV_POPULATE_READ: page tables filled at once, not fault by fault
        for name, view in views.items():
            target, dim = targets[name]
            part = share(view, dim, rank, world)
            if strategy == "mmap-copy-into-device":
                target.copy_(part)
            else:
                target.copy_(part.clone().to(device))
    elif strategy == "read-whole":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in table:
                target, dim = targets[name]
                target.copy_(share(f.get_tensor(name), dim, rank, world))
    elif strategy == "pread-pinned-slice-on-gpu":
        largest = max(entry.end - entry.start for entry in table.values())
        staging = [torch.empty(largest, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        stream = torch.cuda.Stream()
        fd = os.open(path, os.O_RDONLY)
        for i, (name, entry) in enumerate(table.items()):
            buffer, event = staging[i % 2], events[i % 2]
            event.synchronize()  # the copy that last used this buffer is done
            start, count = entry.start, entry.end - entry.start
            view = memoryview(buffer.numpy())[:count]
            done = 0
            while done < count:
                done += os.preadv(fd, [view[done:]], start + done)
            target, dim = targets[name]
            with torch.cuda.stream(stream):
                whole = buffer[:count].to(device, non_blocking=True).view(torch.bfloat16).view(entry.shape)
                target.copy_(share(whole, dim, rank, world))
                event.record(stream)
        os.close(fd)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    print(json.dumps({"rank": rank, "seconds": elapsed}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--path", default="/tmp/load_probe.safetensors")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--strategy")
    args = parser.parse_args()
    path = Path(args.path)
    if args.rank is not None:
        return rank_main(path, args.strategy, args.rank, args.world)
    started = time.perf_counter()
    write_checkpoint(path, args.layers)
    print(f"checkpoint {path.stat().st_size / 1e9:.1f} GB ready in {time.perf_counter() - started:.1f} s", flush=True)
    with open(path, "rb") as f:  # into the page cache, as a checkpoint read before would be
        while f.read(1 << 28):
            pass
    world = torch.cuda.device_count()
    size = path.stat().st_size
    rows = []
    for strategy in args.strategies.split(","):
        procs = [subprocess.Popen([sys.executable, __file__, "--path", str(path), "--rank", str(r), "--world",
                                   str(world), "--strategy", strategy], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": str(r)}) for r in range(world)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        slowest = max(r["seconds"] for r in results)
        rows.append((strategy, slowest, size / slowest / 1e9))
        print(f"{strategy:28s} slowest rank {slowest:6.2f} s  {size / slowest / 1e9:6.2f} GB/s of checkpoint per rank",
              flush=True)
    print(f"\nload probe: {world} ranks, {size / 1e9:.1f} GB checkpoint")
    for strategy, slowest, rate in rows:
        print(f"  {strategy:28s} {slowest:6.2f} s  {rate:6.2f} GB/s")


if __name__ == "__main__":
    main()
