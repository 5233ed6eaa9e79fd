"""cuBLAS bf16 GEMM at the record model's MLP shapes: the bar every fused MLP kernel is held to.

The record trains on 786,432 tokens per step over 8 GPUs = 98,304 tokens per GPU, d_model 512 and
MLP width 2048 (4x). Its MLP matmuls, with weights stored (out, in) as in nn.Linear:
  up     pre = x @ w_up.T       (98304 x 512) @ (512 x 2048)   M,N,K = 98304, 2048, 512
  down   y = h @ w_down.T       (98304 x 2048) @ (2048 x 512)  M,N,K = 98304, 512, 2048
  wgrad  dW_up = dpre.T @ x     (2048 x 98304) @ (98304 x 512) M,N,K = 2048, 512, 98304
and 8192^3, the square GEMM used as the compute ceiling. Operands keep the record's memory layout
(transposed views where the model has them), so cuBLAS picks the same kernels it would in training.
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, register

TOKENS = 98304
D_MODEL = 512
D_MLP = 2048

# (role, M, N, K, A stored transposed?, B stored transposed?)
SHAPES = [
    ("up", TOKENS, D_MLP, D_MODEL, False, True),
    ("down", TOKENS, D_MODEL, D_MLP, False, True),
    ("wgrad", D_MLP, D_MODEL, TOKENS, True, False),
    ("square", 8192, 8192, 8192, False, False),
]


def _operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
    """A (rows, cols) bf16 operand; a transposed view of a (cols, rows) tensor when `transposed`."""
    shape = (cols, rows) if transposed else (rows, cols)
    t = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    return t.t() if transposed else t


def _mm_setup(m: int, n: int, k: int, a_t: bool, b_t: bool):
    def setup():
        a = _operand(m, k, a_t)
        b = _operand(k, n, b_t)
        return lambda: torch.mm(a, b)

    return setup


@register("gemm", "cuBLAS bf16 GEMM (torch.mm) at the record's MLP shapes and 8192^3")
def cases(quick: bool) -> list[Case]:
    out = []
    for role, m, n, k, a_t, b_t in SHAPES:
        layout = ("T" if a_t else "N") + ("T" if b_t else "N")
        out.append(
            Case(
                suite="gemm",
                label=f"{role} {m}x{n}x{k}",
                params={"role": role, "M": m, "N": n, "K": k, "shape": f"{m}x{n}x{k}", "layout": layout},
                flops=2.0 * m * n * k,
                bytes=2.0 * (m * k + k * n + m * n),  # bf16: read A and B once, write C once
                providers=[Provider("cublas", _mm_setup(m, n, k, a_t, b_t), needs_cuda)],
                baseline="cublas",
                x="shape",
                notes=f"A{' (transposed view)' if a_t else ''} @ B{' (transposed view)' if b_t else ''}",
            )
        )
    return out
