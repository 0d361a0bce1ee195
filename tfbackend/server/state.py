"""What every route handler needs: the engine, the served names, the tokenizer and the server's limits."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tfbackend.server.async_engine import AsyncEngine
from tfbackend.server.chat_template import ChatRenderer
from tfbackend.tool_parsers import ToolParser

T = TypeVar("T")

# Request fields that a model's generation_config.json may default (vLLM's --generation-config auto).
GENERATION_DEFAULT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_names: list[str]  # the first one is reported in responses
    model_path: str
    max_model_len: int
    tokenizer: Any  # HF tokenizer or None
    vocab_size: int
    chat: ChatRenderer
    grammars: Any  # the engine's GrammarCompiler: compiled here off the event loop, found in its cache later
    tool_parser: ToolParser | None = None  # --tool-call-parser, for tool_choice "auto"
    enable_auto_tool_choice: bool = False
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    system_fingerprint: str = "fp_tfbackend"
    retry_after_s: int = 1  # told to clients refused with 429/503
    created: int = field(default_factory=lambda: int(time.time()))
    # Tokenizing, template rendering and grammar compiling run here, never on the event loop.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="tfbackend-prepare")
    )

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work (tokenization, templates, grammar compilation) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))


def load_generation_defaults(source: str, model_dir: str | Path) -> dict[str, Any]:
    """``--generation-config``: ``auto`` reads the model folder's generation_config.json, ``vllm`` (or
    ``default``) uses none, any other value is a folder holding a generation_config.json. Only the sampling
    fields the file sets explicitly become defaults for requests that leave them out."""
    if source in ("vllm", "default"):
        return {}
    folder = Path(model_dir) if source == "auto" else Path(source)
    path = folder / "generation_config.json"
    if not path.is_file():
        if source == "auto":
            return {}
        raise ValueError(f"--generation-config {source!r}: no generation_config.json in that folder")
    config = json.loads(path.read_text())
    return {ours: config[theirs] for theirs, ours in GENERATION_DEFAULT_FIELDS.items()
            if config.get(theirs) is not None}
