"""`saepipe` entry point. Each subcommand lives in its own module exposing `add_parser(subparsers)`; the parser's
`func(args) -> int` runs it."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `saepipe --help` lists them.
COMMANDS = ["extract_cmd", "demo_cmd", "info_cmd", "train_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saepipe", description="Activation extraction, SAE training and feature analysis.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pipeline.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pipeline.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        # Bad input of any stage surfaces as one line, not a traceback; --verbose keeps the traceback.
        if args.verbose:
            raise
        print(f"saepipe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
