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
  auto       the measured choice on CUDA; on other devices PyTorch's own selection
A forced backend that cannot run here raises ValueError naming it; "auto" skips it with the reason.

The choice is made where torch.compile traces the model: `_choose` is a compile-time constant
(torch.compiler.assume_constant_result), so the chosen kernel is baked into the graph and the
measurement runs once, eagerly, on real tensors of the traced shape.
"""

from __future__ import annotations

import functools
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._runtime import log, log_once

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
CANDIDATES = ("cudnn", "flash", "efficient", "fa3", "cudnn+expand", "flash+expand", "efficient+expand")
IMPLS = ("auto", "sdpa", *SDPA_BACKENDS, *(f"{name}+expand" for name in SDPA_BACKENDS), "fa3")

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


def _run(q, k, v, impl: str) -> torch.Tensor:
    """One concrete backend (never "auto")."""
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
    b, t = CHECK_SHAPE
    q, k, v = _inputs(b, t, h, hkv, d, dtype, device, seed=0)
    g = torch.randn(b, t, h, d, device=device, dtype=dtype)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref_out = causal_attention_ref(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), g.float())
    ref_out = ref_out.detach()
    try:
        # a backend that cannot take the inputs also warns once per reason; the reason is recorded instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            errors = _rel_errors(impl, q, k, v, ref_out, ref_grads, g)
    except RuntimeError as exc:  # SDPA raises RuntimeError when a forced backend cannot take the inputs
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
