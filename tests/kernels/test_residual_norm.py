"""Fused residual mix + RMSNorm against its reference (DESIGN.md section 4).

Tolerances: the kernels compute in fp32 and round each output once to the inputs' dtype. fp32 runs are
held to fp32 accuracy against fp64 (sums of at most D terms per row and M terms per weight gradient:
well under 1e-5); fp16 outputs and input gradients carry one fp16 rounding (2^-11 ~ 4.9e-4 relative,
less in the Frobenius mean), and n and the gradients also see h's rounding, which the fp64 oracle
does not have: 1e-3. The weight gradients are fp32 sums of exact fp16 products: well under 1e-3.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kernels import _runtime
from kernels.residual_norm import residual_rms_norm, residual_rms_norm_ref

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}
SCALE = 0.5773502691896258  # the record's ln_scale_factor of layer 2, 1 / sqrt(3)

# Which inputs carry a weight: every arrangement the lead may build the block from.
ARRANGEMENTS = {
    "x": (False,),
    "wx": (True,),
    "entry": (True, True),  # resid_mix[0] * x + resid_mix[1] * x0
    "mid": (False, True),  # x_in + attn_scale * a
    "sum": (False, False),
    "w-none-w": (True, False, True),
    "three": (True, True, True),
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(shape, pattern, dtype, device):
    d = shape[-1]
    xs = [torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in pattern]
    ws = [(torch.rand(d, device=device) + 0.5).requires_grad_() if has else None for has in pattern]
    return xs, ws


def leaves(xs, ws):
    return [t for t in (*xs, *ws) if t is not None and t.requires_grad]


def outputs_and_grads(fn, xs, ws, used, grad_outs):
    """(h, n, grads of every leaf) with only the outputs in `used` ("h", "n") reaching the loss."""
    h, n = fn(xs, ws)
    outs = [o for o, name in ((h, "h"), (n, "n")) if name in used]
    gos = [g for g, name in zip(grad_outs, ("h", "n")) if name in used]
    return h.detach(), n.detach(), torch.autograd.grad(outs, leaves(xs, ws), gos)


def fp64_leaves(xs, ws):
    as64 = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    return [as64(x) for x in xs], [as64(w) for w in ws]


def check_against_fp64(xs, ws, dtype, used=("h", "n"), scale=SCALE, grad_outs=None):
    """Runs the kernel (forced) with every output buffer poisoned (NaN) and the fp64 reference; asserts
    every output and gradient is written and within TOL[dtype]. Returns the kernel's (h, n, grads)."""
    if grad_outs is None:
        grad_outs = (torch.randn_like(xs[0]), torch.randn_like(xs[0]))
    ours = lambda a, b: residual_rms_norm(a, b, scale, impl="triton")
    with _runtime.poisoned_outputs():
        h, n, grads = outputs_and_grads(ours, xs, ws, used, grad_outs)
    ref = lambda a, b: residual_rms_norm_ref(a, b, scale)
    xd, wd = fp64_leaves(xs, ws)
    gos64 = tuple(g.double() if isinstance(g, torch.Tensor) else g for g in grad_outs)
    h_ref, n_ref, grads_ref = outputs_and_grads(ref, xd, wd, used, gos64)

    assert h.shape == n.shape == xs[0].shape and h.dtype == n.dtype == dtype
    assert torch.isfinite(h).all() and torch.isfinite(n).all(), "an output element was not written"
    assert rel_err(h, h_ref) < TOL[dtype] and rel_err(n, n_ref) < TOL[dtype]
    for i, (g, g_ref, leaf) in enumerate(zip(grads, grads_ref, leaves(xs, ws))):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, i
        assert torch.isfinite(g).all(), f"gradient {i} was not fully written"
        assert rel_err(g, g_ref) < TOL[dtype], (i, rel_err(g, g_ref))
    return h, n, grads


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the real kernels (TRITON_INTERPRET=1 on CPU, or a Hopper GPU), small shapes.
# Under the interpreter a tile is 8 rows and a backward program 3 tiles: 77 rows make 4 backward
# programs, the last with a tile of 5 rows and two tiles past the end.
# ------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
def test_kernel_matches_fp64(kernel_device, dtype, arrangement):
    xs, ws = make_inputs((7, 11, 64), ARRANGEMENTS[arrangement], dtype, kernel_device)
    before = dict(_runtime.launches)
    check_against_fp64(xs, ws, dtype)
    for name in ("resnorm_fwd", "resnorm_bwd"):
        assert _runtime.launches[name] == before.get(name, 0) + 1


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("arrangement", ["entry", "mid", "three"])
def test_kernel_record_width(kernel_device, dtype, arrangement):
    xs, ws = make_inputs((77, 512), ARRANGEMENTS[arrangement], dtype, kernel_device)
    check_against_fp64(xs, ws, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("arrangement", ["entry", "mid", "three"])
@pytest.mark.parametrize("used", [("h",), ("n",)], ids=["dn-unused", "dh-unused"])
def test_kernel_one_output_unused(kernel_device, arrangement, used):
    xs, ws = make_inputs((77, 64), ARRANGEMENTS[arrangement], torch.float32, kernel_device)
    check_against_fp64(xs, ws, torch.float32, used=used)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 512), (5, 100)], ids=["one-row", "batch-1", "D=100"])
