"""Fused XSA ("exclusive self attention", SPEC.md section 3.3 step 6): one pass forward, one backward.

Each query head's attention output loses its component along its own position's unit value vector:

    y (B, T, H, D), v (B, T, Hkv, D), H % Hkv == 0, head h reads kv head g = h // G (G = H / Hkv)
    s = max(||v_g||, eps)   vn = v_g / s   (F.normalize, eps = 1e-12)
    c_h = y_h . vn          out_h = y_h - c_h vn                                 per (b, t, h)

The record calls it on every layer, 88 times a training step at B x T = 48 x 2048 with 8 / 4 heads of
64. It is purely memory-bound: torch.compile of the reference runs a v-normalisation kernel and then
the projection (two passes over v, vn materialised). Here one program takes BLOCK_R rows (b, t) of one
kv head: it loads v once, normalises it in fp32 registers and walks the G query heads of the group,
so the forward moves y + v + out and nothing else.

Backward (by hand; every term is checked against autograd of the fp64 reference in the tests). With
g_h = d loss / d out_h, and the projection P = I - vn vn^T being symmetric:

    dy_h  = P g_h = g_h - (g_h . vn) vn
    d(vn) = -sum_h [ c_h g_h + (g_h . vn) y_h ]          (out_h depends on vn through c_h vn)
    dv    = (d(vn) - (d(vn) . vn) vn) / s                 where ||v|| >= eps
    dv    = d(vn) / eps                                   where ||v|| < eps (F.normalize's clamp: vn = v / eps
                                                          is linear in v, clamp_min passes no gradient)

The group's sum in d(vn) is formed in the program's registers (all G heads of a kv head live in one
program), so dv needs no atomics and no second pass. The backward recomputes vn from v (saving it
would cost a write and a read of v's size); it moves g, y, v in and dy, dv out.

All math is fp32 in registers; outputs are written in the inputs' dtype. y, v and the incoming gradient
may have any strides (an attention backend's output is often a transposed view): the strides go to the
kernel, nothing is copied. out, dy and dv are contiguous.

Dispatch (`impl`): "auto" runs Triton on a Hopper GPU (sm_90) or under TRITON_INTERPRET=1 on CPU
tensors and the reference otherwise, logging the reason once; "triton" forces the kernel (ValueError
naming the argument when it cannot run); "torch" is the reference.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import IMPLS as _IMPLS
from ._runtime import empty, interpreter_active, launches, platform_blocker, use_triton

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EPS = 1e-12  # F.normalize's default
# A row of one head lives in registers as a (BLOCK_R, D) fp32 tile; past 256 the backward's five live
# tiles (v, vn, d(vn), y, g) would spill.
_MAX_HEAD_DIM = 256

# ---------------------------------------------------------------------------------------------------
# Launch configuration: BLOCK_R rows (b, t) of one kv head per program.
#
# Chosen on paper for H100/H200, not swept; measured on the H200 (2026-12-02): forward 73 us alone at
# the record shape (3.4 TB/s; torch.compile of the reference 114 us), inside the training step 66 us
# forward and 111 us backward per call. From the shape of the work: at the record shape a program's
# v tile is 64 x 64 bf16 (8 KiB) and each of its G = 2 heads another 8 KiB in and out, small enough to
# keep ~6 programs resident per SM (N = 98304 rows -> 1536 x 4 = 6144 programs, ~47 per SM), each with
# 4 warps: 64 x 64 fp32 / 128 threads = 32 registers per live tile. The backward holds more live tiles
# (v, vn, d(vn), y, g): the same rows, 8 warps to keep registers per thread at the forward's level.
# Under the interpreter a small block makes the tests run several programs and a ragged tail.
# ---------------------------------------------------------------------------------------------------
_FWD_CONFIG = {"BLOCK_R": 64, "num_warps": 4}
_BWD_CONFIG = {"BLOCK_R": 64, "num_warps": 8}
_INTERPRETER_CONFIG = {"BLOCK_R": 16, "num_warps": 4}


def _config(base: dict) -> dict:
    return dict(_INTERPRETER_CONFIG if interpreter_active() else base)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(N, T, stride_b, stride_t, BLOCK_R: tl.constexpr):
    """Rows r = b * T + t of this program: (row mask, int64 b, int64 t offset of each row)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // T
    return rows < N, rows, b * stride_b + (rows - b * T) * stride_t


