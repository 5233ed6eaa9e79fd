"""Fused residual mix + RMSNorm: h = sum_i w_i * x_i and n = rms_norm(h) * scale in one pass each way.

The record's residual stream is bf16 (B, T, D = 512). Every block mixes it and normalises the mix,
op by op (model/gpt.py Block.attn_residual / mlp_residual):

    x_in  = resid_mix[0] * x + resid_mix[1] * x0        rms_norm(x_in) * s    (attention input)
    x_mid = x_in + attn_scale * attn_out                rms_norm(x_mid) * s   (MLP input)

Inductor fuses the forwards of these to about memory bandwidth, but their backwards run as several
kernels, and the per-channel weight gradients (sums over all B*T rows) as separate reductions that
read the 100 MB tensors again. Here one op covers every such arrangement:

    residual_rms_norm((x_1, .., x_k), (w_1, .., w_k), scale) -> (h, n),   k in 1..3
    h = sum_i w_i * x_i            (fp32, rounded once to the inputs' dtype; w_i = None means 1)
    n = h * rstd * scale,          rstd = 1 / sqrt(mean_D(h^2) + eps)   (fp32, rounded once)

eps = torch.finfo(torch.float32).eps: what F.rms_norm(x, (D,)) with eps=None uses for bf16, fp16 and
fp32 inputs (SPEC section 10 item 3). n is the norm of the rounded h, so n is exactly a function of
the returned h, and the backward below is the derivative of what was computed.

Backward, one pass over the rows (M = B*T) with the per-row rstd saved by the forward (fp32 (M,)):

    g   = dh + scale * rstd * (dn - nhat * mean_D(dn * nhat)),    nhat = h * rstd
    dx_i = w_i * g                                  (in the inputs' dtype)
    dw_i = sum over rows of x_i * g                 (fp32)

Each program walks a contiguous chunk of rows and keeps x_i * g in fp32 registers; it writes one
(D,) partial sum per weight into a (weights, programs, D) fp32 buffer that one small torch sum
reduces. No atomics: the result is deterministic on a given device.

What the backward reads. dh and dn (each only when that output reached the loss), x_i for every
weight that needs a gradient, and h. h is not saved when every input is read anyway (all weights
need gradients): the backward recomputes it from the x_i with the forward's arithmetic (the same
jit helper; a different FMA contraction could move a rounding by one ulp, well inside the rounding
that h gets). In passes of one (M, D) tensor (M = 98,304, D = 512, bf16: 100.7 MB, ~25 us at the
H200's ~4.0 TB/s copy rate):

    arrangement                      forward (read + write)   backward (read + write)   total
    entry  (x, x0), (w, w)           2 + 2 (h, n)             4 (dh, dn, x, x0) + 2     10 = 1.01 GB
    mid    (x_in, a), (None, w)      2 + 2                    4 (dh, dn, h, a) + 2      10 = 1.01 GB
    three  (x, y, z), (w, w, w)      3 + 2                    5 (dh, dn, x, y, z) + 3   13 = 1.31 GB

which is the minimum for each (bench/suites/resnorm.py counts it the same way); rstd (M fp32) and
the partial sums (~1-3 MB) are extra.

Dispatch (`impl`): "auto" runs Triton on a Hopper GPU (sm_90) or under TRITON_INTERPRET=1 on CPU
tensors and the reference otherwise, logging the reason once; "triton" forces the kernel
(ValueError naming the argument when it cannot run); "torch" is the reference.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import IMPLS, empty, interpreter_active, launches, platform_blocker, use_triton

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_EPS = torch.finfo(torch.float32).eps
MAX_INPUTS = 3
# A row is one block of BLOCK_D = next_power_of_2(D) columns (masked past D). Wider rows would need a
# loop over D; already at 8192 the three-input backward spills registers (see below): correct, slower.
MAX_D = 8192

# ---------------------------------------------------------------------------------------------------
# Launch configuration, chosen on paper and not swept. Measured inside the record's training step on
# the H200 (2026-12-02): forward 94 us a call (4 passes of 100.7 MB: 4.3 TB/s), backward 175 us.
#
# A tile is BLOCK_M rows x BLOCK_D columns of about 2048 elements, 16 per thread with 4 warps (two
# 16-byte vector loads per bf16 tensor): at D = 512 that is 4 rows. The forward runs one tile per
# program. The backward program walks 16 tiles (64 rows at D = 512): 1,536 programs at the record
# shape, several waves on 132 SMs (a small tail), and a 3 MB fp32 partial-sum buffer per weight.
# Registers per thread (ptxas -v for sm_90a of this file's kernels, bf16, D = 512; no spills): forward
# 72-96; backward 'entry' 155, 'mid' 123, three inputs 196 (3, 4 and 2 programs of 4 warps per SM);
# at D = 4096 the three-input backward takes 244 with no spill, at 8192 it spills 920 bytes.
# Under the interpreter: 8 rows a tile and 3 tiles a program, so that small tests cover several
# programs, a ragged last tile and tiles past the last row (77 rows: 10 forward programs, 4 backward
# ones, the last with 5 rows in its first tile and none in the other two).
# ---------------------------------------------------------------------------------------------------
_GPU_CONFIG = {"TILE": 2048, "BLOCKS_PER_PROGRAM": 16}
_INTERPRETER_CONFIG = {"BLOCK_M": 8, "BLOCKS_PER_PROGRAM": 3, "num_warps": 4}


def _config(d: int) -> dict:
    block_d = triton.next_power_of_2(d)
    if interpreter_active():
        return dict(_INTERPRETER_CONFIG, BLOCK_D=block_d)
    block_m = max(1, _GPU_CONFIG["TILE"] // block_d)
    return {
        "BLOCK_M": block_m,
        "BLOCK_D": block_d,
        "BLOCKS_PER_PROGRAM": _GPU_CONFIG["BLOCKS_PER_PROGRAM"],
        "num_warps": max(4, min(16, block_m * block_d // 512)),  # 16 elements a thread
    }


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, stride_row, rows, cols, mask):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_weight(w_ptr, cols, col_mask, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """w (BLOCK_D,) in fp32, or ones for an input without a weight (x * 1.0 is exact)."""
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    else:
        w = tl.full([BLOCK_D], 1.0, tl.float32)
    return w


@triton.jit
def _mix(x0, x1, x2, w0, w1, w2, h_ty: tl.constexpr, N_IN: tl.constexpr):
    """h = sum_i w_i * x_i in fp32, rounded once to h_ty; returned in fp32. The forward and the
    recomputing backward both use this, so they round identically."""
    h = x0 * w0[None, :]
    if N_IN > 1:
        h += x1 * w1[None, :]
    if N_IN > 2:
        h += x2 * w2[None, :]
    return h.to(h_ty).to(tl.float32)


@triton.jit
def _resnorm_fwd_kernel(
    x0_ptr, x1_ptr, x2_ptr, w0_ptr, w1_ptr, w2_ptr, h_ptr, n_ptr, rstd_ptr,
    M, D, stride_x0, stride_x1, stride_x2, scale, eps,
    N_IN: tl.constexpr, HAS_W0: tl.constexpr, HAS_W1: tl.constexpr, HAS_W2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]

    x0 = _load_tile(x0_ptr, stride_x0, rows, cols, mask)
    w0 = _load_weight(w0_ptr, cols, col_mask, HAS_W0, BLOCK_D)
    x1, w1, x2, w2 = x0, w0, x0, w0  # placeholders, unused unless N_IN says so
    if N_IN > 1:
        x1 = _load_tile(x1_ptr, stride_x1, rows, cols, mask)
        w1 = _load_weight(w1_ptr, cols, col_mask, HAS_W1, BLOCK_D)
    if N_IN > 2:
        x2 = _load_tile(x2_ptr, stride_x2, rows, cols, mask)
        w2 = _load_weight(w2_ptr, cols, col_mask, HAS_W2, BLOCK_D)
    h = _mix(x0, x1, x2, w0, w1, w2, h_ptr.dtype.element_ty, N_IN)

    offs = rows[:, None] * D + cols[None, :]
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)  # masked columns and rows hold zeros
    tl.store(n_ptr + offs, (h * (rstd * scale)[:, None]).to(n_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _resnorm_bwd_kernel(
    dh_ptr, dn_ptr, h_ptr, x0_ptr, x1_ptr, x2_ptr, w0_ptr, w1_ptr, w2_ptr, rstd_ptr,
    dx0_ptr, dx1_ptr, dx2_ptr, dw_partial_ptr,
    M, D, stride_dh, stride_dn, stride_x0, stride_x1, stride_x2, scale, blocks_per_program,
    N_IN: tl.constexpr, HAS_W0: tl.constexpr, HAS_W1: tl.constexpr, HAS_W2: tl.constexpr,
    HAS_DH: tl.constexpr, HAS_DN: tl.constexpr, H_SAVED: tl.constexpr,
    LOAD_X0: tl.constexpr, LOAD_X1: tl.constexpr, LOAD_X2: tl.constexpr,
    NEED_DX0: tl.constexpr, NEED_DX1: tl.constexpr, NEED_DX2: tl.constexpr,
    DW_SLOT0: tl.constexpr, DW_SLOT1: tl.constexpr, DW_SLOT2: tl.constexpr,  # -1: no dw_i
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w0 = _load_weight(w0_ptr, cols, col_mask, HAS_W0, BLOCK_D)
    w1 = _load_weight(w1_ptr, cols, col_mask, HAS_W1, BLOCK_D)
    w2 = _load_weight(w2_ptr, cols, col_mask, HAS_W2, BLOCK_D)
    # Per-channel sums of x_i * g, kept 2-D: the reduction over the tile's rows happens once, at the end.
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for i in range(0, blocks_per_program):
        rows = (pid * blocks_per_program + i).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        x1, x2 = x0, x0
        if LOAD_X0:
            x0 = _load_tile(x0_ptr, stride_x0, rows, cols, mask)
        if LOAD_X1:
            x1 = _load_tile(x1_ptr, stride_x1, rows, cols, mask)
        if LOAD_X2:
            x2 = _load_tile(x2_ptr, stride_x2, rows, cols, mask)

        g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_DN:
            if H_SAVED:
                h = _load_tile(h_ptr, D, rows, cols, mask)
            else:
                h = _mix(x0, x1, x2, w0, w1, w2, dn_ptr.dtype.element_ty, N_IN)  # dn has h's dtype
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            dn = _load_tile(dn_ptr, stride_dn, rows, cols, mask)
            nhat = h * rstd[:, None]
            dot = tl.sum(dn * nhat, axis=1) / D
            g = (dn - nhat * dot[:, None]) * (rstd * scale)[:, None]
        if HAS_DH:
            g += _load_tile(dh_ptr, stride_dh, rows, cols, mask)

        if NEED_DX0:
            tl.store(dx0_ptr + offs, (g * w0[None, :]).to(dx0_ptr.dtype.element_ty), mask=mask)
        if NEED_DX1:
            tl.store(dx1_ptr + offs, (g * w1[None, :]).to(dx1_ptr.dtype.element_ty), mask=mask)
        if NEED_DX2:
            tl.store(dx2_ptr + offs, (g * w2[None, :]).to(dx2_ptr.dtype.element_ty), mask=mask)
        # Rows past M load zeros, so g and the products are zero there.
        if DW_SLOT0 >= 0:
            acc0 += x0 * g
        if DW_SLOT1 >= 0:
            acc1 += x1 * g
        if DW_SLOT2 >= 0:
            acc2 += x2 * g

    programs = tl.num_programs(0)
    if DW_SLOT0 >= 0:
        tl.store(dw_partial_ptr + (DW_SLOT0 * programs + pid) * D + cols, tl.sum(acc0, axis=0), mask=col_mask)
    if DW_SLOT1 >= 0:
        tl.store(dw_partial_ptr + (DW_SLOT1 * programs + pid) * D + cols, tl.sum(acc1, axis=0), mask=col_mask)
    if DW_SLOT2 >= 0:
        tl.store(dw_partial_ptr + (DW_SLOT2 * programs + pid) * D + cols, tl.sum(acc2, axis=0), mask=col_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers. Inputs and weights come padded to MAX_INPUTS with None; an absent pointer is passed as
# some present tensor (the kernels' constexpr flags compile every access to it away).
# ---------------------------------------------------------------------------------------------------


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _or(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t (M, D) with unit column stride (a compiled graph, or autograd's expanded ones, may pass others)."""
    return t if t is None or t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def _launch_fwd(xs, ws, scale: float):
    xs = [_rows(t) for t in xs]
    x = xs[0]
    M, D = x.shape
    h = empty((M, D), x.dtype, x.device)
    n = empty((M, D), x.dtype, x.device)
    rstd = empty(M, torch.float32, x.device)
    if M == 0:
        return h, n, rstd
    cfg = _config(D)
    n_in = sum(t is not None for t in xs)
    launches["resnorm_fwd"] += 1
    with _device_ctx(x):
        _resnorm_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            *(_or(t, x) for t in xs), *(_or(w, x) for w in ws), h, n, rstd,
            M, D, *(_row_stride(t) for t in xs), scale, _EPS,
            N_IN=n_in, HAS_W0=ws[0] is not None, HAS_W1=ws[1] is not None, HAS_W2=ws[2] is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return h, n, rstd


