"""Fused MLP: up-projection + LeakyReLU(0.5)^2 in one persistent Triton TMA kernel, and its backward.

    out = f(x @ w_up.T) @ w_down.T,   f(u) = u^2 for u > 0, u^2 / 4 for u <= 0

Forward: one kernel computes pre = x @ w_up.T with fp32 accumulation and applies f to the fp32
accumulator in the epilogue; the down-projection is a cuBLAS GEMM.
Backward: the same kernel (FORWARD=False) computes dpost = dY @ w_down and multiplies it by f'(pre)
in its epilogue; dW_down, dW_up and dx are cuBLAS GEMMs.

What is saved for backward. Public kernels save two M x N tensors (pre and post, or f' and post).
Here the forward writes only `post` (which the down-projection and dW_down need anyway) plus one
sign bit per element, packed 32 to an int32 word (1/16 of a bf16 tensor). f' is exactly
recoverable from the two:
    u > 0:   post = u^2     ->  f'(u) = 2u  =  2 sqrt(post)
    u <= 0:  post = u^2/4   ->  f'(u) = u/2 = -sqrt(post)
sqrt halves post's relative rounding error, so f' is as accurate as a stored bf16 f'. At the record
shape (M = 48*2048, N = 2048) that removes 384 MiB of HBM writes from the forward kernel and 384 MiB
of saved activations per layer call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import (
    IMPLS,
    empty,
    interpreter_active,
    launches,
    num_sms,
    planted_fault,
    platform_blocker,
    use_triton,
)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # checked again by _runtime before any launch
    TensorDescriptor = None


def fused_mlp_ref(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Reference: down(leaky_relu(up(x), 0.5) ** 2) in plain PyTorch."""
    return F.linear(F.leaky_relu(F.linear(x, w_up), negative_slope=0.5).square(), w_down)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

