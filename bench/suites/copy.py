"""Device-to-device copy: the bandwidth bar for memory-bound kernels, and a check on the harness.

bytes = 2 x size (read once, written once). A plain Triton copy beside torch's copy_ shows what a
simple Triton kernel reaches, the headroom any memory-bound Triton kernel of ours can hope for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench.registry import Case, Provider, needs_cuda, register

SIZES_MIB = [16, 64, 256, 1024, 2048]
QUICK_SIZES_MIB = [64, 1024]

# 16 KiB per program of fp32 with 8 warps: 16 elements (64 B) per thread, full-width vector accesses.
COPY_BLOCK = 4096
COPY_WARPS = 8


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def triton_copy(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    n = src.numel()
    _copy_kernel[(triton.cdiv(n, COPY_BLOCK),)](src, dst, n, BLOCK=COPY_BLOCK, num_warps=COPY_WARPS)
    return dst


def _setup(size_bytes: int, impl: str):
    def setup():
        src = torch.randn(size_bytes // 4, device="cuda", dtype=torch.float32)
        dst = torch.empty_like(src)
        if impl == "torch":
            return lambda: dst.copy_(src)
        return lambda: triton_copy(src, dst)

    return setup


@register("copy", "device-to-device copy, torch copy_ vs a plain Triton kernel, 16 MiB .. 2 GiB")
def cases(quick: bool) -> list[Case]:
    out = []
    for mib in QUICK_SIZES_MIB if quick else SIZES_MIB:
        size = mib * 2**20
        out.append(
            Case(
                suite="copy",
                label=f"{mib} MiB" if mib < 1024 else f"{mib // 1024} GiB",
                params={"size_mib": mib, "size_bytes": size, "dtype": "float32"},
                flops=0.0,
                bytes=2.0 * size,
                providers=[
                    Provider("torch.copy_", _setup(size, "torch"), needs_cuda),
                    Provider("triton", _setup(size, "triton"), needs_cuda),
                ],
                baseline="torch.copy_",
                x="size_mib",
            )
        )
    return out
