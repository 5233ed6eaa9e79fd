"""Kernels pass, then train: each fused kernel proven on this machine before a run spends its time.

`check_kernels(device)` runs every kernel of ours against its reference, at the record's shapes on a
GPU (small shapes under the Triton interpreter on a CPU):

  mlp_fwd   kernels.mlp.up_act   post = leaky_relu(x @ w_up.T, 0.5)^2 (+ sign bits)   vs fp32 math
  mlp_bwd   kernels.mlp.act_grad dpre = (dY @ w_down) * f'(pre)                        vs fp32 math
  ce_fwd    kernels.softcapped_cross_entropy, per-row losses                           vs fp32 math
  ce_bwd    its gradient d loss / d logits                                             vs fp32 math
  qk_fwd    kernels.qk_norm_rope, q head RMSNorm + partial RoPE + gain                 vs fp32 math
  qk_bwd    its gradients d x and d gain                                               vs fp32 math
  norm_fwd  kernels.residual_rms_norm, block entry: h = m0 x + m1 x0, n = rms_norm(h) s  vs fp32 math
  norm_bwd  its gradients d x, d x0, d m0, d m1                                         vs fp32 math
  xsa_fwd   kernels.exclusive_self_attention, y - (y . v^) v^ per head                  vs fp32 math
  xsa_bwd   its gradients d y, d v                                                      vs fp32 math
  muon      optim.Muon's fast step (compiled, CUDA-graphed) vs its eager step; NS vs fp64

Outputs are poisoned with NaN before each launch and must come back fully written. Error is the relative
Frobenius error against the reference on the same inputs; a kernel passes when it is within the GPU test
tier's bound and within twice the error of the same math done op by op in the inputs' dtype (DESIGN.md
section 4). Each is also timed against its reference (torch.compile of the unfused math; the eager
Muon step) so that a correct kernel that is slower here is reported ("slower"), not trusted blindly.

`run_preflight` turns the table into the run's decision: a failing kernel is replaced by its reference
(or, strict, the run refuses to start); `kernels_on_path` proves after priming that the kernels the
run kept were really launched (kernels._runtime.launches counts every launch, inside compiled graphs too).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import _runtime, mlp
from kernels.cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_ref
from kernels.qk_rope import qk_norm_rope, qk_norm_rope_ref
from kernels.residual_norm import residual_rms_norm, residual_rms_norm_ref
from kernels.xsa import exclusive_self_attention, exclusive_self_attention_ref

from ..pipeline import pin_attention

MLP_TOL = 4e-3  # the GPU tier's bound for every bf16 MLP tensor and the CE loss and gradient
FP32_TOL = 1e-5  # fp32 under the interpreter: reordered fp32 sums only (the interpreter tier's bound)
MUON_TOL = 2e-2  # compiled vs eager Muon update: a few flipped bf16 roundings, amplified by NS
NS_FACTOR = 1.25  # NS may be at most this much worse than the plain bf16 bmm iteration (GPU tier)
SOFTCAP = 30.0
# B x T = M rows of q with H heads of D (the record's q: 48 x 2048 x 8 x 64, RoPE on 2P = 16 dims)
RECORD = dict(M=48 * 2048, K=512, N=2048, V=8192, B=48, T=2048, H=8, D=64, P=8)
SMALL = dict(M=77, K=64, N=128, V=1000, B=3, T=29, H=4, D=64, P=8)  # interpreter: ragged, seconds
# The kernel families a run can switch to their references (GPTConfig.<family>_impl), the checks that
# guard each one, and the launch counters that prove it ran.
FAMILIES = {f: (f"{f}_fwd", f"{f}_bwd") for f in ("mlp", "ce", "qk", "norm", "xsa")}
GUARDS = {check: family for family, checks in FAMILIES.items() for check in checks} | {"muon": "muon"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def _verdict(name: str, error: float, limit: float, written: bool, ms=None, ref_ms=None, **extra) -> dict:
    if not written:
        status, reason = "fail", "output not fully written (NaN poison left)"
    elif not error <= limit:
        status, reason = "fail", f"error {error:.3g} above the limit {limit:.3g}"
    elif ms is not None and ref_ms is not None and ms > ref_ms:
        status, reason = "slower", f"correct, but {ms / ref_ms:.2f}x the reference's time here"
    else:
        status, reason = "pass", None
    out = {"kernel": name, "status": status, "reason": reason, "error": error, "limit": limit}
    out.update(ms=ms, ref_ms=ref_ms, speedup=ref_ms / ms if ms and ref_ms else None, **extra)
    return out


def _limit(same_dtype_error: float, dtype: torch.dtype) -> float:
    """The tier's bound, and at most twice what the same math costs in `dtype` (fp32: the bound alone)."""
    if dtype == torch.float32:
        return FP32_TOL
    return min(MLP_TOL, 2 * same_dtype_error)


