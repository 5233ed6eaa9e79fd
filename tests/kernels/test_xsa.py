"""Fused XSA (kernels/xsa.py) against autograd of its fp64 reference (DESIGN.md section 4).

Tolerances (relative Frobenius error against fp64 on the same input values):
* fp32: the kernel's math is fp32 dot products over D terms and one update per element, so its error
  is ~sqrt(D) * u32 (u32 = 2^-24 ~ 6e-8; D = 64: ~5e-7); FP32_TOL = 1e-6. Observed ~3e-8 (out, dy)
  and ~1.5e-7 (dv).
* fp16: the outputs are written in fp16, and rounding to nearest moves each element by at most
  u16 = 2^-11 of itself, so the relative error is at most u16 plus the fp32 math: FP16_TOL = 2^-11 + 1e-6,
  a bound, not an estimate (observed ~2.1e-4 ~ u16 / sqrt(3), the mean of a uniform rounding).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kernels import _runtime
from kernels.xsa import exclusive_self_attention, exclusive_self_attention_ref

FP32_TOL = 1e-6
TOL = {torch.float32: FP32_TOL, torch.float16: 2**-11 + FP32_TOL}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(b, t, h, hkv, d, dtype, device):
    y = torch.randn(b, t, h, d, device=device).to(dtype)
    # values of varied length: the normalisation must not be a no-op
    v = (torch.randn(b, t, hkv, d, device=device) * torch.rand(b, t, hkv, 1, device=device) * 3).to(dtype)
    g = torch.randn(b, t, h, d, device=device).to(dtype)
    return y, v, g


def run(fn, y, v, g):
    """(out, dy, dv) of fn on leaves with y's and v's values (and strides). Our launchers' outputs start
    as NaN here (the reference's are not ours to poison), so a finite result proves every element written."""
    y, v = y.detach().requires_grad_(), v.detach().requires_grad_()
    with _runtime.poisoned_outputs():
        out = fn(y, v)
        dy, dv = torch.autograd.grad(out, (y, v), g)
    return out.detach(), dy, dv


def fp64_reference(y, v, g):
    return run(exclusive_self_attention_ref, y.double(), v.double(), g.double())


ours = lambda y, v: exclusive_self_attention(y, v, impl="triton")


def assert_close_to_fp64(got, ref, dtype):
    for name, x, r in zip(("out", "dy", "dv"), got, ref):
        assert x.dtype == dtype and x.shape == r.shape and x.is_contiguous(), name
        assert torch.isfinite(x).all(), f"{name}: an element was not written"
        assert rel_err(x, r) < TOL[dtype], (name, rel_err(x, r))


def assert_compiled_matches_eager(compiled, fn, y, v, g):
    """The compiled graph launches our kernels (forward and backward) and gives fn's results exactly."""
    before = dict(_runtime.launches)
    got = run(compiled, y, v, g)
    assert _runtime.launches["xsa_fwd"] > before.get("xsa_fwd", 0)
    assert _runtime.launches["xsa_bwd"] > before.get("xsa_bwd", 0)
    for x, e in zip(got, run(fn, y, v, g)):
        torch.testing.assert_close(x, e, rtol=0, atol=0)


def check_custom_ops(y, v, g):
    """Schema, fake kernels, autograd registration and AOT dispatch of both ops (opcheck), with a strided
    y, and the fake kernels' outputs under FakeTensorMode: contiguous, the inputs' dtype and device."""
    y = y.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.golfbench.xsa_fwd.default, (y.requires_grad_(), v.requires_grad_()))
    torch.library.opcheck(torch.ops.golfbench.xsa_bwd.default, (g, y.detach(), v.detach()))
    y, v = y.detach(), v.detach()
    with torch._subclasses.FakeTensorMode() as mode:
        fy, fv = mode.from_tensor(y), mode.from_tensor(v)
        out = torch.ops.golfbench.xsa_fwd(fy, fv)
        dy, dv = torch.ops.golfbench.xsa_bwd(out, fy, fv)
    for fake, real in ((out, y), (dy, y), (dv, v)):
        assert fake.shape == real.shape and fake.is_contiguous()
        assert fake.dtype == real.dtype and fake.device == real.device


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the real kernels (TRITON_INTERPRET=1 on CPU, or a Hopper GPU), small shapes.
# The interpreter config takes 16 rows per program: every T below leaves a ragged last program.
# ------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "b,t,h,hkv,d",
    [(1, 77, 8, 4, 64), (2, 45, 4, 4, 16), (2, 19, 8, 2, 64), (3, 11, 6, 2, 16)],
    ids=["B1-record-heads", "no-grouping", "H8-Hkv2", "G3"],
)
def test_kernel_matches_fp64(kernel_device, dtype, b, t, h, hkv, d):
    y, v, g = make_inputs(b, t, h, hkv, d, dtype, kernel_device)
    before = dict(_runtime.launches)
    got = run(ours, y, v, g)
    assert _runtime.launches["xsa_fwd"] == before.get("xsa_fwd", 0) + 1
    assert _runtime.launches["xsa_bwd"] == before.get("xsa_bwd", 0) + 1
    assert_close_to_fp64(got, fp64_reference(y, v, g), dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_takes_any_strides(kernel_device, dtype):
    """y as an attention backend returns it ((B, H, T, D) memory seen as (B, T, H, D)), v and the
    incoming gradient as strided views (v every other element of D; the gradient transposed, then
    expanded from a scalar): read in place, outputs contiguous."""
    b, t, h, hkv, d = 2, 37, 8, 2, 16
    y = torch.randn(b, h, t, d, device=kernel_device).to(dtype).transpose(1, 2)
    v = torch.randn(b, t, hkv, 2 * d, device=kernel_device).to(dtype)[..., ::2]
    g = torch.randn(t, b, h, d, device=kernel_device).to(dtype).transpose(0, 1)
    assert not (y.is_contiguous() or v.is_contiguous() or g.is_contiguous())
    assert_close_to_fp64(run(ours, y, v, g), fp64_reference(y, v, g), dtype)
    g = torch.randn((), device=kernel_device).to(dtype).expand(b, t, h, d)  # as from out.sum(): strides 0
    assert_close_to_fp64(run(ours, y, v, g), fp64_reference(y, v, g), dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_zero_and_clamped_norms(kernel_device, dtype):
    """||v|| = 0 and 0 < ||v|| < eps: F.normalize divides by eps there, and its clamp passes no gradient
    to the norm, so dv = d(vn) / eps with no radial term (fp16 cannot hold norms below eps, only 0)."""
    b, t, h, hkv, d = 1, 40, 4, 2, 16
    y, v, g = make_inputs(b, t, h, hkv, d, torch.float32, kernel_device)
    zero = torch.zeros(b, t, hkv, dtype=torch.bool, device=kernel_device)
    zero[0, [3, 17, 39], [0, 1, 1]] = True
    tiny = torch.zeros_like(zero)
    if dtype == torch.float32:
        tiny[0, [5, 18, 30], [1, 0, 1]] = True
    v = torch.where(zero[..., None], 0.0, torch.where(tiny[..., None], v * 3e-14, v))
    y, v, g = y.to(dtype), v.to(dtype), g.to(dtype)
    out, dy, dv = run(ours, y, v, g)
    ref = fp64_reference(y, v, g)

    zero_h = zero.repeat_interleave(h // hkv, dim=2)
    assert torch.equal(out[zero_h], y[zero_h]) and torch.equal(dy[zero_h], g[zero_h])
    assert (dv[zero] == 0).all() and (ref[2][zero] == 0).all()
    normal = ~(zero | tiny)
    assert_close_to_fp64((out, dy, dv[normal]), (ref[0], ref[1], ref[2][normal]), dtype)
    if dtype == torch.float32:  # dv ~ 1e12 here: its own relative error, not drowned in the others
        assert torch.isfinite(dv).all() and rel_err(dv[tiny], ref[2][tiny]) < FP32_TOL
        # the radial term the unclamped branch removes would be wrong here by ~|vn|^2 (|vn| ~ 0.1)
        vn = F.normalize(v.double(), dim=-1)[tiny]
        radial = ref[2][tiny] - (ref[2][tiny] * vn).sum(-1, keepdim=True) * vn
        assert rel_err(radial, ref[2][tiny]) > 100 * FP32_TOL


@pytest.mark.interpreter
def test_compile_fullgraph(kernel_device):
    """The custom ops trace with no graph break, forward and backward (aot_eager keeps CPU CI fast)."""
    y, v, g = make_inputs(2, 21, 8, 4, 16, torch.float32, kernel_device)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    assert_compiled_matches_eager(torch.compile(ours, fullgraph=True, backend=backend), ours, y, v, g)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(kernel_device):
    check_custom_ops(*make_inputs(1, 9, 4, 2, 16, torch.float32, kernel_device))


# ------------------------------------------------------------------------------------------------
# CPU tier: the reference, dispatch and the argument checks
# ------------------------------------------------------------------------------------------------


def test_reference_is_per_head_projection():
    """The grouped reference against a per-head loop: head h uses kv head h // (H / Hkv)."""
    b, t, h, hkv, d = 2, 5, 6, 3, 8
    y, v, _ = make_inputs(b, t, h, hkv, d, torch.float64, "cpu")
    expected = torch.empty_like(y)
    for head in range(h):
        vh = v[:, :, head // (h // hkv)]
        vn = vh / vh.norm(dim=-1, keepdim=True)
        yh = y[:, :, head]
        expected[:, :, head] = yh - (yh * vn).sum(-1, keepdim=True) * vn
    got = exclusive_self_attention_ref(y, v)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    assert (got * F.normalize(v, dim=-1).repeat_interleave(h // hkv, dim=2)).sum(-1).abs().max() < 1e-12


def test_torch_impl_is_the_reference_and_contiguous():
    y, v, _ = make_inputs(2, 7, 4, 2, 8, torch.bfloat16, "cpu")
    y = y.transpose(1, 2).contiguous().transpose(1, 2)
    got = exclusive_self_attention(y, v, impl="torch")
    assert got.is_contiguous() and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, exclusive_self_attention_ref(y, v), rtol=0, atol=0)


def test_compile_fullgraph_reference_path():
    """impl="torch" inside a compiled graph: the dispatch (validation, blockers) traces without a break."""
    y, v, g = make_inputs(2, 9, 4, 2, 8, torch.float32, "cpu")
    fn = lambda y, v: exclusive_self_attention(y, v, impl="torch")
    got = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), y, v, g)
    for x, e in zip(got, run(exclusive_self_attention_ref, y, v, g)):
        torch.testing.assert_close(x, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(y=torch.randn(2, 3, 4)), "y must be a 4-D"),
        (dict(v=torch.randn(2, 3, 2)), "v must be a 4-D"),
        (dict(y=torch.randint(0, 5, (2, 3, 4, 8))), "y must be floating-point"),
        (dict(v=torch.randint(0, 5, (2, 3, 2, 8))), "v must be floating-point"),
        (dict(y=torch.randn(2, 0, 4, 8), v=torch.randn(2, 0, 2, 8)), "y must not be empty"),
        (dict(v=torch.randn(2, 4, 2, 8)), r"v must have shape \(B, T, Hkv, D\) = \(2, 3, Hkv, 8\)"),
        (dict(v=torch.randn(2, 3, 2, 16)), r"v must have shape \(B, T, Hkv, D\)"),
        (dict(v=torch.randn(2, 3, 3, 8)), "H = y.shape.2. = 4 is not a multiple of Hkv = v.shape.2. = 3"),
        (dict(v=torch.randn(2, 3, 0, 8)), "is not a multiple of Hkv"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(y=torch.randn(2, 3, 4, 8), v=torch.randn(2, 3, 2, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        exclusive_self_attention(**args)


F32 = torch.float32


@pytest.mark.parametrize(
    "y_shape,v_shape,dtypes,match",
    [
        ((2, 3, 4, 48), (2, 3, 2, 48), (F32, F32), "D = y.shape.-1. = 48 is not a power"),
        ((1, 3, 2, 512), (1, 3, 1, 512), (F32, F32), "D = y.shape.-1. = 512 is above 256"),
        ((2, 3, 4, 8), (2, 3, 2, 8), (torch.float64, torch.float64), "y dtype torch.float64 is not one of"),
        ((2, 3, 4, 8), (2, 3, 2, 8), (torch.float16, F32), "v dtype torch.float32 differs"),
    ],
)
def test_forced_triton_on_impossible_input_names_the_argument(y_shape, v_shape, dtypes, match):
    y, v = torch.randn(y_shape, dtype=dtypes[0]), torch.randn(v_shape, dtype=dtypes[1])
    with pytest.raises(ValueError, match="impl='triton' cannot run: " + match):
        exclusive_self_attention(y, v, impl="triton")
    # auto takes the reference for the same input
    got = exclusive_self_attention(y, v)
    torch.testing.assert_close(got, exclusive_self_attention_ref(y, v).contiguous(), rtol=0, atol=0)


def test_auto_falls_back_with_reason_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no kernel
    monkeypatch.setattr(_runtime, "_logged", set())
    y, v, _ = make_inputs(2, 5, 4, 2, 8, torch.float32, "cpu")
    before = _runtime.launches["xsa_fwd"]
    with caplog.at_level(logging.INFO, logger="golfbench.kernels"):
        for _ in range(2):
            got = exclusive_self_attention(y, v)
    assert _runtime.launches["xsa_fwd"] == before
    torch.testing.assert_close(got, exclusive_self_attention_ref(y, v), rtol=0, atol=0)
    msgs = [r.getMessage() for r in caplog.records if "exclusive_self_attention" in r.getMessage()]
    assert len(msgs) == 1 and "TRITON_INTERPRET" in msgs[0]
    with pytest.raises(ValueError, match="impl='triton' cannot run: y: tensors are on the CPU"):
        exclusive_self_attention(y, v, impl="triton")


# ------------------------------------------------------------------------------------------------
# GPU tier: bf16 at the record shape (48 x 2048 tokens, 8 query / 4 kv heads of 64)
# ------------------------------------------------------------------------------------------------

RECORD = (48, 2048, 8, 4, 64)


def _hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Triton path is for Hopper")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "bhtd"])
def test_gpu_bf16_record_shape(layout):
    """Error against fp32 math on the same bf16 values <= 2x that of the reference run op by op in bf16."""
    _hopper()
    b, t, h, hkv, d = RECORD
    y, v, g = make_inputs(b, t, h, hkv, d, torch.bfloat16, "cuda")
    if layout == "bhtd":  # what an attention backend may return: (B, H, T, D) memory
        y = y.transpose(1, 2).contiguous().transpose(1, 2)
    got = run(ours, y, v, g)
    ref = run(exclusive_self_attention_ref, y.float(), v.float(), g.float())
    bf16 = run(exclusive_self_attention_ref, y, v, g)
    report = []
    for name, x, r, x_bf in zip(("out", "dy", "dv"), got, ref, bf16):
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and torch.isfinite(x).all(), name
        err, bf_err = rel_err(x, r), rel_err(x_bf, r)
        report.append(f"{name} {err:.2e} (bf16 torch {bf_err:.2e})")
        assert err <= 4e-3 and err <= 2 * bf_err, (name, err, bf_err)
    print(f"\n{layout}: " + ", ".join(report))


@pytest.mark.gpu
def test_gpu_compiled_fullgraph_inductor():
    _hopper()
    y, v, g = make_inputs(8, 2048, 8, 4, 64, torch.bfloat16, "cuda")
    fn = lambda y, v: exclusive_self_attention(y * 1.0, v)  # auto = the kernel on Hopper, inside a graph
    assert_compiled_matches_eager(torch.compile(fn, fullgraph=True), fn, y, v, g)


@pytest.mark.gpu
def test_gpu_custom_ops_pass_opcheck():
    _hopper()
    check_custom_ops(*make_inputs(2, 100, 8, 4, 64, torch.bfloat16, "cuda"))
