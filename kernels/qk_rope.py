"""Fused q/k head RMSNorm + partial rotary + per-head gain, forward and backward, one pass each way.

For every head row x (D values) of q or k, at sequence position t (SPEC §3.3 steps 2-4):

    xn  = x * r,   r = 1 / sqrt(mean(x^2) + eps)           eps = fp32 machine epsilon (F.rms_norm, eps=None)
    y   = rotate(xn, t)               rotate-half over the first 2P dims, P = cos.size(-1):
          y[j]   = xn[j] cos[t,j] + xn[j+P] sin[t,j]         j < P
          y[j+P] = xn[j+P] cos[t,j] - xn[j] sin[t,j]         the other D - 2P dims pass through
    out = gain[h] * y                                        (q only; k has no gain)

Backward, with g = d loss / d out:
    d gain[h] = sum over (b, t, d) of g * y                  (per row here, summed per head by the launcher)
    dy  = gain[h] * g,   dxn = rotate(dy, -t)                the rotation's transpose
    dx  = r * (dxn - xn * mean(dxn * xn))                    the RMSNorm backward

Why a kernel: under torch.compile the norm, the rotary and the gain of q fuse into kernels that move
q (48 x 2048 x 8 x 64 bf16 = 100.7 MB) at ~1.5 TB/s on an H200 (135 us forward, 196 us backward per
call, 88 calls of each per training step), plus separate reductions for the gain's gradient. Here the
forward reads x once and writes out once (2 passes, ~50 us at the 4 TB/s copy ceiling), the backward
reads g and x and writes dx (3 passes, ~75 us), and the gain's gradient is one fp32 number per row
(3 MB) reduced per head on the host side. Nothing else is saved for backward: r is recomputed from x,
which the backward reads anyway. The rotation partner of element j (j +- P) is a second load of the
same row, served by L1/L2, not DRAM. All math is fp32; outputs are rounded once to x's dtype.

The reference `qk_norm_rope_ref` is the model's op-by-op math (rms_norm, then the rotary in the
activations' dtype with the tables cast to it, then the gain cast to it), so `impl="torch"` keeps
today's numbers; the kernel rounds once instead of three times.

Dispatch (`impl`): "auto" runs Triton on a Hopper GPU or under TRITON_INTERPRET=1 on CPU tensors and
the reference otherwise (the reason logged once); "triton" forces it (ValueError naming the argument
when it cannot run); "torch" is the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import IMPLS, empty, interpreter_active, launches, platform_blocker, use_triton

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_HEAD_DIM = 256

# One program normalises ROWS head rows (ROWS x D elements): 64 rows of D = 64 (4096 elements, 16 per
# thread at 4 warps) gives 12,288 programs for q at the record shape, so the grid has many waves and
# each thread issues 16-byte-wide loads. Chosen on paper, not swept. Measured on the H200 (2026-12-02):
# forward q 83 us alone (2.4 TB/s; torch.compile of the reference 113 us); inside the training step
# 63 us forward and 104 us backward per call, q and k averaged.
_GPU_CONFIG = {"ROWS": 64, "num_warps": 4}
# Under the interpreter: few rows per program, so tests cover several programs and a ragged last one.
_INTERPRETER_CONFIG = {"ROWS": 8, "num_warps": 1}


def _config() -> dict:
    return dict(_INTERPRETER_CONFIG if interpreter_active() else _GPU_CONFIG)


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the first 2 * cos.size(-1) dims of the last axis; the rest passes through."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, rest), dim=-1)


def qk_norm_rope_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's math op by op in x's dtype: x (B, T, H, D), cos/sin (>= T, P) tables, gain (H,) or None."""
    t = x.size(1)
    c, s = cos[:t][None, :, None, :].to(x.dtype), sin[:t][None, :, None, :].to(x.dtype)
    y = apply_rotary(F.rms_norm(x, (x.size(-1),)), c, s)
    return y if gain is None else y * gain.to(x.dtype)[None, None, :, None]


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _rows(row0, n_rows, T, H, ROWS: tl.constexpr):
    """Head-row indices of one program, their head and position, and whether they exist."""
    rows = row0 + tl.arange(0, ROWS)
    return rows, rows < n_rows, rows % H, (rows // H) % T, rows // (H * T)


@triton.jit
def _load_pair(ptr, b, t, h, sb, st, sh, cols, partner, mask):
    """A tile of head rows (fp32) and the same rows read at each column's rotation partner."""
    base = (b.to(tl.int64) * sb + t.to(tl.int64) * st + h.to(tl.int64) * sh)[:, None]
    a = tl.load(ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return a, tl.load(ptr + base + partner[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tables(cos_ptr, sin_ptr, t, row_ok, cols, cos_stride, P: tl.constexpr):
    """Per element: cos (1 where unrotated) and the forward's signed sin (+ first half, - second, 0 rest),
    so that rotate(a) = a * cos + partner * sin and its transpose is a * cos - partner * sin."""
    j = tl.where(cols < P, cols, cols - P)
    tmask = row_ok[:, None] & (cols < 2 * P)[None, :]
    off = t[:, None].to(tl.int64) * cos_stride + j[None, :]
    cos = tl.load(cos_ptr + off, mask=tmask, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + off, mask=tmask, other=0.0).to(tl.float32)
    return cos, tl.where((cols < P)[None, :], sin, -sin)


@triton.jit
def _columns(D: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    partner = tl.where(cols < P, cols + P, tl.where(cols < 2 * P, cols - P, cols))
    return cols, partner


@triton.jit
def _qk_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, n_rows, T, H, sb, st, sh, cos_stride, eps,
                   D: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                   HAS_GAIN: tl.constexpr):  # fmt: skip
    rows, row_ok, h, t, b = _rows(tl.program_id(0) * ROWS, n_rows, T, H, ROWS)
    cols, partner = _columns(D, P, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    x, xp = _load_pair(x_ptr, b, t, h, sb, st, sh, cols, partner, mask)
    cos, sin = _tables(cos_ptr, sin_ptr, t, row_ok, cols, cos_stride, P)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = (x * cos + xp * sin) * r[:, None]  # the norm is a per-row scale: it commutes with the rotation
    if HAS_GAIN:
        y = y * tl.load(gain_ptr + h, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _qk_bwd_kernel(g_ptr, x_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, row_dot_ptr,
                   n_rows, T, H, sb, st, sh, gsb, gst, gsh, cos_stride, eps,
                   D: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                   HAS_GAIN: tl.constexpr):  # fmt: skip
    rows, row_ok, h, t, b = _rows(tl.program_id(0) * ROWS, n_rows, T, H, ROWS)
    cols, partner = _columns(D, P, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    x, xp = _load_pair(x_ptr, b, t, h, sb, st, sh, cols, partner, mask)
    g, gp = _load_pair(g_ptr, b, t, h, gsb, gst, gsh, cols, partner, mask)
    cos, sin = _tables(cos_ptr, sin_ptr, t, row_ok, cols, cos_stride, P)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    if HAS_GAIN:
        y = (x * cos + xp * sin) * r[:, None]
        tl.store(row_dot_ptr + rows, tl.sum(g * y, axis=1), mask=row_ok)
        gain = tl.load(gain_ptr + h, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        g, gp = g * gain, gp * gain
    dxn = g * cos - gp * sin  # the rotation's transpose
    xn = x * r[:, None]
    dx = r[:, None] * (dxn - xn * (tl.sum(dxn * xn, axis=1) / D)[:, None])
    tl.store(
        dx_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
    )


# ---------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops so torch.compile(fullgraph=True) keeps them as opaque nodes
# ---------------------------------------------------------------------------------------------------

_EPS = torch.finfo(torch.float32).eps


def _grid_args(x: torch.Tensor, cos: torch.Tensor):
    B, T, H, D = x.shape
    cfg = _config()
    n_rows = B * T * H
    meta = dict(D=D, P=cos.shape[-1], BLOCK_D=triton.next_power_of_2(D), ROWS=cfg["ROWS"])
    return n_rows, (triton.cdiv(n_rows, cfg["ROWS"]),), meta, cfg["num_warps"]


def _launch_fwd(x, cos, sin, gain):
    B, T, H, D = x.shape
    out = empty(x.shape, x.dtype, x.device)
    n_rows, grid, meta, warps = _grid_args(x, cos)
    launches["qk_fwd"] += 1
    if n_rows:
        _qk_fwd_kernel[grid](
            x, cos, sin, gain if gain is not None else cos, out, n_rows, T, H,
            x.stride(0), x.stride(1), x.stride(2), cos.stride(0), _EPS,
            HAS_GAIN=gain is not None, num_warps=warps, **meta,
        )  # fmt: skip
    return out


def _launch_bwd(grad, x, cos, sin, gain):
    B, T, H, D = x.shape
    dx = empty(x.shape, x.dtype, x.device)
    row_dot = empty((B * T * H,), torch.float32, x.device)
    n_rows, grid, meta, warps = _grid_args(x, cos)
    launches["qk_bwd"] += 1
    if n_rows:
        _qk_bwd_kernel[grid](
            grad, x, cos, sin, gain if gain is not None else cos, dx, row_dot, n_rows, T, H,
            x.stride(0), x.stride(1), x.stride(2), grad.stride(0), grad.stride(1), grad.stride(2),
            cos.stride(0), _EPS, HAS_GAIN=gain is not None, num_warps=warps, **meta,
        )  # fmt: skip
    return dx, row_dot


@torch.library.custom_op("golfbench::qk_norm_rope_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    return _launch_fwd(x, cos, sin, gain)


@_fwd_op.register_fake
def _(x, cos, sin, gain):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("golfbench::qk_norm_rope_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, per-row d gain contributions (B*T*H,) fp32; zeros' worth of nothing when gain is None)."""
    return _launch_bwd(grad, x, cos, sin, gain)


@_bwd_op.register_fake
def _(grad, x, cos, sin, gain):
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(rows, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, cos, sin, gain = inputs
    ctx.save_for_backward(x, cos, sin, gain)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad):
    x, cos, sin, gain = ctx.saved_tensors
    if grad is None:
        return None, None, None, None
    dx, row_dot = _bwd_op(grad, x, cos, sin, gain)
    d_gain = None
    if gain is not None and ctx.needs_input_grad[3]:
        d_gain = row_dot.view(-1, x.shape[2]).sum(0).to(gain.dtype)
    return dx, None, None, d_gain


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _validate(x, cos, sin, gain, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"qk_norm_rope: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"qk_norm_rope: x must be a floating (B, T, H, D) tensor, got {shape}")
    B, T, H, D = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.device != x.device:
            raise ValueError(f"qk_norm_rope: {name} must be a 2-D (T, P) table on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"qk_norm_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if cos.shape[0] < T or not 0 < 2 * cos.shape[1] <= D:
        raise ValueError(
            f"qk_norm_rope: tables of shape {tuple(cos.shape)} need >= T = {T} rows and 0 < 2P <= D = {D}"
        )
    if gain is not None and (gain.shape != (H,) or gain.device != x.device):
        raise ValueError(
            f"qk_norm_rope: gain must have shape (H,) = ({H},) on {x.device}, got {tuple(gain.shape)}"
        )


def _triton_blocker(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    if x.dtype not in _DTYPES:
        return f"x dtype {x.dtype} is not one of bf16/fp16/fp32"
    if x.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim D = x.shape[-1] = {x.shape[-1]} is above {_MAX_HEAD_DIM} (one row per tile row)"
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        return "x, cos and sin must be contiguous along their last dim (and cos, sin alike)"
    reason = platform_blocker(x.device.type, x.device.index or 0)
    return f"x: {reason}" if reason else None


def qk_norm_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    gain: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """RMSNorm over each head, rotate-half RoPE over its first 2P dims, times gain[h] (see module doc).

    x (B, T, H, D) bf16/fp16/fp32, any strides with the last one 1; cos, sin (>= T, P) rotation tables
    (fp32 for full accuracy); gain (H,) or None. Returns a contiguous (B, T, H, D) tensor of x's dtype,
    differentiable in x and gain; traceable by torch.compile(fullgraph=True)."""
    _validate(x, cos, sin, gain, impl)
    blocker = None if impl == "torch" else _triton_blocker(x, cos, sin)
    if not use_triton("qk_norm_rope", impl, blocker):
        return qk_norm_rope_ref(x, cos, sin, gain)
    return _fwd_op(x, cos, sin, gain)
