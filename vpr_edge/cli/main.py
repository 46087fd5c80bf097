"""`vpr-edge` with subcommands. The convention: every subcommand is a module `vpr_edge/cli/<name>.py`
with `register(subparsers)` that declares its options (shared groups from `cli.options`) and a
handler that calls one stage function; the stages never import this package. Adding a subcommand is
that module plus one line in COMMANDS.

Subcommand modules import torch & co. only inside their handlers, so `--help` works everywhere.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vpr_edge import __version__
from vpr_edge.errors import VprEdgeError

# name -> "module" exposing register(subparsers) -> parser with set_defaults(func=...)
COMMANDS = {name: f"vpr_edge.cli.{name.replace('-', '_')}" for name in (
    "presets", "vocab", "pca", "describe", "export", "build-engine", "map", "run", "bench", "doctor", "distill",
)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpr-edge", description="Foundation-model place recognition on edge GPUs.")
    parser.add_argument("--version", action="version", version=f"vpr-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    # other libraries' loggers (exporter, optimizer) stay at WARNING; ours speaks at INFO
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("vpr_edge").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VprEdgeError as exc:
        if args.verbose:
            raise
        print(f"vpr-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        from vpr_edge.lazy import extra_for

        extra = extra_for(exc.name or "")
        if extra is None or args.verbose:
            raise
        print(f"vpr-edge: error: `{args.command}` needs {exc.name}, which is not installed; "
              f"install it with: pip install 'vpr-edge[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vpr-edge: interrupted; nothing was written under a final name", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def export_main(argv: list[str] | None = None) -> int:
    """`vpr-export ...` is `vpr-edge export ...`."""
    argv = sys.argv[1:] if argv is None else argv
    return main(["export", *argv])


if __name__ == "__main__":
    sys.exit(main())
