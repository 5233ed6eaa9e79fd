"""Causal grouped-query attention with the fastest correct backend of the machine, chosen by measurement.

    y = softmax(q k^T / sqrt(D) + causal mask) v,   q (B, T, H, D), k and v (B, T, Hkv, D), H % Hkv == 0

The record model spends a large share of its step here, and PyTorch's default SDPA selection does
not pick the fastest kernel for it: on an H200 at the record shape (48 x 2048, 8/4 heads, D = 64,
bf16) its flash backend ran fwd+bwd in 3.58 ms and the cuDNN backend in 2.15 ms. So `impl="auto"`
measures every candidate once per (shape, dtype, device) and keeps the fastest one whose output and
gradients match the fp32 reference; the table of times and errors is kept beside the choice
(`selections()`) and logged.

Backends (`impl`):
  sdpa       PyTorch's own selection (what a script without FA3 gets: the reference)
  cudnn, flash, efficient, math
             one SDPA backend, forced with torch.nn.attention.sdpa_kernel; GQA natively (enable_gqa)
  <name>+expand
             the same with K/V repeated to H heads first (sometimes faster, always more memory)
  fa3        FlashAttention-3 (`flash_attn_interface`), when importable
  fa4        FlashAttention-4 (`flash-attn-4`, CuTe DSL: the optional extra `pip install '.[fa4]'`),
             when importable: native GQA, (B, T, H, D) in and out, no head expansion or reduction pass
  auto       the measured choice on CUDA; on other devices PyTorch's own selection
A forced backend that cannot run here raises ValueError naming it; "auto" skips it with the reason.

FlashAttention-4 has no torch.library registration of its own (flash_attn.cute.flash_attn_func is a
torch.autograd.Function around kernels that the CuTe DSL compiles on first call, which dynamo cannot
trace), so it runs as two custom ops of ours: golfbench::fa4_fwd (q, k, v, scale) -> (out, lse) and
golfbench::fa4_bwd (q, k, v, out, dout, lse, scale) -> (dq, dk, dv), each with a fake implementation,
wired by register_autograd. They call the package's own forward and backward (interface._flash_attn_fwd
and _flash_attn_bwd: the functions its autograd.Function calls; private names, hence the exact pin of
the extra). lse is the (B, H, T) fp32 log-sum-exp of the scaled scores, saved for the backward.

The choice is made where torch.compile traces the model: `_choose` is a compile-time constant
(torch.compiler.assume_constant_result), so the chosen kernel is baked into the graph and the
measurement runs once, eagerly, on real tensors of the traced shape.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._runtime import empty, launches, log, log_once

try:  # FlashAttention-3 (Hopper); optional
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:
    _fa3_func = None

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Candidates of "auto", in the order they are measured (math is never fast: it is not one).
CANDIDATES = (
    "cudnn", "flash", "efficient", "fa3", "fa4", "cudnn+expand", "flash+expand", "efficient+expand"
)  # fmt: skip
IMPLS = ("auto", "sdpa", *SDPA_BACKENDS, *(f"{name}+expand" for name in SDPA_BACKENDS), "fa3", "fa4")
FA4_INSTALL = "pip install '.[fa4]'"  # the optional extra of pyproject.toml (bench/wheels.sh offline)
FA4_DTYPES = (torch.float16, torch.bfloat16)

# A candidate is correct when its relative Frobenius error against fp32 math (output and each input
# gradient) is at most twice the error of the same math done op by op in the inputs' dtype (what that
# dtype's rounding costs: DESIGN.md section 4), with a floor for fp32 inputs, whose yardstick is ~0.
ERROR_FACTOR = 2.0
ERROR_FLOOR = 1e-4
CHECK_SHAPE = (2, 512)  # (batch, seq_len) of the correctness check; heads and head dim as traced
TIMED_CALLS = 10

_selections: dict[tuple, dict] = {}


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: causal GQA attention in plain PyTorch, in the inputs' dtype. (B, T, H, D) in and out."""
    t, h, d = q.shape[1], q.shape[2], q.shape[3]
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _sdpa(q, k, v, backend: SDPBackend | None, expand: bool) -> torch.Tensor:
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if expand:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if backend is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)
    else:
        with sdpa_kernel([backend]):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------
