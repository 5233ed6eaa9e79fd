"""python -m bench profile: where one train.py step goes, family by family, ours beside the reference.

One step is what train.py's loop runs per iteration at the record config: `accum` micro-batches of
48 x 2048 tokens forward + backward (compiled model), the per-rank gradient clip, the non-finite guard
(one host sync), the optimizer step (Muon on the banks, AdamW on the rest) and the EMA update. Batches
are fixed random tokens already on the GPU (bench/suites/train.py `build`), so no loader time is in it.

For each provider (`reference`: KERNELS=torch MUON_IMPL=per_matrix, PyTorch's own attention
selection, what the record's script gets without FA3; `ours`: train.py's defaults) and loop mode:
warm-up steps (compilation, autotuning, Muon's graph capture), timed steps (CUDA events: median and
p20-p80), then one step under torch.profiler. Its Chrome trace is parsed here: each GPU kernel goes
to a family by its name, the part of the step it was launched in (record_function ranges) and, for
GEMMs, the shapes of the aten op that launched it:

  attention fwd, attention bwd   SDPA backends (cuDNN, flash, efficient), FA3
  mlp                            our fused MLP kernel, GEMMs with the hidden width, the activation
  other gemms                    q/k/v/o projections and the tied LM head
  cross-entropy                  our fused CE kernels, or the compiled softcap + log-softmax
  elementwise                    norms, rotary, residuals, XSA, casts and copies: the rest of fwd/bwd
  optimizer                      gradient clip, non-finite guard, Muon (Newton-Schulz), AdamW, EMA
  communication                  NCCL
  idle                           time inside the step's GPU span with no kernel running

`FORMULAS` gives each family's useful FLOPs and minimal HBM bytes; with the ceilings measured at the
start of the run they give TFLOP/s, GB/s and % of roofline (roofline time = max(FLOPs / matmul
ceiling, bytes / copy ceiling), divided by the measured time). Elementwise and idle have no formula.

Outputs (--out): profile.json, profile.csv, profile.png (stacked bars, ours beside the reference)
and trace-<provider>-<mode>.json.gz per profiled step (open in https://ui.perfetto.dev).
--dry-run walks the same path on a CPU with a synthetic trace and fake times, marked FAKE.

Over 500 lines on purpose: the family rules, the FLOP/byte formulas and the trace parser must agree on
every family name, and the synthetic trace of --dry-run is built from the same rules.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import datetime as dt
import gzip
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

FAMILIES = (
    "attention fwd",
    "attention bwd",
    "mlp",
    "other gemms",
    "cross-entropy",
    "elementwise",
    "optimizer",
    "communication",
    "idle",
)
MODES = {"flat": False, "looped": True}
PROVIDERS = ("reference", "ours")

# record_function ranges around the parts of a step (phase names in the trace)
PHASE_PREFIX = "golfbench::"
FWD_BWD, OPTIMIZER_PHASES = "forward_backward", ("clip", "guard", "optimizer", "ema")

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
ATTENTION_OP_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "flash_attn")
ATTENTION_NAME_MARKS = ("flash_fwd", "flash_bwd", "fmha_cutlass", "_sdpa_", "flashattn", "flash::")
ATTENTION_BWD_MARKS = ("backward", "bwd", "bprop", "cutlassb")
MLP_NAME_MARKS = ("_mlp_gemm_kernel", "leaky_relu")
CE_NAME_MARKS = ("_ce_fwd_kernel", "_ce_bwd_kernel", "log_softmax", "nll_loss", "tanh", "cross_entropy")
GEMM_NAME_MARKS = ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "sm80_", "cublas")


# ------------------------------------------------------------------------------------------------
# Formulas: useful FLOPs and minimal HBM bytes of each family in one step
# ------------------------------------------------------------------------------------------------


def formulas(cfg, looping: bool, micro_seqs: int, seq_len: int, accum: int, params: dict) -> dict:
    """{family: (flops, bytes)} of one step. `cfg` is the GPTConfig; `params` describes the optimizer's
    tensors: {"banks": [(n, rows, cols)], "adamw": [(numel, itemsize)], "state": [(numel, itemsize)],
    "grads": [(numel, itemsize)], "ns_steps": int}."""
    from model.gpt import virtual_layout

    d, kv, f, v = cfg.model_dim, cfg.kv_dim, cfg.mlp_hidden, cfg.vocab_size
    h, hd = cfg.num_heads, cfg.head_dim
    layers = sum(len(part) for part in virtual_layout(cfg, looping))
    m = micro_seqs * seq_len
    # causal attention, FlashAttention's convention: QK^T and PV over the lower triangle; bwd = 2.5x fwd
    attn_fwd = 2.0 * micro_seqs * h * seq_len**2 * hd
    ns = sum(
        n * params["ns_steps"] * (4 * min(r, c) ** 2 * max(r, c) + 2 * min(r, c) ** 3)
        for n, r, c in params["banks"]
    )
    bank_elems = sum(n * r * c for n, r, c in params["banks"])
    optimizer_bytes = (
        20 * bank_elems  # Muon: fp32 grad read, momentum read + write, weight read + write
        + sum(7 * n * size for n, size in params["adamw"])  # AdamW: weight r/w, grad r, two moments r/w
        + sum((8 + size) * n for n, size in params["state"])  # EMA: fp32 shadow r/w, the tensor read
        + sum(3 * n * size for n, size in params["grads"])  # clip: norm read, scale read + write
    )
    return {
        "attention fwd": (accum * layers * attn_fwd, 0.0),
        "attention bwd": (accum * layers * 2.5 * attn_fwd, 0.0),
        "mlp": (accum * layers * 3 * 2 * 2 * m * d * f, 0.0),
        "other gemms": (accum * 3 * 2 * m * d * (layers * (2 * d + 2 * kv) + v), 0.0),
        "cross-entropy": (0.0, accum * 3 * m * v * 2),  # bf16 logits read (fwd), read + grad written (bwd)
        "optimizer": (float(ns), float(optimizer_bytes)),
    }


def optimizer_tensors(model, opts, ns_steps: int) -> dict:
    """The `params` argument of `formulas` for a built train.py model and optimizer set."""
    banks = [tuple(p.shape) for p in opts.banks]
    sizes = lambda ps: [(p.numel(), p.element_size()) for p in ps]  # noqa: E731
    return {
        "banks": banks,
        "adamw": sizes(opts.replicated),
        "state": sizes(model.state_dict().values()),
        "grads": sizes(opts.params),
        "ns_steps": ns_steps,
    }


# ------------------------------------------------------------------------------------------------
# Trace parsing
# ------------------------------------------------------------------------------------------------


def load_trace(path: str | Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _gemm_dims(op: dict) -> list[list[int]]:
    dims = op.get("args", {}).get("Input Dims") or []
    return [list(x) for x in dims if isinstance(x, list) and len(x) >= 2]


def _launch_context(events: list[dict]) -> dict[int, dict]:
    """correlation id -> {"op": innermost aten op name, "gemm_dims": dims of the innermost GEMM op,
    "ts": launch time} for every kernel launch, from the CPU ops open on the launching thread."""
    by_thread = defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat == "cpu_op" or (cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})):
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    context = {}
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[dict] = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= e["ts"]:
                stack.pop()
            if e["cat"] == "cpu_op":
                stack.append(e)
                continue
            gemm = next((op for op in reversed(stack) if op["name"] in GEMM_OPS), None)
            context[e["args"]["correlation"]] = {
                "op": " ".join(op["name"] for op in stack),
                "gemm_dims": _gemm_dims(gemm) if gemm else None,
                "ts": e["ts"],
            }
    return context


def _phases(events: list[dict]) -> list[tuple[float, float, str]]:
    """(start, end, name) of the step's record_function ranges, sorted by start."""
    out = [
        (e["ts"], e["ts"] + e.get("dur", 0), e["name"][len(PHASE_PREFIX) :])
        for e in events
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"].startswith(PHASE_PREFIX)
    ]
    return sorted(out)


