"""``tfbackend serve [MODEL]``: an OpenAI-compatible HTTP server, with ``vllm serve``'s flag names."""

from __future__ import annotations

import argparse
import logging
import os

from tfbackend.entrypoints.engine_args import add_engine_args, engine_config_from_args

API_KEY_ENV = "TFBACKEND_API_KEY"

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL at /v1/completions, /v1/chat/completions and /v1/models, with /health and "
        "/metrics (Prometheus).",
    )
    parser.add_argument(
        "model", nargs="?", default=None,
        help="local Hugging Face folder, .gguf file or Hub repo id (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-model-name", nargs="+", default=None,
        help="name(s) clients pass as `model` (default: MODEL as given); the first is used in responses",
    )
    parser.add_argument(
        "--api-key", default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else no key)",
    )
    parser.add_argument(
        "--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    parser.add_argument(
        "--headless", action="store_true",
        help="on a node other than 0 (--node-rank > 0): run this node's ranks for the engine on node 0, no server",
    )
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    if args.headless:  # the model and every engine setting come from the driver on node 0
        from tfbackend.engine.executor import run_headless_node

        return run_headless_node(engine_config_from_args(args, args.model or ""))

    # Imported here so `tfbackend --help` and the other sub-commands do not pay for torch and FastAPI.
    import uvicorn

    from tfbackend.engine.llm_engine import LLMEngine
    from tfbackend.model_source import default_model_name, resolve_model
    from tfbackend.server.app import ServerState, build_app
    from tfbackend.server.async_engine import AsyncEngine
    from tfbackend.server.metrics import ServerMetrics

    model_path = resolve_model(args.model)  # a ValueError here is a user error: the CLI prints it, exit 2
    engine = LLMEngine(engine_config_from_args(args, model_path))

    # The engine has logged its implementation choice (and why) and its KV cache capacity.
    names = args.served_model_name or [args.model or default_model_name()]
    state = ServerState(
        engine=AsyncEngine(engine, ServerMetrics(names[0])),
        served_model_names=names,
        model_path=str(model_path),
        max_model_len=engine.max_model_len,
        tokenizer=engine.tokenizer,
    )
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = build_app(state, api_key=api_key)
    logger.info(
        "serving %s (max_model_len %d) at http://%s:%d/v1 (%s)", names[0], engine.max_model_len, args.host,
        args.port, "API key required" if api_key else "no API key",
    )
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5
    ))
    # A multi-rank engine that lost a rank cannot serve again: its requests fail, then the server exits.
    state.engine.on_dead = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    finally:
        engine.shutdown()
    return 1 if engine.dead is not None else 0
