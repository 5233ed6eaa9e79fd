"""The field's kernels as benchmark providers: Liger-Kernel's Triton ops beside ours, where installed.

A kernel engineer choosing between this project and the libraries they know wants those libraries in
the same table, timed the same way and checked against the same reference. For each op this module has

  *_inputs(...)      the op's inputs on the GPU (fresh random numbers, seeded), shapes and dtype given
  *_check(fn, ...)   a Provider `check`: fn's relative errors against the op's fp32 reference (the
                     reference of our own kernel or of the record model), for any fn with the op's
                     signature, so a suite checks its own providers with the same function
  liger_*(...)       a bench.registry.Provider timing Liger-Kernel's kernel, skipped with the reason
                     when liger-kernel is absent (`pip install '.[liger]'`) or there is no CUDA GPU

Ops and what the Liger provider does to match the record's math:
  rms_norm      y = x / rms(x), no weight (F.rms_norm with eps=None: fp32 machine epsilon). Liger's
                RMSNorm takes a weight: a ones vector is passed (its backward also reduces dW over
                the rows, work the record does not need). in_place=False: Liger's default writes dX
                into the incoming gradient, which a timing loop reuses.
  rotary        the record's partial rotate-half RoPE (kernels.qk_rope.apply_rotary: the first rope_dims
                of each head; tables from model.gpt.Rotary). Liger's rope takes rotary_dim and leaves the
                other dims untouched, so no slice or cat is needed: it reads and writes only the rotated
                rope_dims of each head, in place (the reference reads all head_dim and writes a new
                tensor). Its rotation has the opposite sign, so it gets -sin (a T x rope_dims/2 table,
                negated once at setup), and fp32 tables (the record's bf16 values, fp32 math).
  cross_entropy CE(softcap * tanh(z / softcap), t), mean (kernels.cross_entropy's reference).
                LigerCrossEntropyLoss(softcap=...): with gradients it computes them in the forward and
                writes them over the logits (later timed calls read the previous call's gradients: the
                same work); it syncs with the host once a call (the count of targets).
  linear_ce     the LM head's matmul z = x @ W^T and the softcapped CE of z, fwd+bwd (loss, dx, dW).
                LigerFusedLinearCrossEntropyLoss(softcap=...): chunks of rows, logits never whole.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.registry import Provider, needs_cuda

LIGER_INSTALL = "pip install '.[liger]'"
DEVICE = "cuda"  # where the inputs are made (the CPU tests of the checks set "cpu")
CHECK_ROWS = 16384  # rows of the accuracy checks (the timed shape's rows when fewer)


@functools.cache
def liger_import_error() -> str | None:
    """None when liger-kernel imports, else why not (naming the command that installs it)."""
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "liger_kernel":
            return f"liger-kernel is not installed ({LIGER_INSTALL})"
        return f"liger-kernel does not import: {type(exc).__name__}: {exc}"
    except Exception as exc:  # a Triton or torch it cannot work with
        return f"liger-kernel does not import: {type(exc).__name__}: {str(exc)[:300]}"
    return None


def liger_unavailable() -> str | None:
    return liger_import_error() or needs_cuda()


_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _randn(shape, dtype, gen, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE, generator=gen) * scale).to(dtype)


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.detach().float() - r).norm() / r.norm().clamp_min(1e-30))


def _leaves(tensors, wrt):
    """Fresh copies of `tensors` (the kernels may write their inputs), those at `wrt` requiring grad."""
    return [t.detach().clone().requires_grad_(i in wrt) for i, t in enumerate(tensors)]


def _outputs(fn, inputs, wrt, grads) -> list[torch.Tensor]:
    """fn's outputs (a tensor or a tuple of them), then the gradients of `inputs[wrt]` for `grads` (copies:
    a kernel may write over its incoming gradient, Liger's rope does)."""
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grads is None:
        return [o.detach().float() for o in outs]
    gs = [g.to(o.dtype, copy=True) for o, g in zip(outs, grads)]
    got = torch.autograd.grad(outs, [inputs[i] for i in wrt], gs)
    return [t.detach().float() for t in (*outs, *got)]


