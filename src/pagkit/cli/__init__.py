"""The ``pagkit`` command: ``layers``, ``sample``, ``eval``, ``tune``, ``restore``, ``bench``, ``train``, ``studio``.

Errors a user can fix (a bad path, an unknown layer, a bad number) end in one
line on stderr and exit code 2, never a traceback.

One module per subcommand, each with ``add_parser(subparsers)`` (its options) and ``run(args)``;
``common`` holds the argparse types and option groups they share, ``pagkit.defaults`` the shipped defaults.
"""
from __future__ import annotations

import argparse
import sys

from . import bench, eval, layers, restore, sample, train, tune  # eval: the subcommand (no builtin eval here)
from .common import _Parser
from ..studio import command as studio  # the page's subcommand lives beside the page (it imports no Gradio)
# re-exported: the names pagkit.cli had as one module (tests and docs/make_results.py import them from here)
from ..defaults import (DEFAULT_CFG_SCALE, DEFAULT_COND, DEFAULT_PAG_LAYERS, DEFAULT_PAG_SCALE, DEFAULT_SEG_SCALE,
                        DEFAULT_UNCOND, NULL_CLASS)
from .eval import eval_configs
from .restore import TASK_OPTIONS

__all__ = ["main", "build_parser", "eval_configs", "TASK_OPTIONS", "DEFAULT_CFG_SCALE", "DEFAULT_COND",
           "DEFAULT_PAG_LAYERS", "DEFAULT_PAG_SCALE", "DEFAULT_SEG_SCALE", "DEFAULT_UNCOND", "NULL_CLASS"]

COMMANDS = (layers, sample, bench, eval, tune, restore, train, studio)  # in pagkit --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pagkit", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as err:  # OSError: a full disk, an unreadable file
        text = err.strerror if isinstance(err, OSError) and err.strerror and err.filename is None else str(err)
        message = text.splitlines()[0] if text else type(err).__name__
        print(f"pagkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
