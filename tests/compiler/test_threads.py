"""Two threads compiling fresh models at once: the trace stage is serialised (transform.py's
_TRACING lock), so neither sees the other's tracer state."""

from __future__ import annotations

import threading
import warnings

import timm
import torch
from torch import nn

from libragrad_fx import libra_transform

ROUNDS = 10  # per thread: 20 compiles in all


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                             embed_dim=16, num_heads=2, num_classes=3).eval()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2)).eval()


def test_two_threads_compile_fresh_models_twenty_times_without_error():
    failures: list[BaseException] = []
    reports: list[bool] = []
    start = threading.Barrier(2)

    def compile_many(build, frontend, example):
        start.wait()
        for _ in range(ROUNDS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gm = libra_transform(build(), frontend=frontend, example_inputs=example)
                reports.append(gm.libra_report.complete)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(exc)

    threads = [threading.Thread(target=compile_many, args=(_vit, "fx", None)),
               threading.Thread(target=compile_many,
                                args=(_mlp, "export", (torch.randn(2, 4),)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, [f"{type(e).__name__}: {e}" for e in failures[:3]]
    assert reports == [True] * (2 * ROUNDS)
