"""Perf gate for the fused MLP at the record shape (M = 98304 tokens, K = 512, N = 2048, bf16)."""

import pytest
import torch

import kernels.mlp as mlp

pytestmark = [pytest.mark.gpu, pytest.mark.perf]

M, K, N = 98304, 512, 2048


@pytest.fixture
def operands():
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w_up = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
    w_down = (torch.randn(K, N, device="cuda") / N**0.5).bfloat16()
    return x, w_up, w_down


def test_perf_mlp_up_act_kernel(cuda_bench, operands):
    x, w_up, _ = operands
    post = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    signs = torch.empty(M, mlp.sign_words(N), device="cuda", dtype=torch.int32)
    cuda_bench(lambda: mlp.up_act(x, w_up, post, signs))


def test_perf_mlp_act_grad_kernel(cuda_bench, operands):
    x, w_up, w_down = operands
    post, signs = mlp.up_act(x, w_up)
    g, dpre = torch.randn_like(x), torch.empty_like(post)
    cuda_bench(lambda: mlp.act_grad(g, w_down, post, signs, out=dpre))


def test_perf_mlp_fwd_bwd(cuda_bench, operands):
    inputs = [t.clone().requires_grad_() for t in operands]
    g = torch.randn_like(operands[0])
    cuda_bench(lambda: torch.autograd.grad(mlp.fused_mlp(*inputs, impl="triton"), inputs, g))