# FlashAttention-4 (optional): two custom ops around the package's own forward and backward
# ---------------------------------------------------------------------------------------------------


@functools.cache
def fa4_import_error() -> str | None:
    """None when flash-attn-4 imports, else why not, naming the package and the command that installs it."""
    try:
        from flash_attn.cute import interface  # noqa: F401
    except Exception as exc:  # ImportError, or the CuTe DSL failing to load its CUDA libraries
        return (
            f"flash-attn-4 (FlashAttention-4) is not importable ({type(exc).__name__}: {str(exc)[:200]}); "
            f"install it with {FA4_INSTALL} (offline GPU machine: bash bench/wheels.sh install)"
        )
    return None


def _fa4_blocker(dtype: torch.dtype, device_type: str) -> str | None:
    reason = fa4_import_error()
    if reason is None and device_type != "cuda":
        reason = f"FlashAttention-4 runs on CUDA GPUs, the tensors are on {device_type}"
    if reason is None and dtype not in FA4_DTYPES:
        reason = f"FlashAttention-4 takes float16/bfloat16 inputs, not {str(dtype).removeprefix('torch.')}"
    return reason


def causal_attention_lse_ref(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of golfbench::fa4_fwd: the output (q's dtype) and lse (B, H, T) fp32, the log-sum-exp of
    the scaled causal scores. Math in fp32 (fp64 for fp64 inputs)."""
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    t, rep = q.shape[1], q.shape[2] // k.shape[2]
    kf, vf = (x.to(f).repeat_interleave(rep, dim=2) for x in (k, v))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = (torch.einsum("bqhd,bkhd->bhqk", q.to(f), kf) * scale).masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (s - lse[..., None]).exp(), vf)
    return out.to(q.dtype), lse.float()


def causal_attention_bwd_ref(q, k, v, out, dout, lse, scale: float):
    """Reference of golfbench::fa4_bwd, computed from the saved out and lse as a flash backward does:
    P = exp(scale q k^T - lse), dv = P^T do, dS = P * (do v^T - rowsum(do * out)), dq = scale dS k,
    dk = scale dS^T q, the query heads of each KV head summed into its dk and dv. Math in fp32 (fp64)."""
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, t, h, d = q.shape
    hkv = k.shape[2]
    kf, vf = (x.to(f).repeat_interleave(h // hkv, dim=2) for x in (k, v))
    qf, of, gf = q.to(f), out.to(f), dout.to(f)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    p = (s - lse.to(f)[..., None]).exp().masked_fill(~mask, 0.0)
    delta = (gf * of).sum(-1).transpose(1, 2)  # (B, H, T)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", gf, vf) - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
    fold = lambda x: x.reshape(b, t, hkv, h // hkv, d).sum(3)  # noqa: E731
    dk = fold(torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale)
    dv = fold(torch.einsum("bhqk,bqhd->bkhd", p, gf))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _fa4_forward(q, k, v, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """FlashAttention-4's forward into out (B, T, H, D) and lse (B, H, T) (a stand-in in CPU tests)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True, out=out, lse=lse)


def _fa4_backward(q, k, v, out, dout, lse, scale: float, dq, dk, dv) -> None:
    """FlashAttention-4's backward into dq, dk, dv (native GQA: dk, dv have the KV heads)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True, dq=dq, dk=dk, dv=dv)


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("golfbench::fa4_fwd", mutates_args=())
def _fa4_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention (B, T, H, D) and the (B, H, T) fp32 lse the backward needs."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, t, h, d = q.shape
    out, lse = empty((b, t, h, d), q.dtype, q.device), empty((b, h, t), torch.float32, q.device)
    with _on_device(q):
        _fa4_forward(q, k, v, scale, out, lse)
    launches["fa4_fwd"] += 1
    return out, lse


@_fa4_fwd_op.register_fake
def _(q, k, v, scale):
    b, t, h, d = q.shape
    return q.new_empty(b, t, h, d), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("golfbench::fa4_bwd", mutates_args=())
def _fa4_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of fa4_fwd's output contracted with dout, in the inputs' dtype."""
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    dq, dk, dv = (empty(x.shape, x.dtype, x.device) for x in (q, k, v))
    with _on_device(q):
        _fa4_backward(q, k, v, out, dout, lse, scale, dq, dk, dv)
    launches["fa4_bwd"] += 1
    return dq, dk, dv


@_fa4_bwd_op.register_fake
def _(q, k, v, out, dout, lse, scale):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _fa4_op_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*_fa4_bwd_op(q, k, v, out, dout, lse, ctx.scale), None)


_fa4_fwd_op.register_autograd(_fa4_op_backward, setup_context=_fa4_setup_context)


def _run(q, k, v, impl: str) -> torch.Tensor:
    """One concrete backend (never "auto")."""
    if impl == "fa4":
        return _fa4_fwd_op(q, k, v, 1.0 / math.sqrt(q.shape[-1]))[0]
    if impl == "fa3":
        out = _fa3_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    name, _, expand = impl.partition("+")
    return _sdpa(q, k, v, None if name == "sdpa" else SDPA_BACKENDS[name], expand == "expand")


def _inputs(b, t, h, hkv, d, dtype, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.randn(b, t, n, d, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_()
        for n in (h, hkv, hkv)
    ]


def _rel_errors(impl: str, q, k, v, ref_out, ref_grads, g) -> list[float]:
    out = causal_attention_ref(q, k, v) if impl == "ref" else _run(q, k, v, impl)
    grads = torch.autograd.grad(out, (q, k, v), g)
    return [
        float((a.detach().float() - r).norm() / r.norm().clamp_min(1e-30))
        for a, r in zip((out, *grads), (ref_out, *ref_grads))
    ]


def _probe(impl: str, h: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Can `impl` run here, and is it correct? Relative errors of output and gradients on a small shape."""
    if impl == "fa3" and _fa3_func is None:
        return {
            "status": "unavailable",
            "reason": "flash_attn_interface (FlashAttention-3) is not importable",
        }
    if impl == "fa4" and (reason := _fa4_blocker(dtype, device.type)):
        return {"status": "unavailable", "reason": reason}
    b, t = CHECK_SHAPE
    q, k, v = _inputs(b, t, h, hkv, d, dtype, device, seed=0)
    g = torch.randn(b, t, h, d, device=device, dtype=dtype)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref_out = causal_attention_ref(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), g.float())
    ref_out = ref_out.detach()
    # SDPA raises RuntimeError when a forced backend cannot take the inputs; FlashAttention-4 asserts, and
    # its CuTe DSL compiler raises its own errors: any of them means this backend cannot run here.
    refusals = Exception if impl == "fa4" else RuntimeError
    try:
        # a backend that cannot take the inputs also warns once per reason; the reason is recorded instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            errors = _rel_errors(impl, q, k, v, ref_out, ref_grads, g)
    except refusals as exc:
        return {"status": "unavailable", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    same_dtype = _rel_errors("ref", q, k, v, ref_out, ref_grads, g)
    limits = [max(ERROR_FACTOR * e, ERROR_FLOOR) for e in same_dtype]
    names = ("out", "dq", "dk", "dv")
    result = {"errors": dict(zip(names, errors)), "limits": dict(zip(names, limits))}
    bad = [n for n, e, lim in zip(names, errors, limits) if not e <= lim]
    if bad:
        return {**result, "status": "wrong", "reason": f"error above the limit in {', '.join(bad)}"}
    return {**result, "status": "ok"}


def _time_fwd_bwd(impl: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> float:
    """Median ms of forward + backward at `shape` (after two warm-up calls; CUDA events on a GPU)."""
    b, t, h, hkv, d = shape
    q, k, v = _inputs(b, t, h, hkv, d, dtype, device, seed=1)
    g = torch.randn(b, t, h, d, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    times = []
    for i in range(TIMED_CALLS + 2):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        torch.autograd.grad(_run(q, k, v, impl), (q, k, v), g)
        if cuda:
            end.record()
            end.synchronize()
        ms = start.elapsed_time(end) if cuda else 1e3 * (time.perf_counter() - t0)
        if i >= 2:
            times.append(ms)
    return sorted(times)[len(times) // 2]


def measure(
    shape: tuple, dtype: torch.dtype, device: torch.device, candidates: tuple[str, ...] = CANDIDATES
) -> dict:
    """Check and time every candidate at `shape` = (B, T, H, Hkv, D). Returns the selection record:
    {"choice": impl, "candidates": {impl: {status, reason?, errors?, limits?, ms?}}, ...}."""
    b, t, h, hkv, d = shape
    table = {}
    # The choice is made where the first call happens: inside a compiled training step (autocast: the
    # fp32 reference must stay fp32, every candidate must see the traced dtype) or an eval under
    # inference_mode (whose tensors could not be differentiated).
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for impl in candidates:
            entry = _probe(impl, h, hkv, d, dtype, device)
            if entry["status"] == "ok":
                try:
                    entry["ms"] = _time_fwd_bwd(impl, shape, dtype, device)
                except RuntimeError as exc:  # e.g. out of memory for an expanded K/V
                    entry.update(status="unavailable", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            table[impl] = entry
            if device.type == "cuda":
                torch.cuda.empty_cache()
    timed = {impl: e["ms"] for impl, e in table.items() if "ms" in e}
    choice = min(timed, key=timed.get) if timed else "sdpa"
    why = (
        f"fastest correct of {len(timed)} measured fwd+bwd"
        if timed
        else "no candidate could be measured: PyTorch's own selection"
    )
    return {
        "shape": dict(zip(("batch", "seq_len", "heads", "kv_heads", "head_dim"), shape)),
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "choice": choice,
        "why": why,
        "candidates": table,
    }


@torch.compiler.assume_constant_result
def _choose(shape: tuple, dtype_name: str, device_type: str, device_index: int) -> str:
    """The backend "auto" runs for this shape: measured once per process and key, a constant to compile."""
    key = (shape, dtype_name, device_type, device_index)
    if key not in _selections:
        if device_type != "cuda":
            _selections[key] = {"choice": "sdpa", "why": f"{device_type} device: PyTorch's own selection"}
        else:
            _selections[key] = measure(shape, getattr(torch, dtype_name), torch.device("cuda", device_index))
            rec = _selections[key]
            times = ", ".join(
                f"{impl} {e['ms']:.3f} ms" if "ms" in e else f"{impl} {e['status']}"
                for impl, e in rec["candidates"].items()
            )
            log.info(f"attention: {rec['choice']} for {shape} {dtype_name} ({rec['why']}: {times})")
            for impl in ("fa3", "fa4"):  # optional packages: say what to install
                entry = rec["candidates"].get(impl, {})
                if entry.get("status", "ok") != "ok":
                    log.info(f"attention: {impl} {entry['status']}: {entry['reason']}")
    return _selections[key]["choice"]


def selections() -> list[dict]:
    """Every choice "auto" made in this process, with its measurements (for run reports)."""
    return [dict(rec) for rec in _selections.values()]


@functools.cache
def unavailable_reason(impl: str, h: int, hkv: int, d: int, dtype_name: str, device_type: str) -> str | None:
    """Why backend `impl` cannot run (or runs wrong) here for these heads and dtype; None if it can."""
    device = torch.device(device_type)
    if impl == "fa3" and _fa3_func is None:
        return "flash_attn_interface (FlashAttention-3) is not importable"
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        entry = _probe(impl, h, hkv, d, getattr(torch, dtype_name), device)
    return None if entry["status"] == "ok" else entry["reason"]


@torch.compiler.assume_constant_result
def _check_forced(impl: str, h: int, hkv: int, d: int, dtype_name: str, device_type: str) -> str:
    reason = unavailable_reason(impl, h, hkv, d, dtype_name, device_type)
    if reason is not None:
        raise ValueError(f"causal_attention(impl={impl!r}) cannot run here: {reason}")
    return impl


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Causal GQA attention, (B, T, H, D) and (B, T, Hkv, D) in, (B, T, H, D) out, scale 1/sqrt(D).
    Differentiable; traceable by torch.compile(fullgraph=True). See the module docstring for `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"causal_attention: impl must be one of {IMPLS}, got {impl!r}")
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"causal_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"causal_attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads"
        )
    dtype_name = str(q.dtype).removeprefix("torch.")
    if impl == "auto":
        shape = (*q.shape[:3], k.shape[2], q.shape[3])
        impl = _choose(shape, dtype_name, q.device.type, q.device.index or 0)
        log_once(f"attention:{impl}", f"attention: running {impl}")
    elif impl != "sdpa":
        impl = _check_forced(impl, q.shape[2], k.shape[2], q.shape[3], dtype_name, q.device.type)
    return _run(q, k, v, impl)
