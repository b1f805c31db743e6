"""Sharding a benchmark over processes with torch.distributed, and gathering its rows.

Launched by ``torchrun --nproc_per_node N -m benchmarks.<name>``, every process takes every N-th
item (gloo on CPU, nccl on GPU) and rank 0 gathers the rows in the order a single process would
have produced them. Started plainly, it is a world of one and nothing is initialised.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes; False for a plain single-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():  # nccl gathers through each rank's own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def device() -> torch.device:
    """Where this process computes: its GPU under nccl (or a plain run on a GPU machine),
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, size) of this process, (0, 1) outside a process group."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(count: int) -> list[int]:
    """The indices of ``count`` items this process handles: every size-th, from its rank."""
    rank, size = world()
    return list(range(rank, count, size))


def gather(rows: list[Any], count: int) -> list[Any] | None:
    """Every process's rows (one per index of ``shard(count)``) in index order, on rank 0;
    None on the other ranks."""
    rank, size = world()
    if size == 1:
        return rows
    parts: list[list[Any]] = [[] for _ in range(size)]
    dist.all_gather_object(parts, rows)
    if rank != 0:
        return None
    ordered: list[Any] = [None] * count
    for source, part in enumerate(parts):
        for index, row in zip(range(source, count, size), part, strict=True):
            ordered[index] = row
    return ordered


def barrier() -> None:
    """Wait for every process (nothing to wait for in a world of one)."""
    if dist.is_initialized():
        dist.barrier()
