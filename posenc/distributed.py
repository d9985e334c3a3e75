"""Several processes measuring one folder: torchrun's ranks, their shards, and sums reduced across them.

Under ``torchrun --nproc_per_node N`` (or ``--nnodes``), :func:`join` joins the process group from torchrun's
environment (``env://``; nccl on GPUs, gloo on CPUs) and returns this process's :class:`Ranks`. Each rank
measures :meth:`Ranks.shard` of the items, keeps *sums* (never means), and :func:`all_sum` adds the sums of every
rank, so the result equals one process's: exactly for counts, to float tolerance for the rest. Without torchrun
(``WORLD_SIZE`` unset or 1) everything is the identity and no process group is made.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and shows progress)."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """Indices of ``n`` items that this rank takes: every ``world_size``-th, starting at its rank."""
        return range(self.rank, n, self.world_size)


def join(device: str | torch.device | None = None) -> Ranks:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; pick the device (cuda:LOCAL_RANK when available).

    Args:
        device: force a device type ("cpu" or "cuda"); None picks cuda when available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if world_size == 1:
        return Ranks(0, 1, where)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if where.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), where)


def leave() -> None:
    """Destroy the process group when one was joined (call once, at the end of the command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option of a command that runs under torchrun (see :func:`joined`)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda:LOCAL_RANK when a GPU is present, else the CPU")


@contextmanager
def joined(device: str = "auto") -> Iterator[Ranks]:
    """:func:`join` for the length of a command (``device``: the ``--device`` option) and :func:`leave` after."""
    ranks = join(None if device == "auto" else device)
    try:
        yield ranks
    finally:
        leave()


def all_sum(sums: Mapping[str, Any], ranks: Ranks) -> dict[str, Any]:
    """Add named sums over every rank; a name that only some ranks hold counts as zero on the others.

    Args:
        sums: name -> int, float or array of any shape (float64 arithmetic; ints come back as ints, exact below
            2**53).
        ranks: from :func:`join`.

    Returns:
        name -> the sum over the ranks, for the union of the names; ``sums`` converted as is with one rank.
    """
    if ranks.world_size == 1:
        return dict(sums)
    mine = {k: (np.shape(v), isinstance(v, (int, np.integer))) for k, v in sums.items()}
    every: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(every, mine)
    specs: dict[str, tuple[tuple[int, ...], bool]] = {}
    for found in every:
        for k, (shape, is_int) in found.items():
            if k in specs and specs[k][0] != shape:
                raise ValueError(f"{k!r} has shape {specs[k][0]} on one rank and {shape} on another")
            specs[k] = (tuple(shape), specs.get(k, (shape, True))[1] and is_int)
    names = sorted(specs)
    sizes = [int(np.prod(specs[k][0])) for k in names]
    flat = np.zeros(sum(sizes), dtype=np.float64)
    offset = 0
    for k, size in zip(names, sizes):
        if k in sums:
            flat[offset : offset + size] = np.asarray(sums[k], dtype=np.float64).reshape(-1)  # size
        offset += size
    t = torch.from_numpy(flat).to(ranks.device)
    dist.all_reduce(t)
    total = t.cpu().numpy()
    out: dict[str, Any] = {}
    offset = 0
    for k, size in zip(names, sizes):
        shape, is_int = specs[k]
        part = total[offset : offset + size]
        offset += size
        if shape == ():
            out[k] = int(round(part[0])) if is_int else float(part[0])
        else:
            out[k] = part.reshape(shape).copy()  # shape
    return out


def all_gather_list(items: list[Any], ranks: Ranks) -> list[Any]:
    """Every rank's list joined in rank order (picklable items); ``items`` itself with one rank."""
    if ranks.world_size == 1:
        return list(items)
    every: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(every, items)
    return [item for found in every for item in found]