def _phase_at(phases: list[tuple[float, float, str]], starts: list[float], ts: float) -> str | None:
    i = bisect.bisect_right(starts, ts) - 1
    while i >= 0:  # ranges do not nest, but a launch can follow a range that ended
        start, end, name = phases[i]
        if start <= ts <= end:
            return name
        i -= 1
    return None


def classify(name: str, phase: str | None, op: str, gemm_dims, dims: dict) -> tuple[str, str]:
    """(family, detail) of one GPU activity. `dims` holds the model's mlp_hidden and vocab_size."""
    low = name.lower()
    if "nccl" in low:
        return "communication", "nccl"
    if phase in OPTIMIZER_PHASES:
        if phase == "optimizer":
            return "optimizer", "adamw" if "adam" in low else "muon"
        return "optimizer", phase
    attention_op = any(mark in op for mark in ATTENTION_OP_MARKS)
    if attention_op or any(mark in low for mark in ATTENTION_NAME_MARKS):
        backward = any(mark in (op if attention_op else low) for mark in ATTENTION_BWD_MARKS)
        if attention_op and not backward:  # an op-less fallback keeps the kernel's own verdict
            backward = any(mark in low for mark in ATTENTION_BWD_MARKS)
        return ("attention bwd" if backward else "attention fwd"), name
    if any(mark in low for mark in MLP_NAME_MARKS):
        return "mlp", "fused kernel" if "_mlp_gemm_kernel" in low else "activation"
    if any(mark in low for mark in CE_NAME_MARKS):
        return "cross-entropy", name
    if gemm_dims is not None or any(mark in low for mark in GEMM_NAME_MARKS):
        flat = {x for shape in (gemm_dims or []) for x in shape[-2:]}
        if dims["vocab_size"] in flat:
            return "other gemms", "lm head"
        if dims["mlp_hidden"] in flat:
            return "mlp", "gemm"
        if gemm_dims is not None:
            return "other gemms", "q/k/v/o"
    return "elementwise", name


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def breakdown(events: list[dict], dims: dict) -> dict:
    """Per-family GPU time (ms) of a one-step trace, the span, idle time and the top kernels."""
    context = _launch_context(events)
    phases = _phases(events)
    starts = [p[0] for p in phases]
    gpu = [
        e
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur")
    ]
    if not gpu:
        raise ValueError("the trace holds no GPU activity (was CUDA profiled?)")
    family_us: dict[str, float] = defaultdict(float)
    detail_us: dict[tuple[str, str], float] = defaultdict(float)
    kernels: dict[str, dict] = {}
    intervals = []
    for e in gpu:
        ctx = context.get(e.get("args", {}).get("correlation"), {})
        phase = _phase_at(phases, starts, ctx.get("ts", e["ts"])) if phases else None
        family, detail = classify(e["name"], phase, ctx.get("op", ""), ctx.get("gemm_dims"), dims)
        family_us[family] += e["dur"]
        detail_us[(family, detail)] += e["dur"]
        k = kernels.setdefault(e["name"], {"name": e["name"], "family": family, "us": 0.0, "count": 0})
        k["us"] += e["dur"]
        k["count"] += 1
        intervals.append((e["ts"], e["ts"] + e["dur"]))
    span_us = max(b for _, b in intervals) - min(a for a, _ in intervals)
    busy_us = _union_us(intervals)
    family_us["idle"] = span_us - busy_us
    top = sorted(kernels.values(), key=lambda k: -k["us"])
    return {
        "span_ms": span_us / 1e3,
        "busy_ms": busy_us / 1e3,
        # kernel time can exceed the busy time when streams overlap; shares are of the summed time
        "families_ms": {f: family_us.get(f, 0.0) / 1e3 for f in FAMILIES},
        "details_ms": [
            {"family": f, "detail": d, "ms": us / 1e3} for (f, d), us in sorted(detail_us.items())
        ],
        "top_kernels": [{**k, "ms": k.pop("us") / 1e3} for k in top[:40]],
        "attention_kernels": sorted({k["name"] for k in top if k["family"].startswith("attention")}),
    }