def _launch_bwd(dh, dn, h, xs, ws, rstd, scale, n_in, need_dx, need_dw):
    """[dx_i for need_dx] + [dw (n_dw, D): the needed dw_i, stacked]. xs[i] is given where the kernel
    must read it: for dw_i, or for every input when h is not given and dn needs it."""
    dh, dn, h, xs = _rows(dh), _rows(dn), _rows(h), [_rows(t) for t in xs]
    grad = dh if dh is not None else dn
    M, D = grad.shape
    dxs = [empty((M, D), grad.dtype, grad.device) if need else None for need in need_dx]
    slots, n_dw = [], 0
    for need in need_dw:
        slots.append(n_dw if need else -1)
        n_dw += bool(need)
    cfg = _config(D)
    n_programs = triton.cdiv(triton.cdiv(M, cfg["BLOCK_M"]), cfg["BLOCKS_PER_PROGRAM"])
    partial = empty((n_dw, n_programs, D), torch.float32, grad.device)
    if M > 0:
        pad = lambda seq: list(seq) + [None] * (MAX_INPUTS - len(seq))  # noqa: E731
        xs3, ws3, dx3 = pad(xs), pad(ws), pad(dxs)
        slots += [-1] * (MAX_INPUTS - len(slots))
        need_dx3 = pad([bool(v) for v in need_dx])
        launches["resnorm_bwd"] += 1
        with _device_ctx(grad):
            _resnorm_bwd_kernel[(n_programs,)](
                _or(dh, grad), _or(dn, grad), _or(h, grad), *(_or(t, grad) for t in xs3),
                *(_or(w, rstd) for w in ws3), rstd, *(_or(t, grad) for t in dx3), partial if n_dw else rstd,
                M, D, _row_stride(dh), _row_stride(dn), *(_row_stride(t) for t in xs3), scale,
                cfg["BLOCKS_PER_PROGRAM"],
                N_IN=n_in, HAS_W0=ws3[0] is not None, HAS_W1=ws3[1] is not None, HAS_W2=ws3[2] is not None,
                HAS_DH=dh is not None, HAS_DN=dn is not None, H_SAVED=h is not None,
                LOAD_X0=xs3[0] is not None, LOAD_X1=xs3[1] is not None, LOAD_X2=xs3[2] is not None,
                NEED_DX0=bool(need_dx3[0]), NEED_DX1=bool(need_dx3[1]), NEED_DX2=bool(need_dx3[2]),
                DW_SLOT0=slots[0], DW_SLOT1=slots[1], DW_SLOT2=slots[2],
                BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
            )  # fmt: skip
    # One (n_dw, D) tensor: the outputs of a custom op may not alias each other, so the caller unbinds it.
    return [t for t in dxs if t is not None] + ([partial.sum(dim=1)] if n_dw else [])