def _compiled(fn: Callable, device: torch.device) -> Callable:
    return torch.compile(fn, dynamic=False) if device.type == "cuda" else fn


def _check_mlp(shape: dict, dtype, device, timed: bool) -> list[dict]:
    M, K, N = shape["M"], shape["K"], shape["N"]
    x = torch.randn(M, K, device=device).to(dtype)
    w_up = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    w_down = (torch.randn(K, N, device=device) / N**0.5).to(dtype)
    g = torch.randn(M, K, device=device).to(dtype)
    with _runtime.poisoned_outputs():
        post, signs = mlp.up_act(x, w_up)
        dpre = mlp.act_grad(g, w_down, post, signs)
    pre32 = x.float() @ w_up.float().t()
    pre = x @ w_up.t()
    act = lambda u: F.leaky_relu(u, 0.5).square()  # noqa: E731
    grad = lambda gd, u: (gd @ w_down.to(gd.dtype)) * torch.where(u > 0, 2 * u, 0.5 * u)  # noqa: E731
    fwd_err, fwd_same = _rel(post, act(pre32)), _rel(act(pre), act(pre32))
    bwd_err, bwd_same = _rel(dpre, grad(g.float(), pre32)), _rel(grad(g, pre), grad(g.float(), pre32))
    ms = ref_ms = bwd_ms = bwd_ref_ms = None
    if timed:
        up_ref = _compiled(lambda a, b: act(a @ b.t()), device)
        grad_ref = _compiled(lambda gd, wd, u: (gd @ wd) * torch.where(u > 0, 2 * u, 0.5 * u), device)
        ms, ref_ms = (
            _median_ms(lambda: mlp.up_act(x, w_up), device),
            _median_ms(lambda: up_ref(x, w_up), device),
        )
        bwd_ms = _median_ms(lambda: mlp.act_grad(g, w_down, post, signs), device)
        bwd_ref_ms = _median_ms(lambda: grad_ref(g, w_down, pre), device)
    return [
        _verdict("mlp_fwd", fwd_err, _limit(fwd_same, dtype), not post.isnan().any(), ms, ref_ms,
                 same_dtype_error=fwd_same),
        _verdict("mlp_bwd", bwd_err, _limit(bwd_same, dtype), not dpre.isnan().any(), bwd_ms, bwd_ref_ms,
                 same_dtype_error=bwd_same),
    ]  # fmt: skip


def _check_ce(shape: dict, dtype, device, timed: bool) -> list[dict]:
    n, vocab = shape["M"], shape["V"]
    logits = (torch.randn(n, vocab, device=device) * 8).to(dtype)  # a trained head's scale: tanh bites
    targets = torch.randint(0, vocab, (n,), device=device)
    g = torch.randn(n, device=device)

    def loss_grad(fn, z):
        z = z.detach().requires_grad_()
        loss = fn(z)
        (dz,) = torch.autograd.grad(loss, z, g)
        return loss.detach(), dz

    ours = lambda z: softcapped_cross_entropy(z, targets, SOFTCAP, "none", impl="triton")  # noqa: E731
    ref = lambda z: softcapped_cross_entropy_ref(z, targets, SOFTCAP, "none")  # noqa: E731
    same = lambda z: F.cross_entropy(SOFTCAP * torch.tanh(z / SOFTCAP), targets, reduction="none")  # noqa: E731
    with _runtime.poisoned_outputs():
        loss, dz = loss_grad(ours, logits)
    ref_loss, ref_dz = loss_grad(ref, logits.float())
    same_loss, same_dz = loss_grad(same, logits)
    fwd_err, bwd_err = _rel(loss, ref_loss), _rel(dz, ref_dz)
    fwd_same, bwd_same = _rel(same_loss, ref_loss), _rel(same_dz, ref_dz)
    ms = ref_ms = bwd_ms = bwd_ref_ms = None
    if timed:
        ref_c = _compiled(ref, device)
        ms, ref_ms = _median_ms(lambda: ours(logits), device), _median_ms(lambda: ref_c(logits), device)
        z = logits.detach().requires_grad_()
        bwd_ms = _median_ms(lambda: torch.autograd.grad(ours(z), z, g), device)
        bwd_ref_ms = _median_ms(lambda: torch.autograd.grad(ref_c(z), z, g), device)
    return [
        _verdict("ce_fwd", fwd_err, _limit(fwd_same, dtype), not loss.isnan().any(), ms, ref_ms,
                 same_dtype_error=fwd_same),
        _verdict("ce_bwd", bwd_err, _limit(bwd_same, dtype), not dz.isnan().any(), bwd_ms, bwd_ref_ms,
                 same_dtype_error=bwd_same),
    ]  # fmt: skip


