"""`tfbackend generate` runs the engine from the command line."""

from __future__ import annotations

import json

from tests.tiny_models import make_checkpoint
from tfbackend.entrypoints.cli import main


def test_generate_chat_answers_with_the_default_model(smollm2_dir, capsys):
    status = main([
        "generate", str(smollm2_dir), "--chat", "--prompt", "What is the capital of France?",
        "--max-tokens", "16", "--json", "--device", "cpu", "--max-model-len", "512",
    ])
    assert status == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Paris" in result["text"]
    assert result["finish_reason"] == "stop"


def test_text_prompt_without_a_tokenizer_is_a_clear_error(tmp_path, capsys):
    make_checkpoint("llama", tmp_path)
    status = main(["generate", str(tmp_path), "--prompt", "hello", "--device", "cpu", "--max-model-len", "64"])
    assert status == 2
    assert "no tokenizer" in capsys.readouterr().err