# ---------------------------------------------------------------------------------------------------
# Custom ops, so torch.compile(fullgraph=True) keeps the kernels as opaque nodes. The arity is fixed
# (three optional inputs, three optional weights); the backward returns a list whose entries the
# flags name, so a gradient nobody needs is neither computed nor allocated.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("golfbench::resnorm_fwd", mutates_args=())
def _fwd_op(
    x0: torch.Tensor,
    x1: torch.Tensor | None,
    x2: torch.Tensor | None,
    w0: torch.Tensor | None,
    w1: torch.Tensor | None,
    w2: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_i (M, D), w_i (D,) fp32 -> (h (M, D), n (M, D), rstd (M,) fp32)."""
    return _launch_fwd((x0, x1, x2), (w0, w1, w2), scale)


@_fwd_op.register_fake
def _(x0, x1, x2, w0, w1, w2, scale):
    M, D = x0.shape
    return x0.new_empty(M, D), x0.new_empty(M, D), x0.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("golfbench::resnorm_bwd", mutates_args=())
def _bwd_op(
    dh: torch.Tensor | None,
    dn: torch.Tensor | None,
    h: torch.Tensor | None,
    x0: torch.Tensor | None,
    x1: torch.Tensor | None,
    x2: torch.Tensor | None,
    w0: torch.Tensor | None,
    w1: torch.Tensor | None,
    w2: torch.Tensor | None,
    rstd: torch.Tensor,
    scale: float,
    n_in: int,
    need_dx: list[bool],
    need_dw: list[bool],
) -> list[torch.Tensor]:
    """[dx_i (M, D) for each need_dx[i]] + [dw (n_dw, D) fp32: dw_i for each need_dw[i], stacked; only if
    any]. dh or dn may be None (that output did not reach the loss); h None: recompute it from x0..x2."""
    xs, ws = (x0, x1, x2)[:n_in], (w0, w1, w2)[:n_in]
    return _launch_bwd(dh, dn, h, xs, ws, rstd, scale, n_in, need_dx, need_dw)


@_bwd_op.register_fake
def _(dh, dn, h, x0, x1, x2, w0, w1, w2, rstd, scale, n_in, need_dx, need_dw):
    grad = dh if dh is not None else dn
    M, D = grad.shape
    n_dw = sum(bool(need) for need in need_dw)
    dw = [grad.new_empty(n_dw, D, dtype=torch.float32)] if n_dw else []
    return [grad.new_empty(M, D) for need in need_dx if need] + dw


def _setup_context(ctx, inputs, output):
    xs, ws, scale = inputs[:MAX_INPUTS], inputs[MAX_INPUTS : 2 * MAX_INPUTS], inputs[-1]
    h, _, rstd = output
    n_in = sum(x is not None for x in xs)
    need_dw = [ws[i] is not None and ctx.needs_input_grad[MAX_INPUTS + i] for i in range(n_in)]
    # Every input is read for its dw anyway: recompute h from them rather than read it as well.
    recompute = all(need_dw)
    saved_xs = [x if i < n_in and (recompute or need_dw[i]) else None for i, x in enumerate(xs)]
    ctx.save_for_backward(None if recompute else h, *saved_xs, *ws, rstd)
    ctx.n_in, ctx.scale, ctx.need_dw = n_in, scale, need_dw
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # an output that did not reach the loss gets None, not zeros


def _backward(ctx, dh, dn, _drstd):
    h, x0, x1, x2, w0, w1, w2, rstd = ctx.saved_tensors
    n_in = ctx.n_in
    need_dx = [bool(ctx.needs_input_grad[i]) for i in range(n_in)]
    need_dw = list(ctx.need_dw)
    if (dh is None and dn is None) or not (any(need_dx) or any(need_dw)):
        return (None,) * (2 * MAX_INPUTS + 1)
    xs = (x0, x1, x2)
    if dn is None:  # g = dh: neither h nor the inputs are needed except for dw
        h, xs = None, [x if i < n_in and need_dw[i] else None for i, x in enumerate(xs)]
    out = _bwd_op(dh, dn, h, *xs, w0, w1, w2, rstd, ctx.scale, n_in, need_dx, need_dw)
    dx_iter, dw_iter = iter(out), iter(out[-1].unbind(0) if any(need_dw) else ())
    pad = [None] * (MAX_INPUTS - n_in)
    dxs = [next(dx_iter) if need else None for need in need_dx] + pad
    dws = [next(dw_iter) if need else None for need in need_dw] + pad
    return (*dxs, *dws, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def residual_rms_norm_ref(inputs, weights, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Today's op-by-op math in the inputs' dtype: weights cast with .to(dtype) as the model does,
    h = w_1 * x_1 + w_2 * x_2 + ..., n = F.rms_norm(h) * scale. eps is passed as fp32's machine
    epsilon: identical to eps=None for bf16/fp16/fp32, and the same eps for an fp64 oracle."""
    dtype = inputs[0].dtype
    h = None
    for x, w in zip(inputs, weights):
        term = x if w is None else w.to(dtype) * x
        h = term if h is None else h + term
    return h, F.rms_norm(h, (h.size(-1),), eps=_EPS) * scale


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(inputs, weights, scale, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"residual_rms_norm: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(inputs, tuple | list) or not 1 <= len(inputs) <= MAX_INPUTS:
        got = f"{len(inputs)} of them" if isinstance(inputs, tuple | list) else type(inputs).__name__
        raise ValueError(f"residual_rms_norm: inputs must be a tuple of 1 to {MAX_INPUTS} tensors, got {got}")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise ValueError(f"residual_rms_norm: inputs[{i}] must be a floating-point tensor (..., D), got "
                             f"{_describe(x)}")  # fmt: skip
    x = inputs[0]
    for i, y in enumerate(inputs[1:], 1):
        if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
            raise ValueError(f"residual_rms_norm: inputs[{i}] is {_describe(y)} on {y.device}, but inputs[0] "
                             f"is {_describe(x)} on {x.device}: all inputs must match")  # fmt: skip
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"residual_rms_norm: inputs have an empty last dim D (shape {tuple(x.shape)})")
    if not isinstance(weights, tuple | list) or len(weights) != len(inputs):
        got = f"{len(weights)} entries" if isinstance(weights, tuple | list) else type(weights).__name__
        raise ValueError(f"residual_rms_norm: weights must have one entry (a tensor or None) per input "
                         f"({len(inputs)}), got {got}")  # fmt: skip
    for i, w in enumerate(weights):
        if w is None:
            continue
        ok = isinstance(w, torch.Tensor) and w.dtype == torch.float32 and tuple(w.shape) == (d,)
        if not ok or w.device != x.device:
            where = f" on {w.device}" if isinstance(w, torch.Tensor) else ""
            raise ValueError(f"residual_rms_norm: weights[{i}] must be None or a float32 (D,) = ({d},) "
                             f"tensor on {x.device}, got {_describe(w)}{where}")  # fmt: skip
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"residual_rms_norm: scale must be a finite number, got {scale!r}")