def _fused_check(family, run, fwd, ours, ref, inputs, n_out, dtype, device, timed: bool) -> list[dict]:
    """The fwd and bwd rows of one fused kernel against its reference. run(fn, *inputs) -> [outputs...,
    gradients...] on fresh leaves with fixed output gradients (the first n_out are outputs); fwd(fn) is
    the forward alone on `inputs`, for timing. Errors against the reference in fp32 and limits from it
    in the inputs' dtype; a part's error is its worst tensor's; bwd times are of forward + backward."""
    with _runtime.poisoned_outputs():
        got = run(ours, *inputs)
    truth, same = run(ref, *(t.float() for t in inputs)), run(ref, *inputs)
    ref_c = _compiled(ref, device) if timed else None
    times = {
        "fwd": (lambda: fwd(ours), lambda: fwd(ref_c)),
        "bwd": (lambda: run(ours, *inputs), lambda: run(ref_c, *inputs)),
    }
    rows = []
    for part, sl in (("fwd", slice(0, n_out)), ("bwd", slice(n_out, None))):
        error = max(_rel(a, r) for a, r in zip(got[sl], truth[sl]))
        same_error = max(_rel(a, r) for a, r in zip(same[sl], truth[sl]))
        written = not any(t.isnan().any() for t in got[sl])
        ms, ref_ms = (_median_ms(f, device) for f in times[part]) if timed else (None, None)
        rows.append(_verdict(f"{family}_{part}", error, _limit(same_error, dtype), written, ms, ref_ms,
                             same_dtype_error=same_error))  # fmt: skip
    return rows


def _check_qk(shape: dict, dtype, device, timed: bool) -> list[dict]:
    b, t, h, d, p = (shape[k] for k in "BTHDP")
    x = torch.randn(b, t, h, d, device=device).to(dtype)
    angles = torch.arange(t, device=device)[:, None] * (1e4 ** -(torch.arange(p, device=device) / p))
    cos, sin = angles.cos(), angles.sin()
    gain = torch.rand(h, device=device) + 4.5  # q_gain's scale (init 5.0)
    g = torch.randn(b, t, h, d, device=device).to(dtype)

    def run(fn, xx, gg):
        xx, gg = xx.detach().requires_grad_(), gg.detach().requires_grad_()
        out = fn(xx, cos, sin, gg)
        return [out.detach(), *torch.autograd.grad(out, (xx, gg), g.to(out.dtype))]

    ours = lambda *a: qk_norm_rope(*a, impl="triton")  # noqa: E731
    fwd = lambda fn: fn(x, cos, sin, gain)  # noqa: E731
    return _fused_check("qk", run, fwd, ours, qk_norm_rope_ref, (x, gain), 1, dtype, device, timed)


def _check_norm(shape: dict, dtype, device, timed: bool) -> list[dict]:
    m, d = shape["M"], shape["K"]
    x, x0 = (torch.randn(m, d, device=device).to(dtype) for _ in range(2))
    mix = torch.stack((torch.rand(d, device=device) + 0.5, torch.randn(d, device=device) * 0.3))
    g_h, g_n = (torch.randn(m, d, device=device).to(dtype) for _ in range(2))
    scale = 1 / 3**0.5  # a layer's ln_scale

    def run(fn, a, b):
        leaves = [a.detach().requires_grad_(), b.detach().requires_grad_(), mix.detach().requires_grad_()]
        h, n = fn((leaves[0], leaves[1]), (leaves[2][0], leaves[2][1]), scale)
        return [
            h.detach(),
            n.detach(),
            *torch.autograd.grad((h, n), leaves, (g_h.to(h.dtype), g_n.to(n.dtype))),
        ]

    ours = lambda *a: residual_rms_norm(*a, impl="triton")  # noqa: E731
    fwd = lambda fn: fn((x, x0), (mix[0], mix[1]), scale)  # noqa: E731
    return _fused_check("norm", run, fwd, ours, residual_rms_norm_ref, (x, x0), 2, dtype, device, timed)


