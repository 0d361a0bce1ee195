"""The all-reduce op that tensor-parallel models call on CUDA tensors: peer memory for the messages torch's
kernels take, the process group's own all-reduce for every other message and wherever peer memory cannot be set
up. The peer kernels need GPUs of one node (``benchmarks/allreduce_probe.py`` checks them there against NCCL);
on CPU, with gloo, these tests check the op's contract, its fallback and that it compiles as one graph."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tfbackend.distributed import peer_all_reduce
from tfbackend.distributed.comm import CommGroup
from tfbackend.distributed.peer_all_reduce import BUFFER_BYTES, PeerBuffer


@pytest.mark.parametrize(("shape", "dtype", "fits"), [
    ((256, 4096), torch.bfloat16, True),  # a decode step's message
    ((1, 4096), torch.float32, True),
    ((3,), torch.bfloat16, False),  # 6 bytes: not whole 4-byte words
    ((256, 4096), torch.float16, False),  # torch's kernels take bf16 and float32 only
    ((BUFFER_BYTES // 2 + 2,), torch.bfloat16, False),  # larger than the buffer
    ((0, 4096), torch.bfloat16, False),
])
def test_which_messages_take_peer_memory(shape, dtype, fits):
    assert PeerBuffer.fits(torch.empty(shape, dtype=dtype)) is fits


def test_group_sizes_the_kernels_lack_stay_on_nccl(caplog):
    with caplog.at_level(logging.INFO, logger=peer_all_reduce.__name__):
        assert not peer_all_reduce.enable(CommGroup(rank=0, size=3, name="any"), torch.device("cpu"))
    assert "not 3" in caplog.text


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list]:
    """Every scenario below, run once by two gloo ranks (processes), each on a group of its own; what each rank
    returned, by scenario and rank. One pair of processes for all: starting them is most of the cost."""
    context = mp.get_context("spawn")
    results = context.Queue()
    init_file = str(tmp_path_factory.mktemp("rendezvous") / "file")
    processes = [context.Process(target=_rank_main, args=(rank, init_file, results)) for rank in range(2)]
    for process in processes:
        process.start()
    by_rank = dict(results.get(timeout=180) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return {name: [by_rank[0][name], by_rank[1][name]] for name in by_rank[0]}


def _rank_main(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        outcome = {}
        for scenario in _SCENARIOS:  # each as a new engine's ranks in new processes: a new group, nothing mapped
            group = CommGroup.of(dist.new_group([0, 1]), [0, 1])
            peer_all_reduce._mapped_before = False
            outcome[scenario.__name__] = scenario(group)
        results.put((rank, outcome))
    finally:
        dist.destroy_process_group()


def _sums(group: CommGroup) -> tuple:
    enabled = peer_all_reduce.enable(group, torch.device("cpu"))
    x = torch.arange(12, dtype=torch.float32).view(3, 4) * (group.rank + 1)
    eager = torch.ops.tfbackend.peer_all_reduce(x, group.name)
    compiled = torch.compile(lambda t: torch.ops.tfbackend.peer_all_reduce(t * 2, group.name) + 1,
                             fullgraph=True, backend="aot_eager")(x)
    return enabled, eager.tolist(), compiled.tolist()  # lists: tensors die with the process


def _after_an_earlier_engine_on_rank_0(group: CommGroup) -> tuple[bool, bool]:
    if group.rank == 0:  # the driver process mapped some group for an engine before; this rank's worker is fresh
        peer_all_reduce._mapped_before = True
    enabled = peer_all_reduce.enable(group, torch.device("cpu"))
    return enabled, peer_all_reduce._mapped_before  # on rank 1: whether it tried (and would wait forever)


class _BufferThatWorksAlone:
    """Stands in for rank 0's peer buffer: gives the exact sum without a collective, as if mapping worked there."""

    def __init__(self, group_name: str, device: torch.device):
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x / (self.rank + 1) * (self.world_size * (self.world_size + 1) // 2)


def _where_only_rank_0_can_map(group: CommGroup) -> bool:
    real = peer_all_reduce.PeerBuffer
    if group.rank == 0:
        peer_all_reduce.PeerBuffer = _BufferThatWorksAlone
    try:
        return peer_all_reduce.enable(group, torch.device("cpu"))
    finally:
        peer_all_reduce.PeerBuffer = real


def _with_the_variable_on_rank_1_only(group: CommGroup) -> tuple[bool, bool]:
    if group.rank == 1:
        os.environ[peer_all_reduce.PEER_ALL_REDUCE_ENV] = "0"
    try:
        enabled = peer_all_reduce.enable(group, torch.device("cpu"))
    finally:
        os.environ.pop(peer_all_reduce.PEER_ALL_REDUCE_ENV, None)
    return enabled, peer_all_reduce._mapped_before


_SCENARIOS = (_sums, _after_an_earlier_engine_on_rank_0, _where_only_rank_0_can_map,
              _with_the_variable_on_rank_1_only)


def test_op_sums_over_the_group_and_falls_back_where_peer_memory_is_missing(outcomes):
    """On CPU there is no peer memory: ``enable`` says so instead of raising, and the op sums through gloo,
    eagerly and inside a compiled graph."""
    expected = torch.arange(12, dtype=torch.float32).view(3, 4) * 3
    for enabled, eager, compiled in outcomes["_sums"]:
        assert not enabled
        assert eager == expected.tolist()
        assert compiled == (expected * 2 + 1).tolist()


def test_a_process_maps_peer_memory_once_and_the_ranks_agree(outcomes):
    """torch numbers its rendezvous exchanges per process and keeps a group name's mapping (a later engine's
    groups reuse the names): a rank that mapped any group before and a fresh one would wait for each other
    forever. So when any rank mapped peer memory before, no rank tries."""
    (enabled_0, _), (enabled_1, tried_1) = outcomes["_after_an_earlier_engine_on_rank_0"]
    assert not enabled_0 and not enabled_1
    assert not tried_1


def test_a_rank_that_cannot_map_peer_memory_turns_it_off_for_all(outcomes):
    """Every rank must take the same path at every all-reduce, or they wait for each other forever."""
    assert outcomes["_where_only_rank_0_can_map"] == [False, False]


def test_the_environment_turns_the_peer_path_off_on_every_rank(outcomes):
    """``TFBACKEND_PEER_ALL_REDUCE=0`` on any rank (another node's environment, say) keeps every rank on NCCL."""
    (enabled_0, tried_0), (enabled_1, tried_1) = outcomes["_with_the_variable_on_rank_1_only"]
    assert not enabled_0 and not enabled_1
    assert not tried_0 and not tried_1
