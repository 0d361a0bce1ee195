"""`tfbackend serve`'s command line: vLLM's flag spellings, defaults in --help, `python -m tfbackend`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tfbackend.entrypoints.cli import main
from tfbackend.server.state import load_generation_defaults


def test_python_dash_m_runs_the_cli_and_help_shows_defaults() -> None:
    result = subprocess.run([sys.executable, "-m", "tfbackend", "serve", "--help"], capture_output=True, text=True,
                            check=True)
    help_text = " ".join(result.stdout.split())
    for flag in ("--model MODEL", "--chat-template", "--generation-config", "--enable-auto-tool-choice",
                 "--tool-call-parser {hermes,llama3_json,mistral}", "--max-queued-requests", "--max-request-body-size"):
        assert flag in help_text
    for default in ("(default: 8000)", "(default: 1024)", "(default: 8MiB)", "(default: 256)", "(default: 0.9)"):
        assert default in help_text


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "a", "--model", "b"], "MODEL given twice"),
    (["serve", "--enable-auto-tool-choice"], "needs --tool-call-parser"),
    (["serve", "--max-queued-requests", "0"], "--max-queued-requests must be positive"),
    (["serve", "--chat-template", "/no/such/template.jinja"], "neither a file nor a Jinja template"),
])
def test_bad_serve_flags_are_one_line_errors(args: list[str], message: str, capsys) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_dtype_accepts_vllm_spellings() -> None:
    from tfbackend.entrypoints import engine_args

    assert [engine_args._dtype(name) for name in ("half", "bf16", "float", "bfloat16")] == [
        "float16", "bfloat16", "float32", "bfloat16"]


def test_generation_config_defaults(tmp_path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 64, "do_sample": True, "eos_token_id": 2}))
    expected = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 64}
    assert load_generation_defaults("auto", tmp_path) == expected
    assert load_generation_defaults(str(tmp_path), "/elsewhere") == expected
    assert load_generation_defaults("vllm", tmp_path) == {}
    assert load_generation_defaults("auto", tmp_path / "none") == {}
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_generation_defaults(str(tmp_path / "none"), tmp_path)
