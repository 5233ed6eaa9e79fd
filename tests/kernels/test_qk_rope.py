"""Fused q/k RMSNorm + partial RoPE + gain against fp64 references (interpreter tier) and bf16 math (GPU).

Tolerances: every output element is a 64-term fp32 reduction, one fp32 rsqrt and a few products, so
fp32 lands at ~1e-7 relative (1e-6 with margin) against fp64; fp16 outputs are one rounding of fp16
(half-ULP 2^-11 ~ 4.9e-4 at most, smaller in RMS): 1e-3. The gain's gradient is an fp32 sum over
B*T*D terms of fp32 products of rounded inputs: 1e-5 for fp32 and the fp16 input rounding for fp16.
"""

from __future__ import annotations

import logging

import pytest
import torch

from kernels import _runtime
from kernels.qk_rope import qk_norm_rope, qk_norm_rope_ref

TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tables(rows: int, pairs: int, device, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float32, device=device) / (2 * pairs))
    angles = torch.outer(torch.arange(rows, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def run(fn, x, cos, sin, gain, grad_out):
    """Output and gradients (x, gain) of fn on fresh leaves."""
    xx = x.detach().clone().requires_grad_()
    gg = None if gain is None else gain.detach().clone().requires_grad_()
    out = fn(xx, cos, sin, gg)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), xx.grad, None if gg is None else gg.grad


def fp64(x, cos, sin, gain, grad_out):
    return run(qk_norm_rope_ref, x.double(), cos.double(), sin.double(),
               None if gain is None else gain.double(), grad_out.double())  # fmt: skip


@pytest.fixture
def poisoned_outputs():
    with _runtime.poisoned_outputs():
        yield


# ------------------------------------------------------------------------------------------------
# Interpreter tier
# ------------------------------------------------------------------------------------------------

SHAPES = [  # (B, T, H, D, P): batch 1, ragged rows, k's heads without gain, full rotation, small D
    (1, 5, 8, 64, 8),
    (2, 13, 4, 64, 8),
    (3, 7, 2, 16, 8),
    (2, 9, 3, 32, 4),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_gain", [True, False], ids=["q", "k"])
def test_kernel_matches_fp64(kernel_device, poisoned_outputs, dtype, shape, with_gain):
    b, t, h, d, p = shape
    x = torch.randn(b, t, h, d, device=kernel_device).to(dtype) * 3
    cos, sin = tables(t + 4, p, kernel_device)  # longer tables than T: only the first T rows are read
    gain = torch.rand(h, device=kernel_device) + 4.5 if with_gain else None
    grad_out = torch.randn(b, t, h, d, device=kernel_device)
    out, dx, dgain = run(lambda *a: qk_norm_rope(*a, impl="triton"), x, cos, sin, gain, grad_out)
    ref, ref_dx, ref_dgain = fp64(x, cos, sin, gain, grad_out)
    assert out.dtype == dtype and out.is_contiguous() and not out.isnan().any() and not dx.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(dx, ref_dx) < TOL[dtype]
    if with_gain:
        assert rel_err(dgain, ref_dgain) < (1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.interpreter
def test_strided_input_and_tiny_rows(kernel_device, poisoned_outputs):
    """A head slice of a wider tensor (strides of a fused projection) and rows of tiny norm."""
    b, t, h, d, p = 2, 6, 4, 64, 8
    wide = torch.randn(b, t, h + 2, d, device=kernel_device)
    x = wide[:, :, 1 : h + 1]
    x[0, 0, 0] *= 1e-20  # r is large but finite: eps keeps rsqrt bounded
    assert not x.is_contiguous()
    cos, sin = tables(t, p, kernel_device)
    gain = torch.rand(h, device=kernel_device) + 1
    grad_out = torch.randn(b, t, h, d, device=kernel_device)
    ours = run(lambda *a: qk_norm_rope(*a, impl="triton"), x, cos, sin, gain, grad_out)
    # fp32 math, not fp64: F.rms_norm's eps follows the dtype (fp64's 2e-16 would not bound the tiny row)
    ref = run(qk_norm_rope_ref, x, cos, sin, gain, grad_out)
    for a, r in zip(ours, ref):
        assert torch.isfinite(a).all() and rel_err(a, r) < 1e-5


@pytest.mark.interpreter
def test_reference_is_the_models_op_by_op_math(kernel_device):
    """impl="torch" keeps today's numbers: rms_norm, rotary with tables cast to the dtype, gain cast."""
    import torch.nn.functional as F

    x = torch.randn(2, 5, 4, 16, device=kernel_device).to(torch.float16)
    cos, sin = tables(5, 4, kernel_device)
    gain = torch.rand(4, device=kernel_device)
    xn = F.rms_norm(x, (16,))
    c, s = cos[None, :, None, :].half(), sin[None, :, None, :].half()
    x1, x2, rest = xn[..., :4], xn[..., 4:8], xn[..., 8:]
    expect = torch.cat((x1 * c + x2 * s, x1 * (-s) + x2 * c, rest), -1) * gain.half()[None, None, :, None]
    assert torch.equal(qk_norm_rope(x, cos, sin, gain, impl="torch"), expect)


# ------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    x = torch.randn(2, 5, 4, 16)
    cos, sin = tables(5, 4, "cpu")
    with pytest.raises(ValueError, match="impl"):
        qk_norm_rope(x, cos, sin, impl="cuda")
    with pytest.raises(ValueError, match=r"x must be a floating \(B, T, H, D\)"):
        qk_norm_rope(x[0], cos, sin)
    with pytest.raises(ValueError, match="need >= T = 5 rows"):
        qk_norm_rope(x, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="0 < 2P <= D"):
        qk_norm_rope(x, *tables(5, 9, "cpu"))
    with pytest.raises(ValueError, match="differ"):
        qk_norm_rope(x, cos, sin[:, :2])
    with pytest.raises(ValueError, match=r"gain must have shape \(H,\) = \(4,\)"):
        qk_norm_rope(x, cos, sin, torch.ones(3))


def test_auto_falls_back_with_the_reason_and_triton_refuses(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no Triton here
    x = torch.randn(2, 5, 4, 16)
    cos, sin = tables(5, 4, "cpu")
    with caplog.at_level(logging.INFO, logger="golfbench.kernels"):
        out = qk_norm_rope(x, cos, sin, impl="auto")
    assert torch.equal(out, qk_norm_rope_ref(x, cos, sin))
    assert any("qk_norm_rope: using the PyTorch reference" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="impl='triton' cannot run: x: tensors are on the CPU"):
        qk_norm_rope(x, cos, sin, impl="triton")
    with pytest.raises(ValueError, match="last dim"):  # a layout the kernel refuses is named, when forced
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        qk_norm_rope(x.transpose(2, 3).contiguous().transpose(2, 3), cos, sin, impl="triton")


@pytest.mark.interpreter
def test_compiled_fullgraph_through_the_custom_op(kernel_device):
    x = torch.randn(2, 7, 4, 16, device=kernel_device, requires_grad=True)
    cos, sin = tables(7, 4, kernel_device)
    gain = torch.rand(4, device=kernel_device, requires_grad=True)
    w = torch.randn(2, 7, 4, 16, device=kernel_device)  # a projection: a norm-invariant loss has dx ~ 0
    fn = torch.compile(lambda a, g: (qk_norm_rope(a, cos, sin, g, impl="triton") * w).sum(),
                       fullgraph=True, backend="aot_eager")  # fmt: skip
    fn(x, gain).backward()
    ref_x, ref_g = x.detach().clone().requires_grad_(), gain.detach().clone().requires_grad_()
    (qk_norm_rope_ref(ref_x, cos, sin, ref_g) * w).sum().backward()
    assert rel_err(x.grad, ref_x.grad) < 1e-5 and rel_err(gain.grad, ref_g.grad) < 1e-5


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck(kernel_device):
    x = torch.randn(2, 3, 4, 16, device=kernel_device)
    cos, sin = tables(3, 4, kernel_device)
    gain = torch.rand(4, device=kernel_device)
    torch.library.opcheck(torch.ops.golfbench.qk_norm_rope_fwd, (x, cos, sin, gain),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    torch.library.opcheck(torch.ops.golfbench.qk_norm_rope_bwd, (torch.randn_like(x), x, cos, sin, None),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# GPU tier: bf16 at the record's q shape, compiled
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("heads,with_gain", [(8, True), (4, False)], ids=["q", "k"])
def test_record_shape_bf16_within_twice_the_bf16_math(heads, with_gain):
    dev = torch.device("cuda")
    x = torch.randn(48, 2048, heads, 64, device=dev).to(torch.bfloat16)
    cos, sin = tables(2048, 8, dev)
    gain = torch.rand(heads, device=dev) + 4.5 if with_gain else None
    grad_out = torch.randn_like(x, dtype=torch.float32)
    with _runtime.poisoned_outputs():
        ours = run(lambda *a: qk_norm_rope(*a, impl="triton"), x, cos, sin, gain, grad_out)
    same = run(qk_norm_rope_ref, x, cos, sin, gain, grad_out)
    ref = run(qk_norm_rope_ref, x.float(), cos, sin, gain, grad_out)
    for a, s, r in zip(ours, same, ref):
        if r is not None:
            assert not a.isnan().any() and rel_err(a, r) <= 2 * rel_err(s, r) + 1e-6
    compiled = torch.compile(lambda a, g: qk_norm_rope(a, cos, sin, g), fullgraph=True, dynamic=False)
    xx = x.detach().requires_grad_()
    out = compiled(xx, gain)
    (dx,) = torch.autograd.grad(out, xx, grad_out.to(out.dtype))
    assert rel_err(out, ref[0]) <= 2 * rel_err(same[0], ref[0]) + 1e-6
    assert rel_err(dx, ref[1]) <= 2 * rel_err(same[1], ref[1]) + 1e-6
