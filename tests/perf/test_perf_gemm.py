"""Perf gate for the bars every kernel is measured against: cuBLAS GEMM and a device copy."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.perf]


def test_perf_cublas_bf16_gemm_down_projection(cuda_bench):
    """(98304 x 2048) @ (2048 x 512): the record's MLP down projection, M,N,K = 98304, 512, 2048."""
    h = torch.randn(98304, 2048, device="cuda", dtype=torch.bfloat16)
    w_down = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    cuda_bench(lambda: torch.mm(h, w_down.t()))


def test_perf_copy_1gib(cuda_bench):
    """Device-to-device copy of 1 GiB (far past L2): the HBM bandwidth bar."""
    src = torch.randn(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    cuda_bench(lambda: dst.copy_(src))