# H100 SXM (132 SMs), bf16, K = 512, N = 2048: 128x256x64 tiles, 8 warps, one persistent program
# per SM; 4 stages fill shared memory in the forward (4 x 48 KiB + a 32 KiB store tile), the
# backward also stages a post tile, so it keeps 3. Chosen by measurement on the H100 (M = 98304,
# medians in ms, forward / backward kernel): this config 0.418 / 0.549; 3 forward stages 0.439;
# 128x128 tiles 0.466 / 0.677; two programs per SM with 128x128 or 64x256 tiles 0.484-0.546 /
# 0.608-0.752; Triton warp specialisation (tl.range(warp_specialize=True)) 0.465 / 0.686.
_H100_CONFIG = {
    True: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
    False: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
}
# Under the interpreter: small tiles, so the CPU tests exercise many tiles per persistent program,
# ragged edges in M and N, and several K steps.
_INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _store_post_and_signs(
    c, post_desc, signs_ptr, offs_m, offs_n, M, n_words, HALF_N: tl.constexpr, NEG_SCALE: tl.constexpr
):
    """Forward epilogue for one (BLOCK_M, HALF_N) half tile: post = f(c) and c's sign bits."""
    post = c * c * tl.where(c > 0, 1.0, NEG_SCALE)
    post_desc.store([offs_m, offs_n], post.to(post_desc.dtype))
    bits = tl.reshape((c > 0).to(tl.int32), (c.shape[0], HALF_N // 32, 32))
    words = tl.reduce(bits << tl.arange(0, 32)[None, None, :], 2, _bit_or)
    rows = offs_m + tl.arange(0, c.shape[0])
    cols = offs_n // 32 + tl.arange(0, HALF_N // 32)
    mask = (rows[:, None] < M) & (cols[None, :] < n_words)
    tl.store(signs_ptr + rows[:, None] * n_words + cols[None, :], words, mask=mask)


@triton.jit
def _load_saved(
    post_desc, signs_ptr, offs_m, offs_n, M, n_words, HALF_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """The saved state of one half tile: post (TMA) and its sign words."""
    rows = offs_m + tl.arange(0, BLOCK_M)
    cols = offs_n // 32 + tl.arange(0, HALF_N // 32)
    mask = (rows[:, None] < M) & (cols[None, :] < n_words)
    words = tl.load(signs_ptr + rows[:, None] * n_words + cols[None, :], mask=mask, other=0)
    return post_desc.load([offs_m, offs_n]), words


@triton.jit
def _act_grad(c, post, words, HALF_N: tl.constexpr):
    """dpre = c * f'(pre) for one half tile, f' rebuilt from post and the sign bits."""
    # bit j of a word -> the int32 sign bit, so "positive" is one shift and one compare
    positive = (
        tl.reshape(words[:, :, None] << (31 - tl.arange(0, 32))[None, None, :], (c.shape[0], HALF_N)) < 0
    )
    root = tl.sqrt(post.to(tl.float32))
    return c * tl.where(positive, 2.0 * root, -root)


@triton.jit
def _mlp_gemm_kernel(
    a_desc,  # (M, K): x in the forward, dY in the backward
    b_desc,  # (N, K): w_up in the forward, w_down.T in the backward
    post_desc,  # (M, N): written in the forward, read in the backward
    out_desc,  # (M, N): dpre in the backward (unused in the forward)
    signs_ptr,  # (M, n_words) int32: written in the forward, read in the backward
    M,
    N,
    K,
    n_words,
    FORWARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_SMS: tl.constexpr,
    NEG_SCALE: tl.constexpr,  # (LeakyReLU slope)^2 = 0.25; anything else only under a planted fault
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    HALF_N: tl.constexpr = BLOCK_N // 2
    # Row-major tile order: all of B (<= 2048 x 512) stays in L2, so grouping along M buys nothing.
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        offs_m = (tile // num_pid_n) * BLOCK_M
        offs_n = (tile % num_pid_n) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([offs_m, ki * BLOCK_K])
            b = b_desc.load([offs_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        # Epilogue in two column halves: halves the staging buffer for the TMA store.
        acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1))
        c0, c1 = tl.split(acc)
        if FORWARD:
            _store_post_and_signs(c0, post_desc, signs_ptr, offs_m, offs_n, M, n_words, HALF_N, NEG_SCALE)
            _store_post_and_signs(
                c1, post_desc, signs_ptr, offs_m, offs_n + HALF_N, M, n_words, HALF_N, NEG_SCALE
            )
        else:  # both halves' saved state is requested before either is used: one exposed latency
            p0, w0 = _load_saved(post_desc, signs_ptr, offs_m, offs_n, M, n_words, HALF_N, BLOCK_M)
            p1, w1 = _load_saved(post_desc, signs_ptr, offs_m, offs_n + HALF_N, M, n_words, HALF_N, BLOCK_M)
            out_desc.store([offs_m, offs_n], _act_grad(c0, p0, w0, HALF_N).to(out_desc.dtype))
            out_desc.store([offs_m, offs_n + HALF_N], _act_grad(c1, p1, w1, HALF_N).to(out_desc.dtype))


def _config(forward: bool) -> dict:
    return dict(_INTERPRETER_CONFIG) if interpreter_active() else dict(_H100_CONFIG[forward])


# Compiled kernels by everything Triton specialises this launch on. Launching a cached CompiledKernel
# skips the JIT's per-call argument binding and cache-key hashing (~30 us a launch on the H200 host).
_compiled: dict[tuple, object] = {}


def _launch(a, b, post, out, signs, forward: bool) -> None:
    """One persistent launch: FORWARD writes post = f(a @ b.T) and signs; otherwise out = (a @ b.T) *
    f'(pre) from post and signs. The forward passes `post` for `out` too: FORWARD is a constexpr, so
    the forward kernel contains no access to out_desc at all and the aliasing cannot race."""
    M, K = a.shape
    N = b.shape[0]
    cfg = _config(forward)
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    half = [bm, bn // 2]
    descs = (
        TensorDescriptor.from_tensor(a, [bm, bk]),
        TensorDescriptor.from_tensor(b, [bn, bk]),
        TensorDescriptor.from_tensor(post, half),
        TensorDescriptor.from_tensor(out, half),
    )
    sms = num_sms(a.device.index or 0)
    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)), 1, 1)  # a CompiledKernel indexes all 3
    n_words = signs.shape[1]
    neg_scale = 0.3 if planted_fault("mlp") else 0.25
    launches["mlp_fwd" if forward else "mlp_bwd"] += 1
    args = (*descs, signs, M, N, K, n_words, forward, bm, bn, bk, sms, neg_scale)
    # Triton specialises ints on divisibility by 16 and on == 1, pointers on 16-byte alignment.
    aligned = signs.data_ptr() % 16 == 0
    key = (forward, a.dtype, a.device.index, N, K, n_words, M % 16 == 0, M == 1, aligned, neg_scale)
    kernel = _compiled.get(key)
    if kernel is not None:
        kernel[grid](*args)
        return
    names = ("FORWARD", "BLOCK_M", "BLOCK_N", "BLOCK_K", "NUM_SMS", "NEG_SCALE")
    kernel = _mlp_gemm_kernel[grid](*args[:9], **dict(zip(names, args[9:])), **cfg)
    if not interpreter_active():  # the interpreter returns no compiled kernel
        _compiled[key] = kernel


def sign_words(n: int) -> int:
    """int32 words per row of the sign bits saved for backward: ceil(n / 32)."""
    return triton.cdiv(n, 32)


def up_act(x: torch.Tensor, w_up: torch.Tensor, post=None, signs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel alone: x (M, K), w_up (N, K) -> (post = f(x @ w_up.T) (M, N), signs), into
    `post` and `signs` when given (tests poison them first)."""
    M, N = x.shape[0], w_up.shape[0]
    x, w_up = _aligned(x), _aligned(w_up)
    post = empty((M, N), x.dtype, x.device) if post is None else post
    signs = torch.empty(M, sign_words(N), dtype=torch.int32, device=x.device) if signs is None else signs
    if M > 0:
        _launch(x, w_up, post, post, signs, forward=True)
    return post, signs


def act_grad(grad_out: torch.Tensor, w_down: torch.Tensor, post, signs, out=None) -> torch.Tensor:
    """The backward kernel alone: dpre = (grad_out @ w_down) * f'(pre), f' rebuilt from post and signs
    (into `out` when given)."""
    dpre = empty(post.shape, post.dtype, post.device) if out is None else out
    if post.shape[0] > 0:
        _launch(_aligned(grad_out), w_down.t().contiguous(), post, dpre, signs, forward=False)
    return dpre


def _forward(x, w_up, w_down):
    post, signs = up_act(x, w_up)
    return post @ w_down.t(), post, signs


def _gradients(needs, x, w_up, w_down, post, signs, grad_out, act_grad_fn=act_grad):
    """(dx, dw_up, dw_down) for the inputs in `needs` (None for the others)."""
    grad_out = grad_out.contiguous()
    need_x, need_up, need_down = needs
    dx = dw_up = dw_down = None
    if need_down:
        dw_down = grad_out.t() @ post
    if need_x or need_up:
        dpre = act_grad_fn(grad_out, w_down, post, signs)
        dx = dpre @ w_up if need_x else None
        dw_up = dpre.t() @ x if need_up else None
    return dx, dw_up, dw_down


# ----------------------------------------------------------------------------------------------
# Autograd. Eager: a plain autograd.Function calling the launchers (no dispatcher on the path: the
# custom ops cost ~60 us a call each in Python dispatch). Under torch.compile: custom ops, opaque to
# the tracer (descriptors are only ever built on real tensors), with the same forward and backward.
# ----------------------------------------------------------------------------------------------


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_up, w_down):
        out, post, signs = _forward(x, w_up, w_down)
        ctx.save_for_backward(x, w_up, w_down, post, signs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _gradients(ctx.needs_input_grad, *ctx.saved_tensors, grad_out)


@torch.library.custom_op("golfbench::fused_mlp_fwd", mutates_args=())
def _fused_mlp_fwd_op(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K), w_up (N, K), w_down (K, N) -> (out (M, K), post (M, N), signs (M, ceil(N/32)))."""
    return _forward(x, w_up, w_down)


@_fused_mlp_fwd_op.register_fake
def _(x, w_up, w_down):
    M, N = x.shape[0], w_up.shape[0]
    return (
        x.new_empty(M, w_down.shape[0]),
        x.new_empty(M, N),
        x.new_empty(M, sign_words(N), dtype=torch.int32),
    )


@torch.library.custom_op("golfbench::fused_mlp_act_grad", mutates_args=())
def _act_grad_op(
    grad_out: torch.Tensor, w_down: torch.Tensor, post: torch.Tensor, signs: torch.Tensor
) -> torch.Tensor:
    return act_grad(grad_out, w_down, post, signs)


@_act_grad_op.register_fake
def _(grad_out, w_down, post, signs):
    return torch.empty_like(post)


def _setup_context(ctx, inputs, output):
    x, w_up, w_down = inputs
    _, post, signs = output
    # post and signs are saved activations, not outputs anyone differentiates: without this,
    # autograd would materialise (and zero-fill) an M x N gradient for post in every backward.
    ctx.mark_non_differentiable(post, signs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_up, w_down, post, signs)


def _op_backward(ctx, grad_out, _grad_post, _grad_signs):
    if grad_out is None:  # the output did not reach the loss
        return None, None, None
    act_grad_op = torch.ops.golfbench.fused_mlp_act_grad  # opaque to the compiled backward graph
    return _gradients(ctx.needs_input_grad, *ctx.saved_tensors, grad_out, act_grad_op)


_fused_mlp_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.bfloat16, torch.float16)


def _shape_blocker(x2d: torch.Tensor, w_up: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take operands of this dtype and shape (names the dim), or None.

    Uses only dtype and shape, which are constants at trace time, so torch.compile folds it.
    """
    dtype = x2d.dtype
    if dtype not in _TRITON_DTYPES and not (dtype == torch.float32 and interpreter_active()):
        return f"dtype {dtype} (the kernel takes bfloat16/float16; float32 only under the interpreter)"
    per16 = 16 // dtype.itemsize
    K, N = x2d.shape[1], w_up.shape[0]
    if K % per16:
        return f"K = x.shape[-1] = {K} is not a multiple of {per16} (TMA rows must be 16-byte aligned)"
    if N % per16:
        return f"N = w_up.shape[0] = {N} is not a multiple of {per16} (TMA rows must be 16-byte aligned)"
    return None


def _alignment_blocker(**operands: torch.Tensor) -> str | None:
    """Eager-only check of TMA base-address alignment (FakeTensors have no data pointer)."""
    for name, t in operands.items():
        if t.data_ptr() % 16:
            return f"{name} starts at an address that is not 16-byte aligned (a sliced view?)"
    return None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # Under torch.compile the dispatch cannot see addresses; a misaligned operand is copied here.
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_shapes(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> None:
    if w_up.dim() != 2 or w_down.dim() != 2:
        shapes = f"w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}"
        raise ValueError(f"fused_mlp: weights must be 2-D, got {shapes}")
    K, N = x.shape[-1], w_up.shape[0]
    if w_up.shape[1] != K:
        raise ValueError(f"fused_mlp: w_up.shape[1] = {w_up.shape[1]} does not match K = x.shape[-1] = {K}")
    if tuple(w_down.shape) != (K, N):
        raise ValueError(f"fused_mlp: w_down has shape {tuple(w_down.shape)}, expected (K, N) = ({K}, {N})")
    if not (x.dtype == w_up.dtype == w_down.dtype):
        raise ValueError(f"fused_mlp: dtypes differ: x {x.dtype}, w_up {w_up.dtype}, w_down {w_down.dtype}")


def fused_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """down(leaky_relu(x @ w_up.T, 0.5) ** 2): x (..., K), w_up (N, K), w_down (K, N).

    impl: "auto" runs the Triton kernel on Hopper when the operands allow and the reference
    otherwise (logging the reason once); "triton" forces the kernel (also on CPU tensors under
    TRITON_INTERPRET=1) and raises ValueError naming the offending dim when it cannot;
    "torch" is the reference. Differentiable in x and both weights; traceable by
    torch.compile(fullgraph=True).
    """
    if impl not in IMPLS:
        raise ValueError(f"fused_mlp: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if torch.is_autocast_enabled(x.device.type):  # behave like F.linear under autocast
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_up, w_down = x.to(dtype), w_up.to(dtype), w_down.to(dtype)
    _check_shapes(x, w_up, w_down)
    if impl == "torch":
        return fused_mlp_ref(x, w_up, w_down)

    x2d = x.reshape(-1, x.shape[-1])
    w_up, w_down = w_up.contiguous(), w_down.contiguous()
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    compiling = torch.compiler.is_compiling()
    blocker = platform_blocker(x.device.type, x.device.index or 0) or _shape_blocker(x2d, w_up)
    if blocker is None and not compiling:
        blocker = _alignment_blocker(x=x2d, w_up=w_up, w_down=w_down)
    if not use_triton("fused_mlp", impl, blocker):
        return fused_mlp_ref(x, w_up, w_down)
    out = _fused_mlp_fwd_op(x2d, w_up, w_down)[0] if compiling else _FusedMLP.apply(x2d, w_up, w_down)
    return out.reshape(*x.shape[:-1], w_down.shape[0])