def _check(fn, ref, make, wrt, names, same_dtype: bool) -> Callable[[], dict]:
    """Provider.check: relative Frobenius errors of fn's outputs (and gradients) against `ref` on fp32
    copies of the same inputs; with same_dtype, also those of `ref` run in the inputs' own dtype (what
    that dtype's rounding costs, for scale). make() -> (inputs, output grads or None)."""

    def check() -> dict:
        inputs, grads = make()
        wrt_ = wrt if grads is not None else ()  # a forward-only check runs without autograd, as timed
        with torch.enable_grad():
            want = _outputs(
                ref, _leaves([t.float() if t.is_floating_point() else t for t in inputs], wrt_), wrt_, grads
            )
            got = _outputs(fn, _leaves(inputs, wrt_), wrt_, grads)
            result = {"rel_err": dict(zip(names, map(_rel, got, want)))}
            if same_dtype:
                dtype = next(t.dtype for t in inputs if t.is_floating_point())
                own = _outputs(ref, _leaves(inputs, wrt_), wrt_, grads)
                result[f"rel_err_{_SHORT.get(dtype, dtype)}_math"] = dict(zip(names, map(_rel, own, want)))
        return result

    return check


def _timed(fn, inputs, wrt, grads, mode: str):
    """The callable a provider's setup returns: fn's forward, or forward + backward (fresh gradients)."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode != "fwd+bwd":
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    for i in wrt:
        inputs[i].requires_grad_()
    leaves = [inputs[i] for i in wrt]

    def step():
        out = fn(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        return torch.autograd.grad(outs, leaves, [g.to(o.dtype) for o, g in zip(outs, grads)])

    return step


def _liger_provider(name: str, fn_factory, make, wrt, mode: str, check_of) -> Provider:
    """A Provider timing fn_factory()'s fn on make(seed=0)'s inputs; its check is check_of(fn). Nothing
    imports liger-kernel before the harness has asked unavailable()."""

    def setup():
        inputs, grads = make(seed=0)
        return _timed(fn_factory(), inputs, wrt, grads, mode)

    return Provider(name, setup, liger_unavailable, check=lambda: check_of(fn_factory())())


def _names(outputs, inputs, mode):
    return (*outputs, *(f"d{n}" for n in inputs)) if mode == "fwd+bwd" else tuple(outputs)


# --- rms_norm: y = x / rms(x) over the last dim, no weight ---------------------------------------------


def rms_norm_inputs(rows: int, dim: int, dtype: torch.dtype, mode: str, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = _randn((rows, dim), dtype, gen)
    return [x], ([_randn((rows, dim), dtype, gen)] if mode == "fwd+bwd" else None)


def rms_norm_check(fn, rows: int, dim: int, dtype: torch.dtype, mode: str) -> Callable[[], dict]:
    """fn(x) -> y against model.gpt.rms_norm in fp32 (and in `dtype`, for scale)."""
    from model.gpt import rms_norm

    make = lambda: rms_norm_inputs(min(rows, CHECK_ROWS), dim, dtype, mode, seed=1)  # noqa: E731
    return _check(fn, rms_norm, make, (0,), _names(["out"], ["x"], mode), same_dtype=True)


def _liger_rms_norm_fn(dim: int, dtype: torch.dtype):
    from liger_kernel.transformers.functional import liger_rms_norm

    ones, eps = torch.ones(dim, device=DEVICE, dtype=dtype), torch.finfo(torch.float32).eps
    return lambda x: liger_rms_norm(x, ones, eps, in_place=False)


def liger_rms_norm(rows: int, dim: int, dtype: torch.dtype, mode: str, name: str = "liger") -> Provider:
    """Liger's RMSNorm with a ones weight on (rows, dim) of `dtype`; mode "fwd" or "fwd+bwd"."""
    return _liger_provider(
        name,
        lambda: _liger_rms_norm_fn(dim, dtype),
        functools.partial(rms_norm_inputs, rows, dim, dtype, mode),
        (0,),
        mode,
        lambda fn: rms_norm_check(fn, rows, dim, dtype, mode),
    )