def test_kernel_small_and_ragged_shapes(kernel_device, shape):
    xs, ws = make_inputs(shape, ARRANGEMENTS["entry"], torch.float32, kernel_device)
    check_against_fp64(xs, ws, torch.float32)


@pytest.mark.interpreter
def test_kernel_rows_of_tiny_and_huge_norm(kernel_device):
    """eps dominates the rows of tiny norm (mean h^2 ~ 1e-10 < eps ~ 1.2e-7) and one row is all zeros:
    the kernel must use fp32's eps as F.rms_norm(eps=None) does; other rows are 1e3 times larger."""
    xs, ws = make_inputs((40, 64), ARRANGEMENTS["mid"], torch.float32, kernel_device)
    with torch.no_grad():
        for x in xs:
            x[:10] *= 1e-5
            x[10] = 0.0
            x[11:20] *= 1e3
    h, n, _ = check_against_fp64(xs, ws, torch.float32)
    h_ref, n_ref = residual_rms_norm_ref(*fp64_leaves(xs, ws), SCALE)
    assert rel_err(n[:10], n_ref[:10]) < TOL[torch.float32]  # not hidden by the larger rows
    assert (n[10] == 0).all() and (h[10] == 0).all()
    assert n[:10].abs().max() < 0.1 * n[20:].abs().max()  # eps really is in play


@pytest.mark.interpreter
def test_kernel_strided_inputs_and_expanded_grad(kernel_device):
    """A row-strided view (last dim contiguous), non-mergeable leading dims, and loss = h.sum() (an
    expanded, stride-0 gradient for h)."""
    d = 64
    base = torch.randn(30, 2 * d, device=kernel_device)
    x = base[:, :d].requires_grad_()  # a leaf with row stride 2D
    y = torch.randn(6, 5, d, device=kernel_device).transpose(0, 1).reshape(30, d).requires_grad_()
    w = (torch.rand(d, device=kernel_device) + 0.5).requires_grad_()
    assert x.stride() == (2 * d, 1)
    xs, ws = [x, y], [None, w]
    check_against_fp64(
        xs,
        ws,
        torch.float32,
        grad_outs=(
            torch.ones((), device=kernel_device).expand(30, d),
            torch.randn(30, d, device=kernel_device),
        ),
    )
    t = torch.randn(5, 6, d, device=kernel_device).transpose(0, 1)  # (6, 5, D), not viewable as rows
    w2 = (torch.rand(d, device=kernel_device) + 0.5).requires_grad_()
    xs, ws = [t.requires_grad_(), torch.randn(6, 5, d, device=kernel_device).requires_grad_()], [w, w2]
    check_against_fp64(xs, ws, torch.float32)


