"""The ``tfbackend`` command: one sub-command per module, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Sub-command name -> module defining add_parser(subparsers) and run(args) -> int.
SUBCOMMANDS = {
    "bench": "tfbackend.entrypoints.bench",
    "check": "tfbackend.entrypoints.check",
    "generate": "tfbackend.entrypoints.generate",
    "perplexity": "tfbackend.entrypoints.perplexity",
    "serve": "tfbackend.entrypoints.serve",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfbackend", description="LLM inference and serving engine")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(path) for name, path in SUBCOMMANDS.items()}
    for module in modules.values():
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return modules[args.command].run(args)
    except ValueError as error:  # user errors (bad model, bad option values) get one line, not a traceback
        print(f"tfbackend {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