# --- rotary: the record's partial rotate-half RoPE of q (B, T, H, D) and k (B, T, Hkv, D) --------------


def rotary_inputs(batch, seq_len, heads, kv_heads, head_dim, rope_dims, dtype, mode, seed: int = 0):
    """[q, k, cos, sin] with the record's tables for rope_dims (model.gpt.Rotary: (1, T, 1, rope_dims/2),
    in `dtype` as the model passes them), and the output gradients for fwd+bwd."""
    from model.config import GPTConfig
    from model.gpt import Rotary

    config = GPTConfig(
        model_dim=heads * head_dim, num_heads=heads, num_kv_heads=kv_heads, rope_dims=rope_dims,
        rope_train_seq_len=seq_len,
    )  # fmt: skip
    cos, sin = (
        t[None, :, None, :].to(dtype) for t in Rotary(config).to(DEVICE)(seq_len, torch.device(DEVICE))
    )
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k = (_randn((batch, seq_len, n, head_dim), dtype, gen) for n in (heads, kv_heads))
    grads = [_randn(t.shape, dtype, gen) for t in (q, k)] if mode == "fwd+bwd" else None
    return [q, k, cos, sin], grads


def rotary_ref(q, k, cos, sin):
    from kernels.qk_rope import apply_rotary

    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rotary_check(fn, batch, seq_len, heads, kv_heads, head_dim, rope_dims, dtype, mode) -> Callable[[], dict]:
    """fn(q, k, cos, sin) -> (q', k') against kernels.qk_rope.apply_rotary in fp32 (and in `dtype`)."""
    rows = max(1, min(batch, CHECK_ROWS // seq_len))
    args = (rows, seq_len, heads, kv_heads, head_dim, rope_dims, dtype, mode)
    make = lambda: rotary_inputs(*args, seed=1)  # noqa: E731
    return _check(fn, rotary_ref, make, (0, 1), _names(["q", "k"], ["q", "k"], mode), same_dtype=True)


def _liger_rotary_fn(rope_dims: int):
    from liger_kernel.ops.rope import LigerRopeFunction

    def fn(q, k, cos, sin):
        # (1, T, rope_dims/2) fp32 tables, sin negated: Liger rotates by +angle where the record rotates by
        # -angle. Liger takes (B, H, T, D) views of (B, T, H, D) storage and rotates it in place.
        c, s = cos.reshape(1, cos.shape[1], -1).float(), sin.reshape(1, sin.shape[1], -1).float().neg()
        q2, k2 = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), c, s, None, 1, rope_dims)
        return q2.transpose(1, 2), k2.transpose(1, 2)

    return fn


def liger_rotary(
    batch, seq_len, heads, kv_heads, head_dim, rope_dims, dtype, mode, name: str = "liger"
) -> Provider:
    """Liger's rope over the first rope_dims of each head of q and k (one launch for both)."""
    args = (batch, seq_len, heads, kv_heads, head_dim, rope_dims, dtype, mode)
    return _liger_provider(
        name,
        lambda: _liger_rotary_fn(rope_dims),
        functools.partial(rotary_inputs, *args),
        (0, 1),
        mode,
        lambda fn: rotary_check(fn, *args),
    )


# --- cross_entropy: CE(softcap * tanh(z / softcap), t), mean over rows ---------------------------------


