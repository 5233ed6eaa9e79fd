"""Attention backends (kernels/attention.py): reference, each backend, the measured choice, the fallbacks."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import kernels.attention as attn
from kernels import _runtime, causal_attention, causal_attention_ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(b, t, h, hkv, d, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, t, n, d, dtype=dtype, device=device, requires_grad=True) for n in (h, hkv, hkv)]


def out_and_grads(fn, q, k, v, g):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, g.to(out.dtype))]


def naive_attention(q, k, v):
    """Row by row, independently of causal_attention_ref: position i attends to 0..i of its KV head."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = torch.empty_like(q)
    for i in range(t):
        for head in range(h):
            s = (k[:, : i + 1, head // group] @ q[:, i, head, :, None]).squeeze(-1) / d**0.5
            out[:, i, head] = (s.softmax(-1)[:, None, :] @ v[:, : i + 1, head // group]).squeeze(1)
    return out


@pytest.mark.parametrize(
    "b,t,h,hkv,d", [(1, 1, 2, 1, 8), (2, 13, 4, 2, 16), (1, 37, 8, 4, 8), (3, 9, 3, 3, 4)]
)
def test_reference_matches_naive_attention(b, t, h, hkv, d):
    q, k, v = (x.double() for x in qkv(b, t, h, hkv, d))
    assert rel_err(causal_attention_ref(q, k, v), naive_attention(q, k, v)) < 1e-12


CPU_BACKENDS = ["sdpa", "math", "flash", "math+expand", "flash+expand"]


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@pytest.mark.parametrize("b,t,h,hkv,d", [(1, 37, 8, 4, 16), (2, 64, 4, 1, 32)])
def test_backends_match_reference_in_fp64(impl, b, t, h, hkv, d):
    q, k, v = (x.double() for x in qkv(b, t, h, hkv, d))
    g = torch.randn(b, t, h, d, dtype=torch.float64)
    got = out_and_grads(lambda *x: causal_attention(*x, impl=impl), q, k, v, g)
    want = out_and_grads(causal_attention_ref, q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, r) < 1e-10, (impl, name, rel_err(a, r))


def test_auto_on_cpu_is_pytorchs_own_selection():
    q, k, v = qkv(2, 16, 4, 2, 8)
    assert torch.equal(causal_attention(q, k, v, "auto"), causal_attention(q, k, v, "sdpa"))
    rec = next(r for r in attn.selections() if r["choice"] == "sdpa")
    assert "cpu" in rec["why"]


@pytest.mark.parametrize(
    "impl,named",
    [("cudnn", "cudnn"), ("fa3", "flash_attn_interface"), ("fa4", re.escape("pip install '.[fa4]'"))],
)
def test_forcing_a_backend_that_cannot_run_names_it(impl, named):
    q, k, v = qkv(1, 8, 2, 1, 8)
    with pytest.raises(ValueError, match=named) as err:
        causal_attention(q, k, v, impl)
    assert repr(impl) in str(err.value)


def test_bad_arguments_are_refused():
    q, k, v = qkv(1, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_attention(q, k, v, "flash3")
    with pytest.raises(ValueError, match="not a multiple"):
        causal_attention(q, k[:, :, :1].expand(1, 8, 3, 8), v[:, :, :1].expand(1, 8, 3, 8))


def test_measure_picks_the_fastest_correct_and_skips_the_rest(monkeypatch):
    """A wrong kernel is never chosen however fast; an unavailable one is skipped with its reason."""
    real_run, real_time = attn._run, attn._time_fwd_bwd

    def run(q, k, v, impl):
        if impl == "flash":  # planted error: 1% of the output
            return real_run(q, k, v, "math") * 1.01
        if impl == "efficient":
            raise RuntimeError("No available kernel. Aborting execution.")
        return real_run(q, k, v, impl)

    fake_ms = {"flash": 0.1, "math": 5.0, "math+expand": 3.0, "sdpa": 4.0}
    monkeypatch.setattr(attn, "_run", run)
    monkeypatch.setattr(attn, "_time_fwd_bwd", lambda impl, *a: fake_ms[impl])
    rec = attn.measure(
        (2, 64, 4, 2, 16),
        torch.float32,
        torch.device("cpu"),
        ("flash", "efficient", "math", "math+expand", "fa3"),
    )
    table = rec["candidates"]
    assert table["flash"]["status"] == "wrong" and "out" in table["flash"]["reason"]
    assert (
        table["efficient"]["status"] == "unavailable"
        and "No available kernel" in table["efficient"]["reason"]
    )
    assert table["fa3"]["status"] == "unavailable"
    assert rec["choice"] == "math+expand" and table["math+expand"]["ms"] == 3.0
    # and with the planted error removed, flash is correct and (fake-)fastest
    monkeypatch.setattr(attn, "_run", real_run)
    rec = attn.measure((2, 64, 4, 2, 16), torch.float32, torch.device("cpu"), ("flash", "math"))
    assert rec["candidates"]["flash"]["status"] == "ok" and rec["choice"] == "flash"
    monkeypatch.setattr(attn, "_time_fwd_bwd", real_time)


def test_measure_without_a_usable_candidate_falls_back_to_sdpa():
    rec = attn.measure((1, 16, 2, 1, 8), torch.float32, torch.device("cpu"), ("cudnn", "fa3"))
    assert rec["choice"] == "sdpa" and "own selection" in rec["why"]
    assert {e["status"] for e in rec["candidates"].values()} == {"unavailable"}


def test_compiled_model_attention_matches_eager():
    q, k, v = qkv(2, 24, 4, 2, 8)
    g = torch.randn(2, 24, 4, 8)
    compiled = torch.compile(lambda a, b, c: causal_attention(a, b, c, "auto"), fullgraph=True)
    for a, r in zip(out_and_grads(compiled, q, k, v, g), out_and_grads(causal_attention_ref, q, k, v, g)):
        assert rel_err(a, r) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "auto", *attn.CANDIDATES])
def test_gpu_backends_match_fp32_math_in_bf16(impl):
    """Every backend this GPU can run, bf16 at the record's heads: within 2x the bf16 op-by-op error."""
    b, t, h, hkv, d = 4, 1024, 8, 4, 64
    q, k, v = qkv(b, t, h, hkv, d, torch.bfloat16, "cuda")
    g = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
    try:
        got = out_and_grads(lambda *x: causal_attention(*x, impl=impl), q, k, v, g)
    except ValueError as exc:
        pytest.skip(str(exc))
    want = out_and_grads(causal_attention_ref, *(x.float() for x in (q, k, v)), g.float())
    same_dtype = out_and_grads(causal_attention_ref, q, k, v, g)
    for name, a, r, bf in zip(("out", "dq", "dk", "dv"), got, want, same_dtype):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= 2 * rel_err(bf, r) + 1e-4, (impl, name, rel_err(a, r), rel_err(bf, r))


@pytest.mark.gpu
def test_gpu_auto_is_measured_where_compile_traces_and_recorded():
    """Under autocast, inside torch.compile: the choice is the fastest correct candidate, and it runs."""
    q, k, v = qkv(2, 512, 8, 4, 64, torch.bfloat16, "cuda")
    compiled = torch.compile(lambda a, b, c: causal_attention(a, b, c, "auto"), fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(q, k, v)
    rec = next(r for r in attn.selections() if r.get("shape", {}).get("seq_len") == 512)
    chosen = rec["candidates"][rec["choice"]]
    assert chosen["status"] == "ok" and rec["choice"] in attn.CANDIDATES
    assert all(chosen["ms"] <= e["ms"] for e in rec["candidates"].values() if "ms" in e)
    assert rel_err(out, causal_attention(q, k, v, rec["choice"])) < 1e-2


def test_auto_can_measure_inside_inference_mode():
    """Eval scoring runs under inference_mode; the measurement differentiates, so it must step out."""
    with torch.inference_mode():
        rec = attn.measure((1, 16, 2, 1, 8), torch.float32, torch.device("cpu"), ("math", "flash"))
    assert {e["status"] for e in rec["candidates"].values()} == {"ok"}


@pytest.mark.gpu
def test_gpu_measurement_is_quiet():
    """A candidate that cannot take the inputs is recorded with its reason, not warned about on stderr
    (PyTorch warns per forced backend it rejects: a train.py log would repeat them for every shape)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = attn.measure((1, 256, 8, 4, 64), torch.bfloat16, torch.device("cuda"))
    assert any(e["status"] == "unavailable" for e in rec["candidates"].values()), rec  # e.g. efficient GQA
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


# --- FlashAttention-4 (optional extra): the custom ops, tested on CPU with the references standing in ---

needs_no_fa4 = pytest.mark.skipif(attn.fa4_import_error() is None, reason="flash-attn-4 is installed here")
needs_fa4 = pytest.mark.skipif(attn.fa4_import_error() is not None, reason="flash-attn-4 is not importable")


@pytest.fixture
def fresh_reasons():
    """unavailable_reason is cached per process: a test that swaps FA4 in must not leak its answer."""
    attn.unavailable_reason.cache_clear()
    yield
    attn.unavailable_reason.cache_clear()


@pytest.fixture
def fa4_stand_in(monkeypatch, fresh_reasons):
    """The op's FA4 calls replaced by the plain-PyTorch pair (any device, any float dtype)."""

    def forward(q, k, v, scale, out, lse):
        o, l = attn.causal_attention_lse_ref(q, k, v, scale)
        out.copy_(o)
        lse.copy_(l)

    def backward(q, k, v, out, dout, lse, scale, dq, dk, dv):
        for buf, g in zip((dq, dk, dv), attn.causal_attention_bwd_ref(q, k, v, out, dout, lse, scale)):
            buf.copy_(g)

    monkeypatch.setattr(attn, "_fa4_forward", forward)
    monkeypatch.setattr(attn, "_fa4_backward", backward)
    monkeypatch.setattr(attn, "_fa4_blocker", lambda dtype, device_type: None)


@needs_no_fa4
def test_fa4_absent_is_unavailable_with_the_install_command(fresh_reasons):
    rec = attn.measure((2, 32, 4, 2, 16), torch.float32, torch.device("cpu"), ("fa4", "math"))
    fa4 = rec["candidates"]["fa4"]
    assert fa4["status"] == "unavailable" and "ms" not in fa4
    assert "flash-attn-4" in fa4["reason"] and "pip install '.[fa4]'" in fa4["reason"]
    assert rec["choice"] == "math"
    reason = attn.unavailable_reason("fa4", 8, 4, 64, "bfloat16", "cpu")
    assert "pip install '.[fa4]'" in reason and "bench/wheels.sh" in reason


@pytest.mark.parametrize("b,t,h,hkv,d", [(1, 3, 2, 1, 8), (2, 37, 8, 4, 16), (3, 20, 3, 3, 8)])
def test_fa4_reference_pair_matches_autograd_of_the_reference(b, t, h, hkv, d):
    """The stand-ins themselves: lse-based forward and flash-style backward vs autograd, fp64."""
    q, k, v = (x.double() for x in qkv(b, t, h, hkv, d))
    g = torch.randn(b, t, h, d, dtype=torch.float64)
    scale = d**-0.5
    out, lse = attn.causal_attention_lse_ref(q, k, v, scale)
    want = out_and_grads(causal_attention_ref, q, k, v, g)
    assert rel_err(out, want[0]) < 1e-12
    row0 = (q[:, 0] * k[:, 0].repeat_interleave(h // hkv, dim=1)).sum(-1) * scale  # position 0 sees itself
    assert lse.shape == (b, h, t) and lse.dtype == torch.float32
    assert rel_err(lse[:, :, 0], row0) < 1e-6
    grads = attn.causal_attention_bwd_ref(q, k, v, out, g, lse.double(), scale)
    for name, a, r in zip(("dq", "dk", "dv"), grads, want[1:]):
        assert rel_err(a, r) < 1e-6, (name, rel_err(a, r))  # lse went through fp32


def test_fa4_ops_pass_opcheck(fa4_stand_in):
    """Schema, fake (shapes, dtypes, strides as the real op), autograd registration: torch's own checks."""
    q, k, v = qkv(2, 24, 4, 2, 16)
    torch.library.opcheck(attn._fa4_fwd_op, (q, k, v, 0.25))
    out, lse = attn._fa4_fwd_op(q, k, v, 0.25)
    g = torch.randn_like(out)
    args = (q.detach(), k.detach(), v.detach(), out.detach(), g, lse.detach(), 0.25)
    torch.library.opcheck(attn._fa4_bwd_op, args)


@pytest.mark.parametrize("b,t,h,hkv,d", [(1, 33, 8, 4, 16), (2, 16, 4, 1, 8)])
def test_fa4_op_eager_matches_reference(fa4_stand_in, b, t, h, hkv, d):
    q, k, v = qkv(b, t, h, hkv, d)
    g = torch.randn(b, t, h, d)
    before = dict(_runtime.launches)
    with _runtime.poisoned_outputs():  # every element of out, lse, dq, dk, dv written
        got = out_and_grads(lambda *x: causal_attention(*x, impl="fa4"), q, k, v, g)
    want = out_and_grads(causal_attention_ref, *(x.double() for x in (q, k, v)), g.double())
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < 1e-5, (name, rel_err(a, r))
    assert _runtime.launches["fa4_fwd"] > before.get("fa4_fwd", 0)
    assert _runtime.launches["fa4_bwd"] > before.get("fa4_bwd", 0)


def test_fa4_op_traces_under_torch_compile_fullgraph(fa4_stand_in):
    """The fake and the autograd wiring under dynamo + AOT autograd: one graph, the ops in it, right grads."""
    q, k, v = qkv(2, 40, 4, 2, 16)
    g = torch.randn(2, 40, 4, 16)

    def block(a, b, c):
        return causal_attention(a * 1.5, b, c, "fa4").relu()

    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    out_and_grads(compiled, q, k, v, g)  # traces (and checks the forced backend once, eagerly)
    before = dict(_runtime.launches)
    got = out_and_grads(compiled, q, k, v, g)
    for op in ("fa4_fwd", "fa4_bwd"):  # the compiled graphs called the ops, once each
        assert _runtime.launches[op] == before[op] + 1, op
    want = out_and_grads(block, *(x.double() for x in (q, k, v)), g.double())
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, r) < 1e-5, (name, rel_err(a, r))


def test_fa4_is_measured_as_a_candidate_when_it_runs(fa4_stand_in, monkeypatch):
    """With FA4 present, "auto"'s measurement checks and times it like every other candidate."""
    monkeypatch.setattr(attn, "_time_fwd_bwd", lambda impl, *a: {"fa4": 1.0, "math": 2.0}[impl])
    rec = attn.measure((2, 32, 4, 2, 16), torch.float32, torch.device("cpu"), ("fa4", "math"))
    fa4 = rec["candidates"]["fa4"]
    assert fa4["status"] == "ok" and fa4["ms"] == 1.0 and rec["choice"] == "fa4"
    assert fa4["errors"]["dk"] <= fa4["limits"]["dk"]


def test_fa4_refusal_inside_the_package_is_unavailable_not_a_crash(fa4_stand_in, monkeypatch):
    def refuses(*args):
        raise AssertionError("head_dim must be a multiple of 16")

    monkeypatch.setattr(attn, "_fa4_forward", refuses)
    rec = attn.measure((1, 16, 2, 1, 8), torch.float32, torch.device("cpu"), ("fa4",))
    assert rec["candidates"]["fa4"]["status"] == "unavailable"
    assert "head_dim must be a multiple of 16" in rec["candidates"]["fa4"]["reason"]


@pytest.mark.gpu
@needs_fa4
def test_gpu_fa4_matches_fp32_math_at_the_record_shape():
    """48 x 2048, 8/4 heads, d 64, bf16: output and gradients within ERROR_FACTOR x the bf16 math's error
    (the module's rule), the fp32 reference computed 8 sequences at a time to bound its memory."""
    b, t, h, hkv, d = 48, 2048, 8, 4, 64
    q, k, v = qkv(b, t, h, hkv, d, torch.bfloat16, "cuda")
    g = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
    with _runtime.poisoned_outputs():
        got = out_and_grads(lambda *x: causal_attention(*x, impl="fa4"), q, k, v, g)
    err2, bf2, ref2 = [0.0] * 4, [0.0] * 4, [0.0] * 4
    for i in range(0, b, 8):
        part = [x[i : i + 8].detach() for x in (q, k, v)]
        want = out_and_grads(causal_attention_ref, *(x.float() for x in part), g[i : i + 8].float())
        same = out_and_grads(causal_attention_ref, *part, g[i : i + 8])
        for j, (a, r, bf) in enumerate(zip(got, want, same)):
            err2[j] += (a[i : i + 8].float() - r).square().sum().item()
            bf2[j] += (bf.float() - r).square().sum().item()
            ref2[j] += r.square().sum().item()
    for j, name in enumerate(("out", "dq", "dk", "dv")):
        assert torch.isfinite(got[j]).all(), name
        err, bf = (err2[j] / ref2[j]) ** 0.5, (bf2[j] / ref2[j]) ** 0.5
        assert err <= max(attn.ERROR_FACTOR * bf, attn.ERROR_FLOOR), (name, err, bf)
        print(f"fa4 {name}: rel err {err:.2e} (bf16 math {bf:.2e})")


@pytest.mark.gpu
@needs_fa4
def test_gpu_fa4_compiles_fullgraph():
    q, k, v = qkv(4, 1024, 8, 4, 64, torch.bfloat16, "cuda")
    g = torch.randn(4, 1024, 8, 64, device="cuda", dtype=torch.bfloat16)

    def block(a, b, c):
        return causal_attention(a * 1.5, b, c, "fa4").float().square().to(a.dtype)

    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    out_and_grads(compiled, q, k, v, g)
    before = dict(_runtime.launches)
    got = out_and_grads(compiled, q, k, v, g)
    for op in ("fa4_fwd", "fa4_bwd"):
        assert _runtime.launches[op] == before[op] + 1, op
    want = out_and_grads(block, q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, r) < 1e-2, (name, rel_err(a, r))