@pytest.mark.interpreter
def test_kernel_only_some_leaves_need_gradients(kernel_device):
    """An input without requires_grad gets no dx; a weight without it gets no dw (and then h is
    saved instead of recomputed)."""
    xs, ws = make_inputs((77, 64), ARRANGEMENTS["three"], torch.float32, kernel_device)
    xs[1].requires_grad_(False)
    ws[2].requires_grad_(False)
    _, _, grads = check_against_fp64(xs, ws, torch.float32)
    assert len(grads) == 4  # x0, x2, w0, w1


@pytest.mark.interpreter
def test_compile_fullgraph(kernel_device):
    """Both custom ops trace with no graph break, in a block-like chain (aot_eager keeps CPU CI fast)."""
    d = 64
    x, x0 = (torch.randn(3, 7, d, device=kernel_device, requires_grad=True) for _ in range(2))
    mix = torch.rand(2, d, device=kernel_device, requires_grad=True)
    gain = torch.rand(d, device=kernel_device, requires_grad=True)
    w = torch.randn(d, d, device=kernel_device) / d**0.5

    def block(x, x0, mix, gain):
        x_in, n = residual_rms_norm((x, x0), (mix[0], mix[1]), SCALE, impl="triton")
        x_mid, n2 = residual_rms_norm((x_in, n @ w), (None, gain), SCALE, impl="triton")
        return x_mid + n2.square()

    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    g = torch.randn(3, 7, d, device=kernel_device)
    args = (x, x0, mix, gain)
    out_c = compiled(*args)
    grads_c = torch.autograd.grad(out_c, args, g)
    out_e = block(*args)
    grads_e = torch.autograd.grad(out_e, args, g)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_opcheck(kernel_device):
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops."""
    d, m, dev = 64, 10, kernel_device
    x, a = (torch.randn(m, d, device=dev, requires_grad=True) for _ in range(2))
    w = torch.rand(d, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.golfbench.resnorm_fwd.default, (x, a, None, None, w, None, SCALE))
    torch.library.opcheck(torch.ops.golfbench.resnorm_fwd.default, (x, a, a, w, None, w, SCALE))
    g, rstd = torch.randn(m, d, device=dev), torch.rand(m, device=dev) + 0.5
    args = (g, g, x.detach(), None, a.detach(), None, None, w.detach(), None, rstd, SCALE, 2)
    torch.library.opcheck(torch.ops.golfbench.resnorm_bwd.default, (*args, [True, True], [False, True]))
    torch.library.opcheck(torch.ops.golfbench.resnorm_bwd.default, (*args, [False, True], [False, False]))


# ------------------------------------------------------------------------------------------------
# CPU tier: the reference and the argument checks
# ------------------------------------------------------------------------------------------------


def test_reference_is_the_models_op_by_op_math():
    d = 512
    x, x0, a = (torch.randn(4, 9, d).bfloat16() for _ in range(3))
    resid_mix, attn_scale = torch.rand(2, d) + 0.5, torch.rand(d) + 0.5
    mix = resid_mix.to(x.dtype)  # model/gpt.py Block.attn_residual
    x_in = mix[0] * x + mix[1] * x0
    x_n = F.rms_norm(x_in, (d,)) * SCALE
    x_mid = x_in + attn_scale.to(x.dtype) * a
    h, n = residual_rms_norm((x, x0), (resid_mix[0], resid_mix[1]), SCALE, impl="torch")
    assert torch.equal(h, x_in) and torch.equal(n, x_n) and h.dtype == torch.bfloat16
    h, n = residual_rms_norm((x_in, a), (None, attn_scale), SCALE, impl="torch")
    assert torch.equal(h, x_mid) and torch.equal(n, F.rms_norm(x_mid, (d,)) * SCALE)


def test_reference_uses_fp32_eps_in_fp64():
    """The fp64 oracle of the tests must not switch to fp64's eps (F.rms_norm's eps=None would)."""
    x = torch.full((1, 8), 1e-5, dtype=torch.float64)
    _, n = residual_rms_norm_ref((x,), (None,), 1.0)
    expected = x / torch.sqrt(x.square().mean() + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(n, expected, rtol=1e-12, atol=0)


D = 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(inputs=torch.randn(4, D)), "inputs must be a tuple of 1 to 3 tensors"),
        (dict(inputs=(), weights=()), "inputs must be a tuple of 1 to 3 tensors, got 0"),
        (dict(inputs=(torch.randn(4, D),) * 4, weights=(None,) * 4), "got 4"),
        (dict(inputs=(torch.randn(4, D), torch.randn(4, D + 1))), r"inputs\[1\] is .* all inputs must match"),
        (dict(inputs=(torch.randn(4, D), torch.randn(5, D))), r"inputs\[1\]"),
        (dict(inputs=(torch.randn(4, D), torch.randn(4, D).half())), r"inputs\[1\] is torch.float16"),
        (dict(inputs=(torch.randn(4, D), torch.ones(4, D).long())), r"inputs\[1\] must be a float"),
        (dict(inputs=(torch.tensor(1.0), torch.tensor(2.0))), r"inputs\[0\] must be a floating-point tensor"),
        (dict(inputs=(torch.randn(4, 0), torch.randn(4, 0)), weights=(None, None)), "empty last dim"),
        (dict(weights=(None,)), r"weights must have one entry .* per input \(2\), got 1 entries"),
        (dict(weights=torch.ones(2, D)), "weights must have one entry"),
        (dict(weights=(torch.ones(D + 1), None)), r"weights\[0\] must be None or a float32 \(D,\) = \(8,\)"),
        (dict(weights=(None, torch.ones(D).half())), r"weights\[1\] .* got torch.float16"),
        (dict(weights=(None, torch.ones(1, D))), r"weights\[1\]"),
        (dict(weights=(None, 1.0)), r"weights\[1\] .* got float"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(scale="1"), "scale"),
        (dict(scale=True), "scale"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(inputs=(torch.randn(4, D), torch.randn(4, D)), weights=(torch.ones(D), None), scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        residual_rms_norm(**args)


def test_forced_triton_on_impossible_input_names_the_argument():
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"inputs\[1\] must be contiguous along the last dim"):
        residual_rms_norm((x, torch.randn(D, 4).t()), (None, None), 1.0, impl="triton")
    with pytest.raises(ValueError, match="inputs dtype torch.float64"):
        residual_rms_norm((x.double(),), (None,), 1.0, impl="triton")
    with pytest.raises(ValueError, match=r"D = inputs\[0\].shape\[-1\] = 8193"):
        residual_rms_norm((torch.randn(2, 8193),), (None,), 1.0, impl="triton")


def test_auto_falls_back_with_reason_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no kernel
    monkeypatch.setattr(_runtime, "_logged", set())
    xs, ws = make_inputs((5, D), ARRANGEMENTS["entry"], torch.float32, "cpu")
    with caplog.at_level(logging.INFO, logger="golfbench.kernels"):
        for _ in range(2):
            got = residual_rms_norm(xs, ws, SCALE)
    for a, b in zip(got, residual_rms_norm_ref(xs, ws, SCALE)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    msgs = [r.getMessage() for r in caplog.records if "residual_rms_norm" in r.getMessage()]
    assert len(msgs) == 1 and "TRITON_INTERPRET" in msgs[0]
    with pytest.raises(ValueError, match="impl='triton' cannot run: inputs"):
        residual_rms_norm(xs, ws, SCALE, impl="triton")


# ------------------------------------------------------------------------------------------------
# GPU tier: bf16 at the record shape (48 x 2048 tokens, D = 512)
# ------------------------------------------------------------------------------------------------

RECORD_SHAPE = (48, 2048, 512)


def _hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Triton path is for Hopper")


@pytest.mark.gpu
@pytest.mark.parametrize("arrangement", ["entry", "mid", "three"])
def test_gpu_bf16_record_shape(arrangement):
    """Every output and gradient within 2x the error of the op-by-op bf16 math (and below 1e-2)."""
    _hopper()
    xs, ws = make_inputs(RECORD_SHAPE, ARRANGEMENTS[arrangement], torch.bfloat16, "cuda")
    grad_outs = (torch.randn_like(xs[0]), torch.randn_like(xs[0]))
    ours = lambda a, b: residual_rms_norm(a, b, SCALE, impl="triton")
    bf16 = lambda a, b: residual_rms_norm_ref(a, b, SCALE)
    fp64 = lambda a, b: residual_rms_norm_ref(a, b, SCALE)
    used = ("h", "n")
    h, n, grads = outputs_and_grads(ours, xs, ws, used, grad_outs)
    bh, bn, bgrads = outputs_and_grads(bf16, xs, ws, used, grad_outs)
    xd, wd = fp64_leaves(xs, ws)
    rh, rn, rgrads = outputs_and_grads(fp64, xd, wd, used, tuple(g.double() for g in grad_outs))

    names = ["h", "n"] + [f"d{t}" for t in ("x0", "x1", "x2")[: len(xs)]]
    names += [f"dw{i}" for i, w in enumerate(ws) if w is not None]
    report = []
    for name, a, b, r in zip(names, (h, n, *grads), (bh, bn, *bgrads), (rh, rn, *rgrads)):
        assert torch.isfinite(a).all(), name
        err, bf_err = rel_err(a, r), rel_err(b, r)
        report.append(f"{name} {err:.2e} (bf16 torch {bf_err:.2e})")
        assert err <= 1e-2 and err <= 2 * bf_err, (name, err, bf_err)
    print(f"\n{arrangement}: " + ", ".join(report))


@pytest.mark.gpu
def test_gpu_compiled_fullgraph_inductor():
    """A block-like chain of both arrangements under inductor: the same numbers as eager, and the
    kernels really ran (the launch counters moved)."""
    _hopper()
    d = RECORD_SHAPE[-1]
    x, x0 = (torch.randn(4, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "ab")
    mix = (torch.rand(2, d, device="cuda") + 0.5).requires_grad_()
    gain = (torch.rand(d, device="cuda") + 0.5).requires_grad_()
    w = (torch.randn(d, d, device="cuda") / d**0.5).bfloat16()

    def block(x, x0, mix, gain):  # impl="auto": the kernel on Hopper, inside the graph
        x_in, n = residual_rms_norm((x, x0), (mix[0], mix[1]), SCALE)
        x_mid, n2 = residual_rms_norm((x_in, n @ w), (None, gain), SCALE)
        return x_mid + n2.square()

    args, g = (x, x0, mix, gain), torch.randn_like(x)
    before = dict(_runtime.launches)
    out_c = torch.compile(block, fullgraph=True)(*args)
    grads_c = torch.autograd.grad(out_c, args, g)
    assert _runtime.launches["resnorm_fwd"] == before.get("resnorm_fwd", 0) + 2
    assert _runtime.launches["resnorm_bwd"] == before.get("resnorm_bwd", 0) + 2
    out_e = block(*args)
    grads_e = torch.autograd.grad(out_e, args, g)
    # bf16: inductor may round the square differently (one-ulp flips, seen on the H200): a relative bound
    assert rel_err(out_c, out_e) < 1e-2
    for a, b in zip(grads_c, grads_e):
        assert rel_err(a, b) < 1e-2


@pytest.mark.gpu
def test_gpu_opcheck():
    _hopper()
    d, m = 512, 1000
    x, a = (torch.randn(m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "ab")
    w = torch.rand(d, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.golfbench.resnorm_fwd.default, (x, a, None, w, w, None, SCALE))
    g, rstd = torch.randn_like(x).detach(), torch.rand(m, device="cuda") + 0.5
    args = (g, g, None, x.detach(), a.detach(), None, w.detach(), w.detach(), None, rstd, SCALE, 2)
    torch.library.opcheck(torch.ops.golfbench.resnorm_bwd.default, (*args, [True, True], [True, True]))