def ce_inputs(rows: int, vocab: int, dtype: torch.dtype, mode: str, seed: int = 0):
    """[logits, targets]: logits at the scale of a trained LM head's (x 8: tanh is far from linear for a
    good share of them), and the loss's gradient (a scalar one) for fwd+bwd."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = _randn((rows, vocab), dtype, gen, scale=8.0)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=gen)
    return [logits, targets], ([torch.ones((), device=DEVICE)] if mode == "fwd+bwd" else None)


def ce_check(
    fn, rows: int, vocab: int, softcap: float, dtype: torch.dtype, mode: str, check_rows: int = CHECK_ROWS
) -> Callable[[], dict]:
    """fn(logits, targets) -> mean loss against kernels.cross_entropy's fp32 reference, on
    min(rows, check_rows) rows."""
    from kernels.cross_entropy import softcapped_cross_entropy_ref

    ref = lambda z, t: softcapped_cross_entropy_ref(z, t, softcap)  # noqa: E731
    make = lambda: ce_inputs(min(rows, check_rows), vocab, dtype, mode, seed=1)  # noqa: E731
    return _check(fn, ref, make, (0,), _names(["loss"], ["logits"], mode), same_dtype=False)


def _liger_ce_fn(softcap: float):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(softcap=softcap, reduction="mean")


def liger_cross_entropy(
    rows: int, vocab: int, softcap: float, dtype, mode: str, name="liger", check_rows=CHECK_ROWS
) -> Provider:
    """LigerCrossEntropyLoss(softcap=softcap) on (rows, vocab) logits of `dtype`."""
    return _liger_provider(
        name,
        lambda: _liger_ce_fn(softcap),
        functools.partial(ce_inputs, rows, vocab, dtype, mode),
        (0,),
        mode,
        lambda fn: ce_check(fn, rows, vocab, softcap, dtype, mode, check_rows),
    )


# --- linear_ce: the LM head z = x @ W^T and the softcapped CE of z, fwd+bwd -----------------------------


def linear_ce_inputs(rows: int, dim: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """[x, w, targets] with W scaled so that the logits have the scale ce_inputs' have (std 8)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = _randn((rows, dim), dtype, gen)
    w = _randn((vocab, dim), dtype, gen, scale=8.0 / dim**0.5)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=gen)
    return [x, w, targets], [torch.ones((), device=DEVICE)]


def linear_ce_ref(x, w, targets, softcap: float):
    from kernels.cross_entropy import softcapped_cross_entropy_ref

    return softcapped_cross_entropy_ref(F.linear(x, w), targets, softcap)


def linear_ce_check(
    fn, rows: int, dim: int, vocab: int, softcap: float, dtype, check_rows: int = CHECK_ROWS
) -> Callable[[], dict]:
    """fn(x, w, targets) -> mean loss (fwd+bwd) against the fp32 matmul and CE, on min(rows, check_rows)."""
    ref = lambda x, w, t: linear_ce_ref(x, w, t, softcap)  # noqa: E731
    make = lambda: linear_ce_inputs(min(rows, check_rows), dim, vocab, dtype, seed=1)  # noqa: E731
    return _check(fn, ref, make, (0, 1), ("loss", "dx", "dw"), same_dtype=False)


def _liger_flce_fn(softcap: float):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(softcap=softcap, reduction="mean")
    return lambda x, w, t: loss(w, x, t)


def liger_fused_linear_cross_entropy(
    rows: int, dim: int, vocab: int, softcap: float, dtype, name="liger_flce", check_rows=CHECK_ROWS
) -> Provider:
    """LigerFusedLinearCrossEntropyLoss(softcap=softcap): x (rows, dim), W (vocab, dim), fwd+bwd."""
    return _liger_provider(
        name,
        lambda: _liger_flce_fn(softcap),
        lambda seed: linear_ce_inputs(rows, dim, vocab, dtype, seed),
        (0, 1),
        "fwd+bwd",
        lambda fn: linear_ce_check(fn, rows, dim, vocab, softcap, dtype, check_rows),
    )
