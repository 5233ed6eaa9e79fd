"""Perf gate for Newton-Schulz over the record's banks and the whole single-GPU Muon step."""

from __future__ import annotations

import pytest
import torch

from optim import BankedNewtonSchulz, Muon

pytestmark = [pytest.mark.gpu, pytest.mark.perf]

BANKS = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
SHARD_8WAY = [(3, 512, 512), (3, 256, 512), (2, 2048, 512), (2, 512, 2048)]


def _plan(shapes):
    return BankedNewtonSchulz([torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes])


def test_perf_ns_all_banks(cuda_bench):
    cuda_bench(_plan(BANKS))


def test_perf_ns_8way_shard(cuda_bench):
    cuda_bench(_plan(SHARD_8WAY))


def test_perf_muon_step(cuda_bench):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in BANKS]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Muon(params, lr=0.022, weight_decay=0.095)
    cuda_bench(opt.step)
