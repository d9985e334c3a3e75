"""``python -m posenc space USER/SPACE``: put exactly what the Space needs on a Hugging Face Space.

The Space runs ``app.py`` with the bundled checkpoints and the example images, configured by the README's
front matter; nothing else of the repository (tests, benchmarks, tools, CI, caches) goes up. The upload goes
through ``huggingface_hub``'s HTTP API (``HfApi.create_repo`` + ``HfApi.upload_folder``), not ``git push``:
the Hub answers which files are large files (binaries, and what ``.gitattributes`` marks) and the client sends
those through large-file storage (Xet when ``hf_xet`` is installed, LFS otherwise), so the Hub never sees a
binary inside a commit, the error a plain push of this repository runs into.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding ``app.py`` and the ``posenc`` package: what the command uploads from by default."""

ALLOW_PATTERNS: tuple[str, ...] = (
    "app.py",
    "requirements.txt",
    "README.md",  # the front matter is the Space's configuration
    ".gitattributes",
    "posenc/*.py",  # fnmatch's * crosses "/": every module of the package, sub-packages included
    "checkpoints/*/config.json",
    "checkpoints/*/model.safetensors",
    "checkpoints/*/README.md",
    "checkpoints/*/metrics.json",  # the accuracy the model list shows
    "assets/examples/*.png",
    "assets/examples/*.jpg",
    "assets/examples/*.jpeg",
    "assets/examples/*.webp",
)
"""What the Space needs, relative to the project folder (``huggingface_hub``'s fnmatch patterns)."""

IGNORE_PATTERNS: tuple[str, ...] = ("*/__pycache__/*", "*.pyc")
"""What never goes up even where an allow pattern matches."""

REQUIRED_FILES: tuple[str, ...] = ("app.py", "requirements.txt", "README.md", ".gitattributes", "posenc/__init__.py")
"""Files without which the folder is not a posenc project (the command refuses to upload it)."""


@dataclass(frozen=True)
class SpaceFile:
    """One file the command uploads.

    Attributes:
        path: posix path relative to the project folder (and in the Space).
        size: bytes.
        large: ``.gitattributes`` sends it through large-file storage (the Hub also does so for any binary).
    """

    path: str
    size: int
    large: bool


def lfs_patterns(gitattributes_text: str) -> list[str]:
    """The patterns that a ``.gitattributes`` text sends through LFS (lines carrying ``filter=lfs``)."""
    patterns = []
    for line in gitattributes_text.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def is_large(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` matches one of ``patterns`` as git does: a pattern without "/" matches the file name."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p.lstrip("/")) for p in patterns)


def space_files(folder: str | Path = PROJECT_ROOT) -> list[SpaceFile]:
    """The files of ``folder`` that go to the Space, sorted by path.

    The selection is the one ``HfApi.upload_folder`` makes with :data:`ALLOW_PATTERNS` and
    :data:`IGNORE_PATTERNS` (the same ``filter_repo_objects``).

    Raises:
        ValueError: ``folder`` lacks a file of :data:`REQUIRED_FILES`.
    """
    from huggingface_hub.utils import filter_repo_objects

    root = Path(folder).resolve()
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise ValueError(f"{root} is not a posenc project folder: it has no {', '.join(missing)}.")
    every = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    chosen = filter_repo_objects(every, allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS))
    patterns = lfs_patterns((root / ".gitattributes").read_text(encoding="utf-8"))
    return [SpaceFile(path, (root / path).stat().st_size, is_large(path, patterns)) for path in chosen]


def upload_space(repo_id: str, folder: str | Path = PROJECT_ROOT, *, private: bool | None = None,
                 token: str | None = None) -> str:
    """Create the Gradio Space ``repo_id`` if needed and upload :func:`space_files` to it in one commit.

    Files already on the Space that this command does not upload are left there.

    Args:
        repo_id: ``"user/space"``.
        folder: the project folder.
        private: create the Space private (only used when it does not exist yet).
        token: a Hub token; None uses the saved login (``hf auth login``) or ``HF_TOKEN``.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    space_files(folder)  # refuse a folder that is not a posenc project before creating anything
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="space",
        folder_path=Path(folder).resolve(),
        allow_patterns=list(ALLOW_PATTERNS),
        ignore_patterns=list(IGNORE_PATTERNS),
        commit_message="Upload posenc (python -m posenc space)",
    )
    return str(commit.commit_url)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``space`` subcommand."""
    parser = subparsers.add_parser(
        "space", help="upload the app, the bundled models and the examples to a Hugging Face Space",
        description="Create the Gradio Space USER/SPACE if needed and upload what it runs: app.py, the posenc "
                    "package, checkpoints/, the example images, requirements.txt, README.md (the Space's "
                    "configuration) and .gitattributes. Needs a Hub token with write access (hf auth login).")
    parser.add_argument("repo_id", metavar="USER/SPACE", help="the Space to create or update")
    parser.add_argument("--folder", default=str(PROJECT_ROOT), help="project folder (default: this checkout)")
    parser.add_argument("--dry-run", action="store_true", help="list the files and upload nothing")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the files, then upload them unless ``--dry-run``; returns the exit status."""
    if "/" not in args.repo_id:
        print(f"error: give the Space as USER/SPACE, got {args.repo_id!r}", file=sys.stderr)
        return 2
    try:
        files = space_files(args.folder)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for file in files:
        print(f"{file.path}\t{file.size}\t{'large file' if file.large else 'regular'}")
    total = sum(f.size for f in files)
    large = sum(f.large for f in files)
    print(f"{len(files)} files, {total / 2**20:.1f} MiB ({large} large files) -> spaces/{args.repo_id}")
    if args.dry_run:
        print("dry run: nothing uploaded")
        return 0
    if not getattr(args, "verbose", False):
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = upload_space(args.repo_id, args.folder, private=args.private or None, token=args.token)
    except (HfHubHTTPError, ValueError) as error:
        print(f"error: the upload to spaces/{args.repo_id} failed: {error}", file=sys.stderr)
        return 1
    print(f"uploaded: {url}")
    return 0
