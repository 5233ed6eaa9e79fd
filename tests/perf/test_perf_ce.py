"""Perf gate for the fused softcapped cross-entropy at the record shape (48 x 2048 tokens, V = 8192, bf16)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.perf]

N, V = 48 * 2048, 8192


@pytest.fixture
def record_inputs():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the fused cross-entropy kernel targets Hopper (sm_90)")
    logits = (torch.randn(N, V, device="cuda") * 8).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda")
    return logits, targets


def test_perf_ce_fwd(cuda_bench, record_inputs):
    from kernels.cross_entropy import softcapped_cross_entropy

    logits, targets = record_inputs
    cuda_bench(lambda: softcapped_cross_entropy(logits, targets, impl="triton"))


def test_perf_ce_fwd_bwd(cuda_bench, record_inputs):
    from kernels.cross_entropy import softcapped_cross_entropy

    logits, targets = record_inputs
    logits.requires_grad_()
    cuda_bench(lambda: torch.autograd.grad(softcapped_cross_entropy(logits, targets, impl="triton"), logits))