def _check_xsa(shape: dict, dtype, device, timed: bool) -> list[dict]:
    b, t, h, d = (shape[k] for k in "BTHD")
    y = torch.randn(b, t, h, d, device=device).to(dtype)
    v = torch.randn(b, t, h // 2, d, device=device).to(dtype)  # the record's 2 query heads per kv head
    g = torch.randn(b, t, h, d, device=device).to(dtype)

    def run(fn, yy, vv):
        yy, vv = yy.detach().requires_grad_(), vv.detach().requires_grad_()
        out = fn(yy, vv)
        return [out.detach(), *torch.autograd.grad(out, (yy, vv), g.to(out.dtype))]

    ours = lambda *a: exclusive_self_attention(*a, impl="triton")  # noqa: E731
    fwd = lambda fn: fn(y, v)  # noqa: E731
    return _fused_check("xsa", run, fwd, ours, exclusive_self_attention_ref, (y, v), 1, dtype, device, timed)


def _check_muon(device: torch.device, timed: bool) -> dict:
    from optim import Muon, newton_schulz
    from optim.newton_schulz import newton_schulz_ref

    record = device.type == "cuda"
    shapes = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)] if record else [(3, 32, 64)]
    init = [torch.randn(s, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    params = {mode: [torch.nn.Parameter(w.clone()) for w in init] for mode in ("fast", "eager")}
    opts = {
        mode: Muon(ps, lr=0.022, weight_decay=0.095, cuda_graph=mode == "fast") for mode, ps in params.items()
    }
    for _ in range(3):  # the fast path compiles on the first step and captures its graph on the second
        for mode, ps in params.items():
            for p, gr in zip(ps, grads):
                p.grad = gr.clone() if p.grad is None else p.grad.copy_(gr)
            opts[mode].step()
    err = max(_rel(f.detach() - w, e.detach() - w) for f, e, w in zip(params["fast"], params["eager"], init))
    G = torch.randn(*shapes[-1], device=device)
    truth = newton_schulz_ref(G)
    ns_err, plain = _rel(newton_schulz(G), truth), _rel(newton_schulz_ref(G, dtype=torch.bfloat16), truth)
    ms = ref_ms = None
    if timed:
        ms = _median_ms(opts["fast"].step, device)
        ref_ms = _median_ms(opts["eager"].step, device)
    ok_ns = ns_err <= NS_FACTOR * plain
    rec = _verdict("muon", err, MUON_TOL, all(torch.isfinite(p).all() for p in params["fast"]), ms, ref_ms)
    rec.update(ns_error=ns_err, ns_plain_bf16_error=plain)
    if not ok_ns and rec["status"] != "fail":
        rec.update(
            status="fail", reason=f"NS error {ns_err:.3g} above {NS_FACTOR} x plain bf16 ({plain:.3g})"
        )
    return rec


def check_kernels(device: torch.device, timed: bool = True) -> dict:
    """Every kernel of ours against its reference on `device`. Returns {"kernels": [row per check], ...}."""
    import triton

    t0 = time.perf_counter()
    blocker = _runtime.platform_blocker(device.type, device.index or 0)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "planted_fault": _runtime.planted_fault("mlp") or None,
    }
    rows: list[dict] = []
    if blocker is not None:
        for checks in FAMILIES.values():
            rows += [{"kernel": name, "status": "skipped", "reason": blocker} for name in checks]
    else:
        shape, dtype = (RECORD, torch.bfloat16) if device.type == "cuda" else (SMALL, torch.float32)
        rows += _check_mlp(shape, dtype, device, timed and device.type == "cuda")
        rows += _check_ce(shape, dtype, device, timed and device.type == "cuda")
        rows += _check_qk(shape, dtype, device, timed and device.type == "cuda")
        rows += _check_norm(shape, dtype, device, timed and device.type == "cuda")
        rows += _check_xsa(shape, dtype, device, timed and device.type == "cuda")
    rows.append(_check_muon(device, timed and device.type == "cuda"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**info, "seconds": time.perf_counter() - t0, "kernels": rows}


def _num(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def format_table(result: dict) -> str:
    lines = [f"kernel check on {result['device']} (triton {result['triton']}, {result['seconds']:.1f} s)"]
    cols = ("error", "limit", "ms", "ref ms", "speedup")
    head = f"{'kernel':8s} {'status':8s} " + " ".join(c.rjust(9) for c in cols) + "  reason"
    lines += [head, "-" * len(head)]
    for r in result["kernels"]:
        nums = [_num(r, k, spec) for k, spec in zip(("error", "limit", "ms", "ref_ms", "speedup"),
                                                     ("9.2e", "9.2e", "9.3f", "9.3f", "9.2f"))]  # fmt: skip
        lines.append(f"{r['kernel']:8s} {r['status']:8s} " + " ".join(nums) + f"  {r.get('reason') or ''}")
    return "\n".join(lines)


def failed(result: dict) -> list[str]:
    """The guarded kernel families (FAMILIES, and muon) whose check failed."""
    return sorted({GUARDS[r["kernel"]] for r in result["kernels"] if r["status"] == "fail"})


def kernels_on_path(expected: list[str]) -> dict[str, bool]:
    """For each kernel family the run kept ("mlp", "ce", ...): was it launched since the process started?
    kernels._runtime.launches counts launches at run time, also from inside compiled graphs."""
    return {k: all(_runtime.launches[n] > 0 for n in FAMILIES[k]) for k in expected if k in FAMILIES}


def run_preflight(cfg, pd, log) -> tuple:
    """The check before priming, as train.py runs it. Returns (cfg, record): `cfg` with one attention
    backend for every rank and every kernel whose check failed on any rank switched to its reference
    (the MLP and CE kernels to "torch", Muon to its eager step); in strict mode such a failure refuses
    the run instead. `record` goes into the report."""
    import dataclasses

    cfg = pin_attention(cfg, pd, log)
    if cfg.preflight == "off":
        log("preflight: OFF (--preflight off): the kernels were not proven on this machine")
        return cfg, {"mode": "off", "replaced": []}
    result = check_kernels(pd.device)
    for line in format_table(result).splitlines():
        log(f"preflight: {line}")
    bad = [guard for guard in (*FAMILIES, "muon") if pd.any(guard in failed(result))]
    if bad and cfg.preflight == "strict":
        raise SystemExit(
            f"preflight (strict): kernel check failed for {', '.join(bad)} on this machine (table above); "
            "fix the kernel, or run with --preflight on to train on the references instead"
        )
    overrides = dict(cfg.model_overrides)
    for guard in bad:
        if guard == "muon":
            cfg = dataclasses.replace(cfg, muon_graphs=False)
        else:
            overrides[f"{guard}_impl"] = "torch"
        log(f"preflight: WARNING: {guard} failed its check and is NOT used; its reference takes its place")
    record = {**result, "mode": cfg.preflight, "replaced": bad}
    return dataclasses.replace(cfg, model_overrides=overrides), record


def confirm_on_path(record: dict, mcfg, cfg, device: torch.device, log) -> dict:
    """After priming: the kernels the run kept must have been launched (a silent fallback is caught).
    Adds {"used": {...}, "on_path": bool} to `record`; strict mode refuses a run whose kernels are missing."""
    import kernels.attention

    blocked = _runtime.platform_blocker(device.type, device.index or 0)
    expected = [k for k in FAMILIES if getattr(mcfg, f"{k}_impl") != "torch" and not blocked]
    ran = kernels_on_path(expected)
    graphed = cfg.muon_impl == "banked" and cfg.muon_graphs and device.type == "cuda"
    record["used"] = {
        **{k: ran.get(k, False) for k in FAMILIES},
        "muon": f"{cfg.muon_impl}, {'CUDA-graphed' if graphed else 'eager'}",
        "attention": mcfg.attn_impl
        if mcfg.attn_impl != "auto"
        else [s["choice"] for s in kernels.attention.selections()],
    }
    missing = [k for k, ok in ran.items() if not ok]
    record["on_path"] = not missing
    if missing:
        msg = f"kernels {missing} were selected but never launched during priming: a silent fallback"
        if cfg.preflight == "strict":
            raise SystemExit(f"preflight (strict): {msg}")
        log(f"preflight: WARNING: {msg}")
    log("kernels used: " + " | ".join(f"{k} {v}" for k, v in record["used"].items()))
    return record