def _triton_blocker(inputs) -> str | None:
    """None when the kernel can take these inputs, else the reason (naming the argument)."""
    x = inputs[0]
    if x.dtype not in _DTYPES:
        return f"inputs dtype {x.dtype} is not one of bf16/fp16/fp32"
    d = x.shape[-1]
    if d > MAX_D:
        return f"D = inputs[0].shape[-1] = {d} is larger than {MAX_D} (one row must fit one block)"
    for i, y in enumerate(inputs):
        if d > 1 and y.stride(-1) != 1:
            return f"inputs[{i}] must be contiguous along the last dim (strides {y.stride()})"
    reason = platform_blocker(x.device.type, x.device.index or 0)
    return f"inputs: {reason}" if reason else None


def residual_rms_norm(inputs, weights, scale: float, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(h, n) = (sum_i w_i * x_i, rms_norm(h) * scale), see the module docstring.

    inputs: 1 to 3 tensors of one shape (..., D) and dtype (bf16/fp16/fp32 for the kernel);
    weights: one per input, a float32 (D,) tensor or None (weight 1). Differentiable in every input
    and weight; either output may be left out of the loss. h and n have the inputs' shape and dtype.
    """
    _validate(inputs, weights, scale, impl)
    blocker = None if impl == "torch" else _triton_blocker(inputs)
    if not use_triton("residual_rms_norm", impl, blocker):
        return residual_rms_norm_ref(inputs, weights, scale)
    shape, d = inputs[0].shape, inputs[0].shape[-1]
    pad = [None] * (MAX_INPUTS - len(inputs))
    xs = [x.reshape(-1, d) for x in inputs] + pad
    ws = [None if w is None else w.contiguous() for w in weights] + pad
    h, n, _ = _fwd_op(*xs, *ws, float(scale))
    return h.view(shape), n.view(shape)
