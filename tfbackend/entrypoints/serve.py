"""``tfbackend serve [MODEL]``: an OpenAI-compatible HTTP server, with ``vllm serve``'s flag names."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os

from tfbackend.entrypoints.engine_args import add_engine_args, engine_config_from_args, human_int
from tfbackend.tool_parsers import TOOL_PARSERS

API_KEY_ENV = "TFBACKEND_API_KEY"
DEFAULT_MAX_QUEUED_SEQS = 1024
DEFAULT_MAX_BODY = "8MiB"
GRACEFUL_TIMEOUT_S = 5  # uvicorn's last resort after the drain: cancelling handlers mid-response

logger = logging.getLogger(__name__)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show each flag's default (unless its help already tells it, or there is none to tell)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL at /v1/completions, /v1/chat/completions and /v1/models, with /tokenize,\n"
        "/detokenize, /version, /health and /metrics (Prometheus).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "model", nargs="?", default=None,
        help="local Hugging Face folder, .gguf file or Hub repo id (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                        help="the same as the positional MODEL")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--served-model-name", nargs="+", default=None,
        help="name(s) clients pass as `model` (default: MODEL as given); the first is used in responses",
    )
    parser.add_argument(
        "--api-key", default=None,
        help=f"require 'Authorization: Bearer KEY' on all but /health, /metrics and /version (default: "
        f"${API_KEY_ENV}, else no key)",
    )
    parser.add_argument("--chat-template", default=None,
                        help="Jinja chat template, as a file or inline (default: the tokenizer's)")
    parser.add_argument(
        "--generation-config", default="auto",
        help="sampling defaults for requests that leave them out: 'auto' reads the model's generation_config.json, "
        "'vllm' uses none, or a folder with a generation_config.json",
    )
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let the model decide when to call tools (tool_choice "auto"); needs --tool-call-parser')
    parser.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                        help="the format the model writes tool calls in")
    parser.add_argument(
        "--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_SEQS,
        help="most sequences waiting for a place in the batch (a request with n completions counts n); more get 429",
    )
    parser.add_argument("--max-request-body-size", type=human_int, default=DEFAULT_MAX_BODY,
                        help="largest request body in bytes, e.g. 8MiB; larger ones get 413")
    parser.add_argument("--drain-timeout", type=float, default=2.0,
                        help="on SIGTERM or Ctrl-C, seconds that requests in flight may still run before they are "
                        f"ended (a 503, or an error event closing the stream); at most {GRACEFUL_TIMEOUT_S - 1}")
    parser.add_argument("--uvicorn-log-level", default="info", help="the HTTP server's log level",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument(
        "--headless", action="store_true",
        help="on a node other than 0 (--node-rank > 0): run this node's ranks for the engine on node 0, no server",
    )
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    from tfbackend.distributed.launch import dump_stacks_on_signal

    dump_stacks_on_signal()  # `kill -USR1 <pid>` prints where a stuck server (or node launcher) is
    if args.headless:  # the model and every engine setting come from the driver on node 0
        from tfbackend.engine.executor import run_headless_node

        return run_headless_node(engine_config_from_args(args, args.model or args.model_flag or ""))

    # Imported here so `tfbackend --help` and the other sub-commands do not pay for torch and FastAPI.
    import uvicorn

    from tfbackend.engine.llm_engine import LLMEngine
    from tfbackend.engine.startup import freeze_startup_objects
    from tfbackend.model_source import default_model_name, resolve_model
    from tfbackend.server.app import build_app
    from tfbackend.server.async_engine import AsyncEngine
    from tfbackend.server.chat_template import ChatRenderer, load_chat_template
    from tfbackend.server.metrics import ServerMetrics
    from tfbackend.server.state import ServerState, load_generation_defaults
    from tfbackend.tool_parsers import HermesToolParser, get_tool_parser

    if args.model is not None and args.model_flag is not None and args.model != args.model_flag:
        raise ValueError(f"MODEL given twice, as {args.model!r} and --model {args.model_flag!r}")
    model = args.model or args.model_flag
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if not 0 <= args.drain_timeout <= GRACEFUL_TIMEOUT_S - 1:
        raise ValueError(f"--drain-timeout must be between 0 and {GRACEFUL_TIMEOUT_S - 1} seconds")
    if args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be positive, got {args.max_queued_requests}")
    chat_template = load_chat_template(args.chat_template)
    model_path = resolve_model(model)  # a ValueError here is a user error: the CLI prints it, exit 2
    generation_defaults = load_generation_defaults(args.generation_config, model_path)
    config = engine_config_from_args(args, model_path)
    engine = LLMEngine(config)
    freeze_startup_objects()  # this process serves this engine until it exits

    # The engine has logged its implementation choice (and why) and its KV cache capacity.
    names = args.served_model_name or [model or default_model_name()]
    tool_parser = get_tool_parser(args.tool_call_parser) if args.tool_call_parser else None
    fingerprint = hashlib.sha256(f"{model_path}|{engine.model_impl}|{engine.dtype}".encode()).hexdigest()[:12]
    state = ServerState(
        engine=AsyncEngine(engine, ServerMetrics(names[0]), max_queued_seqs=args.max_queued_requests,
                           max_running_seqs=engine.scheduler.max_num_seqs),
        served_model_names=names,
        model_path=str(model_path),
        max_model_len=engine.max_model_len,
        tokenizer=engine.tokenizer,
        vocab_size=engine.vocab_size,
        chat=ChatRenderer(engine.tokenizer, chat_template, tool_parser or HermesToolParser()),
        grammars=engine.grammars,
        tool_parser=tool_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        generation_defaults=generation_defaults,
        system_fingerprint=f"fp_{fingerprint}",
    )
    if generation_defaults:
        logger.info("request defaults from the generation config: %s", generation_defaults)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = build_app(state, api_key=api_key, max_body_bytes=args.max_request_body_size)
    logger.info(
        "serving %s (max_model_len %d) at http://%s:%d/v1 (%s)", names[0], engine.max_model_len, args.host,
        args.port, "API key required" if api_key else "no API key",
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S)
    server = _draining_server(config, state.engine, args.drain_timeout)
    # A multi-rank engine that lost a rank cannot serve again: its requests fail, then the server exits.
    state.engine.on_dead = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    finally:
        engine.shutdown()
    return 1 if engine.dead is not None else 0


def _draining_server(config, engine, drain_s: float):
    """A uvicorn server that, on SIGTERM or Ctrl-C, lets requests in flight run for ``drain_s`` seconds and
    then stops the engine: they end at once (a 503, or an error event closing the stream), so every handler
    returns by itself instead of being cancelled mid-response (which uvicorn reports with a traceback)."""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                timer = threading.Timer(drain_s, engine.stop)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    return DrainingServer(config)
