"""Several nodes on one machine: node 0 is this process (the engine and rank 0), node 1 a separate launcher,
``tfbackend serve --headless``, that starts its ranks and meets node 0 at --master-port, as on a cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.parallel_runs import NEW_TOKENS, generate, prompts_below
from tests.tiny_models import hf_greedy, make_checkpoint

from tfbackend.distributed.rendezvous import free_port


def start_headless_node(port: int, tp: int, pp: int, log: Path) -> subprocess.Popen:
    """Node 1 of 2: only the rendezvous flags (the model and engine settings come from node 0)."""
    command = [
        sys.executable, "-m", "tfbackend.entrypoints.cli", "serve", "--headless", "--device", "cpu",
        "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
    ]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tensor-parallel", "pipeline-parallel"])
def test_two_nodes_generate_what_hf_generates(tp, pp, tmp_path):
    hf_model = make_checkpoint("llama", tmp_path / "model")
    prompts = prompts_below(256)
    port = free_port()
    node1 = start_headless_node(port, tp, pp, tmp_path / "node1.log")
    try:
        tokens, specs = generate(tmp_path / "model", prompts, model_impl="native", tensor_parallel_size=tp,
                                 pipeline_parallel_size=pp, nnodes=2, node_rank=0, master_port=port)
        assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)
        assert len(specs) == 2
        # The engine's shutdown stops node 1's rank, and the launcher exits with it.
        assert node1.wait(timeout=120) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
        print("node 1:", (tmp_path / "node1.log").read_text())  # shown when the test fails
