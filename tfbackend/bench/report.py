"""Benchmark results: one row per (system, batch size), printed as a table, saved as JSON, drawn as a PNG."""

from __future__ import annotations

import json
import platform
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch

from tfbackend.bench.cold import ColdRun
from tfbackend.bench.workloads import LatencyResult, ThroughputResult


def throughput_row(system: str, result: ThroughputResult, floor_s: float, note: str = "") -> dict:
    return {
        "scenario": "throughput", "system": system, "num_requests": result.num_requests,
        "prompt_tokens": result.prompt_tokens, "output_tokens": result.output_tokens, "elapsed_s": result.elapsed_s,
        "output_tok_s": result.output_tok_s, "total_tok_s": result.total_tok_s,
        "floor_s": floor_s, "floor_fraction": floor_s / result.elapsed_s, "note": note,
    }


def cold_row(system: str, run: ColdRun, floor_s: float) -> dict:
    """A ``bench --cold`` run: its T1 row, with the startup and first request it measured."""
    row = throughput_row(
        system, run.throughput, floor_s,
        f"{run.compile_cache} compile cache: ready {run.startup_s:.1f} s after start, first request "
        f"{run.first_request_s * 1e3:.0f} ms",
    )
    row.update(compile_cache=run.compile_cache, startup_s=run.startup_s, startup_phases=run.startup_phases,
               first_request_ms=run.first_request_s * 1e3, compilations_after_ready=run.compilations_after_ready)
    return row


def latency_row(system: str, result: LatencyResult, floor_ttft_s: float, floor_step_s: float) -> dict:
    return {
        "scenario": "latency", "system": system, "batch_size": result.batch_size,
        "ms_per_token": result.step_s * 1e3,
        "ttft_ms": None if result.ttft_s is None else result.ttft_s * 1e3,
        "floor_ms_per_token": floor_step_s * 1e3, "floor_ttft_ms": floor_ttft_s * 1e3,
        "floor_fraction": floor_step_s / result.step_s,
    }


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "triton", "tfbackend"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def document(rows: list[dict], **sections) -> dict:
    return {"date": datetime.now().isoformat(timespec="seconds"), "versions": versions(), **sections, "results": rows}


def format_table(rows: list[dict]) -> str:
    """Throughput rows give tok/s, latency rows ms per token and TTFT; every row its fraction of the floor, and
    tfbackend's rows how often the engine compiled after it was ready (it should not)."""
    header = ("system", "scenario", "batch", "out tok/s", "total tok/s", "ms/token", "TTFT ms", "of floor",
              "compiled after ready", "note")
    lines = [header]
    for row in rows:
        lines.append((
            row["system"], row["scenario"],
            str(row.get("batch_size") or row.get("num_requests")),
            _number(row.get("output_tok_s"), "{:,.0f}"), _number(row.get("total_tok_s"), "{:,.0f}"),
            _number(row.get("ms_per_token"), "{:.3f}"), _number(row.get("ttft_ms"), "{:.1f}"),
            f"{row['floor_fraction']:.1%}", _number(row.get("compilations_after_ready"), "{}"), row.get("note", ""),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _number(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot(doc: dict, path: Path) -> str:
    """Draw the results; returns a message saying where, or why not (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    rows = doc["results"]
    figure, ax = plt.subplots(figsize=(8, 4.5))
    if rows and rows[0]["scenario"] == "throughput":
        names = [row["system"] for row in rows]
        ax.barh(names, [row["output_tok_s"] for row in rows], color="tab:blue")
        floor = max(row["output_tokens"] / row["floor_s"] for row in rows)
        ax.axvline(floor, color="tab:red", linestyle="--", label=f"hardware floor ({floor:,.0f} tok/s)")
        ax.set_xlabel("output tokens / s (higher is better)")
        ax.invert_yaxis()
    else:
        for system in dict.fromkeys(row["system"] for row in rows):
            mine = [row for row in rows if row["system"] == system]
            ax.plot([r["batch_size"] for r in mine], [r["ms_per_token"] for r in mine], marker="o", label=system)
        floors = {row["batch_size"]: row["floor_ms_per_token"] for row in rows}
        ax.plot(list(floors), list(floors.values()), "k--", label="hardware floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per decode step (lower is better)")
    ax.set_title(f"{doc['model']['name']} on {doc['hardware']['device']}")
    ax.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"plot written to {path}"
