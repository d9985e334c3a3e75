"""``python -m posenc predict --model REPO_OR_DIR IMAGE [--top K] [--json]``: classify one image.

Prints the top-k classes, most probable first; with ``--json`` a list of
``{"index", "label", "probability"}``. A model or image that cannot be used prints one line to
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from huggingface_hub.utils import logging as hf_logging

from posenc.hub import HubLoadError, load
from posenc.preprocess import ImageError, load_image

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``predict`` subcommand."""
    parser = subparsers.add_parser("predict", help="classify an image with a Hub model or a local model folder")
    parser.add_argument("--model", required=True, help="Hub repo id (org/name) or a folder with config.json + weights")
    parser.add_argument("image", help="path of the image to classify")
    parser.add_argument("--top", type=_positive_int, default=5, metavar="K", help="how many classes to show (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, classify the image and print the result; returns the exit status."""
    if not getattr(args, "verbose", False):
        hf_logging.set_verbosity_error()  # keep the Hub client's retry chatter off the terminal
    try:
        image = load_image(args.image)
    except OSError as error:  # missing, a folder, unreadable
        return _fail(f"cannot read the image {args.image}: {error.strerror or error}")
    except ImageError as error:
        return _fail(str(error))
    try:
        predictions = load(args.model, revision=args.revision).predict(image, top_k=args.top)
    except HubLoadError as error:
        return _fail(str(error))
    if args.json:
        print(json.dumps([asdict(p) for p in predictions]))
        return 0
    if not predictions:
        print(f"{args.model} has no classifier head (a headless feature model): it returns features, not classes")
        return 0
    width = max(len(p.label) for p in predictions)
    for p in predictions:
        print(f"{p.probability:7.2%}  {p.label:<{width}}  ({p.index})")
    return 0


def _fail(message: str) -> int:
    """Print one line to stderr and return the usage-error status."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE
