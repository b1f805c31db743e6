"""benchmarks.shards with two real processes on the CPU (gloo): the gathered rows are the
single-process rows, in order."""

from __future__ import annotations

import ast
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import shards

pytestmark = pytest.mark.bench  # see [tool.pytest.ini_options] markers


def _work(index: int) -> tuple[int, int]:
    return index, index * index + 1


def _worker(rank: int, size: int, rendezvous: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=size)
    try:
        assert shards.init_from_env() and shards.world() == (rank, size)
        mine = shards.shard(11)
        assert mine == list(range(rank, 11, size))
        gathered = shards.gather([_work(i) for i in mine], 11)
        if rank == 0:
            with open(out, "w") as f:
                f.write(repr(gathered))
        else:
            assert gathered is None
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_what_one_computes(tmp_path):
    out = tmp_path / "rows.txt"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    assert ast.literal_eval(out.read_text()) == [_work(i) for i in range(11)]


def test_a_plain_run_is_a_world_of_one():
    assert not shards.init_from_env()
    assert shards.world() == (0, 1)
    assert shards.shard(3) == [0, 1, 2]
    assert shards.gather(["a", "b", "c"], 3) == ["a", "b", "c"]
