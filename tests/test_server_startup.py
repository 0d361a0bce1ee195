"""The served engine's startup report and compilation count, as a server's operator sees them."""

from __future__ import annotations

import httpx
from tests.server_process import SERVER_API_KEY, SERVER_MODEL, Server

from tfbackend.engine.startup import PHASES

COMPILATION_KINDS = ("torch_compile", "triton", "cuda_graph")


def test_metrics_count_compilations_after_ready_and_startup_phases(smollm2_server: Server) -> None:
    reply = httpx.post(f"{smollm2_server.url}/v1/completions", timeout=60,
                       headers={"Authorization": f"Bearer {SERVER_API_KEY}"},
                       json={"model": SERVER_MODEL, "prompt": "The capital of France is", "max_tokens": 4})
    assert reply.status_code == 200
    smollm2_server.wait_idle()
    metrics = httpx.get(f"{smollm2_server.url}/metrics").text
    for kind in COMPILATION_KINDS:
        assert f'tfbackend:compilations_after_ready{{kind="{kind}",model_name="{SERVER_MODEL}"}} 0.0' in metrics
    assert smollm2_server.metric("tfbackend:startup_seconds", phase="total") > 0
    assert smollm2_server.metric("tfbackend:startup_seconds", phase="load weights") > 0


def test_log_has_one_startup_line_per_phase(smollm2_server: Server) -> None:
    lines = [line for line in smollm2_server.log_text().splitlines() if "startup: " in line]
    phases = [line.rsplit("startup: ", 1)[1].split("  ")[0].strip() for line in lines]
    assert phases == [*PHASES, "total"]
