"""Command line: ``python -m posenc {predict,train,measure,atlas,space} ...``.

Each subcommand lives in the module that owns the concept and registers itself
through an ``add_parser(subparsers)`` function, so this file stays a dispatcher.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    from posenc import atlas, measure, predict, space, train

    parser = argparse.ArgumentParser(prog="python -m posenc", description="See how Vision Transformers encode position.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    predict.add_parser(sub)
    train.add_parser(sub)
    measure.add_parser(sub)
    atlas.add_parser(sub)
    space.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)