@triton.jit
def _unit_values(v_ptr, N, T, svb, svt, svh, svd, D: tl.constexpr, BLOCK_R: tl.constexpr, EPS_: tl.constexpr):
    """This program's kv head's values as fp32 (BLOCK_R, D) tiles: (v, vn, 1 / max(||v||, eps), ||v||)."""
    g = tl.program_id(1).to(tl.int64)
    mask_r, _, v_rows = _row_offsets(N, T, svb, svt, BLOCK_R)
    cols = tl.arange(0, D)
    ptrs = v_ptr + (v_rows + g * svh)[:, None] + cols[None, :] * svd
    v = tl.load(ptrs, mask=mask_r[:, None], other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(v * v, axis=1))
    inv = 1.0 / tl.maximum(norm, EPS_)
    return v, v * inv[:, None], inv, norm


@triton.jit
def _xsa_fwd_kernel(
    y_ptr, v_ptr, out_ptr, N, T,
    syb, syt, syh, syd,
    svb, svt, svh, svd,
    G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, EPS_: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(1) * G
    mask_r, rows, y_rows = _row_offsets(N, T, syb, syt, BLOCK_R)
    _, vn, _, _ = _unit_values(v_ptr, N, T, svb, svt, svh, svd, D, BLOCK_R, EPS_)
    cols = tl.arange(0, D)
    mask = mask_r[:, None]
    for j in tl.static_range(G):
        h = g * G + j
        y = tl.load(y_ptr + (y_rows + h * syh)[:, None] + cols[None, :] * syd, mask=mask, other=0.0)
        y = y.to(tl.float32)
        c = tl.sum(y * vn, axis=1)
        out = y - c[:, None] * vn
        out_ptrs = out_ptr + (rows * H * D + h * D)[:, None] + cols[None, :]  # contiguous (B, T, H, D)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xsa_bwd_kernel(
    grad_ptr, y_ptr, v_ptr, dy_ptr, dv_ptr, N, T,
    sgb, sgt, sgh, sgd,
    syb, syt, syh, syd,
    svb, svt, svh, svd,
    G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, EPS_: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(1).to(tl.int64)
    Hkv = tl.num_programs(1)
    H = Hkv * G
    mask_r, rows, y_rows = _row_offsets(N, T, syb, syt, BLOCK_R)
    _, _, g_rows = _row_offsets(N, T, sgb, sgt, BLOCK_R)
    _, vn, inv, norm = _unit_values(v_ptr, N, T, svb, svt, svh, svd, D, BLOCK_R, EPS_)
    cols = tl.arange(0, D)
    mask = mask_r[:, None]
    d_vn = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    for j in tl.static_range(G):
        h = g * G + j
        y = tl.load(y_ptr + (y_rows + h * syh)[:, None] + cols[None, :] * syd, mask=mask, other=0.0)
        go = tl.load(grad_ptr + (g_rows + h * sgh)[:, None] + cols[None, :] * sgd, mask=mask, other=0.0)
        y, go = y.to(tl.float32), go.to(tl.float32)
        c = tl.sum(y * vn, axis=1)
        gv = tl.sum(go * vn, axis=1)
        dy = go - gv[:, None] * vn
        dy_ptrs = dy_ptr + (rows * H * D + h * D)[:, None] + cols[None, :]
        tl.store(dy_ptrs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        d_vn -= c[:, None] * go + gv[:, None] * y
    # through vn = v / max(||v||, eps): the radial part is removed only where the norm is not clamped
    radial = tl.where(norm >= EPS_, tl.sum(d_vn * vn, axis=1), 0.0)
    dv = (d_vn - radial[:, None] * vn) * inv[:, None]
    dv_ptrs = dv_ptr + (rows * Hkv * D + g * D)[:, None] + cols[None, :]
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops so torch.compile(fullgraph=True) keeps them as opaque nodes
# ---------------------------------------------------------------------------------------------------


def _grid(y: torch.Tensor, v: torch.Tensor, cfg: dict):
    b, t = y.shape[:2]
    return (triton.cdiv(b * t, cfg["BLOCK_R"]), v.shape[2])


def _launch_fwd(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, t, h, d = y.shape
    out = empty(y.shape, y.dtype, y.device)
    launches["xsa_fwd"] += 1
    cfg = _config(_FWD_CONFIG)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _xsa_fwd_kernel[_grid(y, v, cfg)](
            y, v, out, b * t, t, *y.stride(), *v.stride(),
            G=h // v.shape[2], D=d, BLOCK_R=cfg["BLOCK_R"], EPS_=EPS, num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out


def _launch_bwd(grad: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, t, h, d = y.shape
    dy = empty(y.shape, y.dtype, y.device)
    dv = empty(v.shape, v.dtype, v.device)
    launches["xsa_bwd"] += 1
    cfg = _config(_BWD_CONFIG)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _xsa_bwd_kernel[_grid(y, v, cfg)](
            grad, y, v, dy, dv, b * t, t, *grad.stride(), *y.stride(), *v.stride(),
            G=h // v.shape[2], D=d, BLOCK_R=cfg["BLOCK_R"], EPS_=EPS, num_warps=cfg["num_warps"],
        )  # fmt: skip
    return dy, dv


@torch.library.custom_op("golfbench::xsa_fwd", mutates_args=())
def _xsa_fwd_op(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y (B, T, H, D), v (B, T, Hkv, D), any strides -> out (B, T, H, D) contiguous, y's dtype."""
    return _launch_fwd(y, v)


@_xsa_fwd_op.register_fake
def _(y, v):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op("golfbench::xsa_bwd", mutates_args=())
def _xsa_bwd_op(grad: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d out (B, T, H, D) -> (dy (B, T, H, D), dv (B, T, Hkv, D)), contiguous, the inputs' dtype."""
    return _launch_bwd(grad, y, v)


@_xsa_bwd_op.register_fake
def _(grad, y, v):
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    y, v = ctx.saved_tensors
    return torch.ops.golfbench.xsa_bwd(grad, y, v)


_xsa_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def exclusive_self_attention_ref(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA (SPEC §3.3 step 6): remove from each head's output its component along its own
    position's unit value vector. y (B,T,H,D), v (B,T,Hkv,D)."""
    b, t, h, d = y.shape
    hkv = v.size(-2)
    y = y.reshape(b, t, hkv, h // hkv, d)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    return (y - (y * vn).sum(dim=-1, keepdim=True) * vn).reshape(b, t, h, d)


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(y, v, impl) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"exclusive_self_attention: impl must be one of {_IMPLS}, got {impl!r}")
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        raise ValueError(f"exclusive_self_attention: y must be a 4-D (B, T, H, D) tensor, got {_shape(y)}")
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise ValueError(f"exclusive_self_attention: v must be a 4-D (B, T, Hkv, D) tensor, got {_shape(v)}")
    for name, t in (("y", y), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"exclusive_self_attention: {name} must be floating-point, got {t.dtype}")
    b, t, h, d = y.shape
    if y.numel() == 0:
        raise ValueError(f"exclusive_self_attention: y must not be empty, got shape {tuple(y.shape)}")
    if tuple(v.shape[:2]) != (b, t) or v.shape[3] != d:
        raise ValueError(
            f"exclusive_self_attention: v must have shape (B, T, Hkv, D) = ({b}, {t}, Hkv, {d}) "
            f"to match y {tuple(y.shape)}, got {tuple(v.shape)}"
        )
    hkv = v.shape[2]
    if hkv == 0 or h % hkv:
        raise ValueError(
            f"exclusive_self_attention: H = y.shape[2] = {h} is not a multiple of Hkv = v.shape[2] = {hkv}"
        )
    if v.device != y.device:
        raise ValueError(f"exclusive_self_attention: v is on {v.device} but y on {y.device}")


def _triton_blocker(y: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the kernel can take y and v, else the reason (naming the argument).

    Uses only dtypes, shapes and the device, which are constants at trace time, so torch.compile folds it."""
    if y.dtype not in _DTYPES:
        return f"y dtype {y.dtype} is not one of bf16/fp16/fp32"
    if v.dtype != y.dtype:
        return f"v dtype {v.dtype} differs from y dtype {y.dtype}"
    d = y.shape[3]
    if d & (d - 1):
        return f"D = y.shape[-1] = {d} is not a power of two"
    if d > _MAX_HEAD_DIM:
        return f"D = y.shape[-1] = {d} is above {_MAX_HEAD_DIM} (a row must fit in registers)"
    reason = platform_blocker(y.device.type, y.device.index or 0)
    return f"y: {reason}" if reason else None


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y - (y . vn) vn per (b, t, h), vn = F.normalize(v) of head h's kv head; see the module docstring.

    y (B, T, H, D), v (B, T, Hkv, D), H % Hkv == 0, bf16/fp16/fp32, any strides. Returns out
    (B, T, H, D) contiguous in y's dtype, differentiable in y and v, traceable by
    torch.compile(fullgraph=True).
    """
    _validate(y, v, impl)
    blocker = None if impl == "torch" else _triton_blocker(y, v)
    if not use_triton("exclusive_self_attention", impl, blocker):
        return exclusive_self_attention_ref(y, v).contiguous()
    return _xsa_fwd_op(y, v)
