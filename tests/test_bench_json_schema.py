"""`tfbackend bench throughput --json-schema`: T1 without and with a grammar on every request, side by side."""

from __future__ import annotations

import json
from pathlib import Path

from tfbackend.entrypoints.cli import main

SCHEMA = Path(__file__).parent.parent / "benchmarks" / "structured_output_schema.json"


def test_throughput_with_a_json_schema_adds_a_row(tiny_text_model, tmp_path) -> None:
    out = tmp_path / "t1.json"
    args = ["bench", "throughput", "--model", str(tiny_text_model), "--device", "cpu", "--kv-cache-memory", "16MiB",
            "--num-requests", "4", "--input-len-min", "4", "--input-len-max", "8", "--output-len", "6",
            "--json-schema", str(SCHEMA), "--output", str(out)]
    assert main(args) == 0
    plain, structured = json.loads(out.read_text())["results"]
    assert structured["system"] == plain["system"] + " json-schema"
    assert structured["output_tokens"] == plain["output_tokens"] == 4 * 6  # the schema cannot end in 6 tokens
    assert "time per output token vs none" in structured["note"]


def test_a_bad_schema_file_is_a_clear_error(tiny_text_model, tmp_path, capsys) -> None:
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    args = ["bench", "throughput", "--model", str(tiny_text_model), "--device", "cpu", "--json-schema", str(bad)]
    assert main(args) == 2
    assert "--json-schema" in capsys.readouterr().err