def family_rows(bd: dict, forms: dict, ceilings: dict) -> list[dict]:
    """One row per family: ms, % of the step, TFLOP/s, GB/s and % of roofline where a formula exists."""
    total = sum(bd["families_ms"].values())
    rows = []
    for fam in FAMILIES:
        ms = bd["families_ms"][fam]
        flops, nbytes = forms.get(fam, (0.0, 0.0))
        row = {"family": fam, "ms": ms, "pct_step": 100 * ms / total if total else 0.0}
        row.update(flops=flops, bytes=nbytes, tflops=None, gbps=None, pct_roofline=None)
        if ms > 0 and (flops or nbytes):
            row["tflops"] = flops / ms / 1e9 if flops else None
            row["gbps"] = nbytes / ms / 1e6 if nbytes else None
            roof_ms = max(flops / ceilings["matmul_tflops"] / 1e9, nbytes / ceilings["copy_gbps"] / 1e6)
            row["pct_roofline"] = 100 * roof_ms / ms
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Measuring (GPU) and the synthetic trace (--dry-run)
# ------------------------------------------------------------------------------------------------


def annotated_step(r, ema):
    from torch.profiler import record_function

    from model.train_step import check_finite, clip_gradients, forward_backward

    def step():
        with record_function(PHASE_PREFIX + FWD_BWD):
            loss = forward_backward(r.model_c, r.batches, r.accum, r.device)
        with record_function(PHASE_PREFIX + "clip"):
            norm = clip_gradients(r.opts.params, r.cfg.grad_clip_norm)
        with record_function(PHASE_PREFIX + "guard"):
            check_finite(loss, norm, 0, r.pd, r.log)
        with record_function(PHASE_PREFIX + "optimizer"):
            r.opts.step()
        with record_function(PHASE_PREFIX + "ema"):
            ema.update()

    return step


