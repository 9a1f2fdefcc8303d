"""`saepipe` entry point. Each subcommand lives in its own module exposing `add_parser(subparsers, common)`; the
parser's `func(args) -> int` runs it. Exit codes: 0 done, 2 bad input (one line on stderr; -v for the traceback),
75 stopped by a signal after committing its work (run again to resume)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import __version__
from pipeline.errors import SaepipeError

# Subcommand modules, in the order `saepipe --help` lists them.
COMMANDS = ["extract_cmd", "train_cmd", "analyze_cmd", "browse_cmd", "eval_cmd", "steer_cmd", "label_cmd", "export_cmd", "submit_cmd", "status_cmd", "sweep_cmd", "report_cmd", "monitor_cmd", "plan_cmd", "info_cmd", "verify_cmd", "config_cmd",
            "demo_cmd"]


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes, before or after its name (`saepipe -v train ...` and `saepipe train -v ...`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and tracebacks for errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog="saepipe", parents=[common],
                                     description="Activation extraction, SAE training and feature analysis.")
    parser.add_argument("--version", action="version", version=f"saepipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.cli.{name}").add_parser(sub, common)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may come anywhere after the config, options included (argparse
    alone stops filling a positional list at the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for chatty in ("httpx", "httpx2"):  # one INFO line per LLM request would bury the progress bar
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except SaepipeError as err:
        # Bad input of any stage surfaces as one line, not a traceback; anything else is a bug and keeps its traceback.
        if getattr(args, "verbose", False):  # a subcommand may have found -v among its own arguments
            raise
        print(f"saepipe {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