def _time_steps(step, n: int) -> dict:
    import torch

    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = lambda p: sorted(times)[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "samples_ms": times}


def profile_provider(provider: str, accum: int, modes: list[str], out: Path, warmup: int, steps: int, log):
    """Build train.py's step for `provider`, then per loop mode: warm up, time, profile one step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import kernels.attention
    from bench.suites.train import build
    from model.run_config import model_config
    from optim.ema import EMA

    r = build(provider, accum)
    ema = EMA(r.model, r.cfg.ema_decay)
    step = annotated_step(r, ema)
    results = {}
    for mode in modes:
        r.model.set_looping(MODES[mode])
        log(f"[{provider} {mode}] warm-up: {warmup} steps (compiles the graph on the first)")
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        timing = _time_steps(step, steps)
        timing["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        spread = f"p20-p80 {timing['p20_ms']:.1f}-{timing['p80_ms']:.1f}"
        log(f"[{provider} {mode}] step {timing['median_ms']:.1f} ms ({spread})")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            step()
            torch.cuda.synchronize()
        trace = out / f"trace-{provider}-{mode}.json"
        prof.export_chrome_trace(str(trace))
        results[mode] = {"timing": timing, "trace": _gzip(trace)}
    forms = {
        mode: formulas(
            r.model.config, MODES[mode], r.batches.batches[0][0].shape[0], r.batches.batches[0][0].shape[1],
            accum, optimizer_tensors(r.model, r.opts, r.cfg.muon_backend_steps),
        )
        for mode in modes
    }  # fmt: skip
    info = {
        "settings": dataclasses.asdict(model_config(r.cfg, r.device)),
        "muon_impl": r.cfg.muon_impl,
        "attention_selections": kernels.attention.selections(),
        "flops_per_token": {mode: r.model.flops_per_token(MODES[mode]) for mode in modes},
        "tokens": accum * r.batches.batches[0][0].numel(),
    }
    del r, ema, step
    torch.cuda.empty_cache()
    return results, forms, info


def _gzip(path: Path) -> Path:
    gz = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
        dst.write(src.read())
    path.unlink()
    return gz


def synthetic_trace(forms: dict, ceilings: dict, dims: dict, provider: str) -> list[dict]:
    """A trace shaped like a real one (phases, launches, aten ops with shapes, kernel names of each
    family) with durations from the formulas at fake efficiencies: exercises the parser without a GPU."""
    eff = {"reference": 0.45, "ours": 0.6}[provider]
    d, f, v, m = 512, dims["mlp_hidden"], dims["vocab_size"], 98304
    sdpa = "aten::_scaled_dot_product_flash_attention"
    kernels = [  # (phase, name, aten op, gemm dims, family for the duration)
        (FWD_BWD, "pytorch_flash::flash_fwd_kernel", sdpa, None, "attention fwd"),
        (FWD_BWD, "pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel", sdpa + "_backward", None, "attention bwd"),
        (FWD_BWD, "_mlp_gemm_kernel", "", None, "mlp"),
        (FWD_BWD, "sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm", [[m, f], [f, d]], "mlp"),
        (FWD_BWD, "sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm", [[m, d], [d, d]], "other gemms"),
        (FWD_BWD, "sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm", [[m, d], [d, v]], "other gemms"),
        (FWD_BWD, "_ce_fwd_kernel", "", None, "cross-entropy"),
        (FWD_BWD, "triton_red_fused__to_copy_mean_pow_rsqrt_0", "", None, None),
        ("optimizer", "void at::native::multi_tensor_apply_kernel<FusedAdamW>", "", None, "optimizer"),
        ("optimizer", "triton_per_fused_newton_schulz", "", None, None),
        ("ema", "void at::native::multi_tensor_apply_kernel<lerp>", "", None, None),
    ]  # fmt: skip
    shares = defaultdict(int)
    for *_, fam in kernels:
        shares[fam] += 1
    events, t, corr = [], 0.0, 0
    for phase in (FWD_BWD, "optimizer", "ema"):
        start = t
        for ph, name, op, gdims, fam in kernels:
            if ph != phase:
                continue
            corr += 1
            if fam is None:
                us = 300.0 if phase == FWD_BWD else 40.0
            else:
                flops, nbytes = forms.get(fam, (0.0, 0.0))
                roof = max(flops / ceilings["matmul_tflops"] / 1e9, nbytes / ceilings["copy_gbps"] / 1e6)
                us = 1e3 * roof / eff / shares[fam]
            if op:
                args = {"Input Dims": gdims} if gdims else {}
                events.append(dict(ph="X", cat="cpu_op", name=op, pid=1, tid=1, ts=t, dur=2.0, args=args))
            events.append(
                dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", pid=1, tid=1, ts=t + 0.5, dur=1.0,
                     args={"correlation": corr})
            )  # fmt: skip
            kernel = dict(ph="X", cat="kernel", name=name, pid=0, tid=7, ts=t + 5.0, dur=us)
            events.append({**kernel, "args": {"correlation": corr}})
            t += 5.0 + us + 3.0  # launch latency and a gap between kernels
        events.append(
            dict(
                ph="X",
                cat="user_annotation",
                name=PHASE_PREFIX + phase,
                pid=1,
                tid=1,
                ts=start,
                dur=t - start,
            )
        )
    return events


def fake_provider(provider: str, accum: int, modes: list[str], out: Path, ceilings: dict, dims: dict):
    """What profile_provider returns, from synthetic traces (--dry-run)."""
    import torch

    from model import GPT, GPTConfig

    with torch.device("meta"):  # shapes only: no memory, no CUDA
        model = GPT(GPTConfig())
    banks = [tuple(p.shape) for p in model.param_groups()["matrix"]]
    params = {"banks": banks, "adamw": [(8192 * 512, 2)], "state": [], "grads": [], "ns_steps": 5}
    forms = {m: formulas(model.config, MODES[m], 48, 2048, accum, params) for m in modes}
    measured = {}
    for mode in modes:
        events = synthetic_trace(forms[mode], ceilings, dims, provider)
        trace = out / f"trace-{provider}-{mode}.json"
        trace.write_text(json.dumps({"traceEvents": events}))
        span = breakdown(events, dims)["span_ms"]
        timing = {
            "median_ms": span,
            "p20_ms": span,
            "p80_ms": span,
            "samples_ms": [span],
            "peak_mem_bytes": None,
        }
        measured[mode] = {"timing": timing, "trace": _gzip(trace)}
    info = {
        "settings": {},
        "attention_selections": [],
        "flops_per_token": {m: model.flops_per_token(MODES[m]) for m in modes},
        "tokens": accum * 48 * 2048,
    }
    return measured, forms, info


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def run_profile(args) -> int:
    from bench import harness
    from bench.env import collect_env, output_folder
    from model import GPTConfig

    env = collect_env()
    if not env["cuda_available"] and not args.dry_run:
        # exit 2 (as bench gate): nothing was measured, which a script must not take for success
        print(
            f"bench profile: no CUDA GPU ({env['no_gpu_reason']}): nothing was profiled. "
            "Without a GPU, walk the whole path on a synthetic trace: python -m bench profile --dry-run",
            file=sys.stderr,
        )
        return 2
    modes = list(MODES) if args.looping == "both" else [args.looping]
    providers = args.providers.split(",") if args.providers else list(PROVIDERS)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        print(f"bench profile: unknown provider(s) {unknown}; choose from {PROVIDERS}")
        return 2
    now = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out) if args.out else output_folder("profile", env["git"]["short_sha"], now)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    ceilings = harness.measure_ceilings(fake=args.dry_run)
    cfg = GPTConfig()
    dims = {"mlp_hidden": cfg.mlp_hidden, "vocab_size": cfg.vocab_size}
    runs = []
    for provider in providers:
        if args.dry_run:
            measured, forms, info = fake_provider(provider, args.accum, modes, out, ceilings, dims)
        else:
            measured, forms, info = profile_provider(
                provider, args.accum, modes, out, args.warmup, args.steps, log
            )
        for mode in modes:
            bd = breakdown(load_trace(measured[mode]["trace"]), dims)
            timing = measured[mode]["timing"]
            step_s = timing["median_ms"] / 1e3
            flops = info["flops_per_token"][mode] * info["tokens"]
            peak = (env.get("datasheet") or {}).get("bf16_tflops")
            runs.append(
                {
                    "provider": provider,
                    "mode": mode,
                    "fake": bool(args.dry_run),
                    "timing": timing,
                    "tokens_per_s": info["tokens"] / step_s,
                    "model_tflops": flops / step_s / 1e12,
                    "mfu": flops / step_s / 1e12 / peak if peak else None,
                    "trace": measured[mode]["trace"].name,
                    "families": family_rows(bd, forms[mode], ceilings),
                    **{
                        k: bd[k]
                        for k in ("span_ms", "busy_ms", "details_ms", "top_kernels", "attention_kernels")
                    },
                    "settings": info["settings"],
                    "attention_selections": info["attention_selections"],
                }
            )
    env.update(ceilings=ceilings, dry_run=args.dry_run, timestamp=now.isoformat(timespec="seconds"))
    result = {
        "schema": "golfbench.profile/1",
        "env": env,
        "accum": args.accum,
        "micro_batch": {"seqs": 48, "seq_len": 2048},
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "runs": runs,
    }
    (out / "profile.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    _write_csv(out / "profile.csv", runs)
    _plot(out / "profile.png", result)
    print(format_table(result))
    print(f"wrote {out}/profile.json, profile.csv, profile.png and {len(runs)} trace(s)")
    return 0


def _write_csv(path: Path, runs: list[dict]) -> None:
    cols = [
        "provider",
        "mode",
        "fake",
        "step_ms",
        "family",
        "ms",
        "pct_step",
        "tflops",
        "gbps",
        "pct_roofline",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for run in runs:
            for row in run["families"]:
                w.writerow(
                    {"provider": run["provider"], "mode": run["mode"], "fake": run["fake"],
                     "step_ms": run["timing"]["median_ms"], **{k: row[k] for k in cols[4:]}}
                )  # fmt: skip


def _fmt(v, spec: str) -> str:
    """`v` formatted with `spec`, or a dash of the same width."""
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0] or 0))


# (header, width and format, value of a (reference row, ours row) pair of one family)
COLUMNS = (
    ("ref ms", "8.2f", lambda r, o: r and r["ms"]),
    ("ref %", "6.1f", lambda r, o: r and r["pct_step"]),
    ("ours ms", "8.2f", lambda r, o: o and o["ms"]),
    ("ours %", "6.1f", lambda r, o: o and o["pct_step"]),
    ("TFLOP/s", "8.1f", lambda r, o: o and o["tflops"]),
    ("GB/s", "7.0f", lambda r, o: o and o["gbps"]),
    ("%roof", "6.1f", lambda r, o: o and o["pct_roofline"]),
    ("ref/ours", "8.2f", lambda r, o: r["ms"] / o["ms"] if r and o and o["ms"] > 0 else None),
)


def _step_line(label: str, run: dict) -> str:
    t = run["timing"]
    mfu = f", MFU {100 * run['mfu']:.1f}%" if run["mfu"] else ""
    attention = ", ".join(run["attention_kernels"][:2]) or "-"
    return (
        f"  {label}: step {t['median_ms']:.1f} ms (p20-p80 {t['p20_ms']:.1f}-{t['p80_ms']:.1f}), "
        f"{run['tokens_per_s']:,.0f} tok/s{mfu}; attention kernels: {attention}"
    )


def format_table(result: dict) -> str:
    """One block per loop mode: each family's ms and share, ours beside the reference."""
    fake = " [FAKE: --dry-run]" if result["env"].get("dry_run") else ""
    gpu = (result["env"].get("gpu") or {}).get("name", "no GPU")
    lines = [f"step profile, accum {result['accum']} x 48 x 2048, {gpu}{fake}"]
    by = {(r["provider"], r["mode"]): r for r in result["runs"]}
    for mode in MODES:
        ref, ours = by.get(("reference", mode)), by.get(("ours", mode))
        if not (ref or ours):
            continue
        head = f"{mode:8s} {'family':14s} " + " ".join(
            h.rjust(int(spec.split(".")[0])) for h, spec, _ in COLUMNS
        )
        lines += ["", head, "-" * len(head)]
        for i, fam in enumerate(FAMILIES):
            pair = (ref["families"][i] if ref else None, ours["families"][i] if ours else None)
            lines.append(f"{'':8s} {fam:14s} " + " ".join(_fmt(get(*pair), spec) for _, spec, get in COLUMNS))
        lines += [_step_line(label, run) for label, run in (("reference", ref), ("ours", ours)) if run]
        if ref and ours:
            speedup = ref["timing"]["median_ms"] / ours["timing"]["median_ms"]
            lines.append(f"  step speedup, reference / ours: {speedup:.3f}x")
    return "\n".join(lines)


def _plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [f"{r['provider']}\n{r['mode']}" for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs) + 3), 5))
    bottom = [0.0] * len(runs)
    colors = plt.get_cmap("tab10")
    for i, fam in enumerate(FAMILIES):
        vals = [r["families"][i]["ms"] for r in runs]
        ax.bar(labels, vals, bottom=bottom, label=fam, color=colors(i), width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("GPU time in one step (ms)")
    env = result["env"]
    gpu = (env.get("gpu") or {}).get("name", "no GPU")
    fake = " [FAKE]" if env.get("dry_run") else ""
    ax.set_title(
        f"Where the step goes: accum {result['accum']}, {gpu} @ {env['git']['short_sha']}{fake}", fontsize=10
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
