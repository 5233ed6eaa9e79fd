"""python -m bench dist: sharded Muon and train.py's step on N GPUs against one GPU, and how much of the
communication the step waits for.

    python -m bench dist                     # N = every visible GPU (at least 2), loop off and on
    python -m bench dist --nproc 2 --quick   # fewer timed steps (the compiles dominate either way)
    python -m bench dist --dry-run           # no GPU: gloo ranks on the CPU, tiny sizes, FAKE figures

Two measurements, one after the other, each a child process of this command (NVLink multicast off):
  1 GPU    python -m bench.dist --worker: Muon.step() on the record's four banks (qo 22x512x512, kv
           22x256x512, MLP up 11x2048x512, down 11x512x2048), then train.py's step at accumulation 8
           (bench/suites/train.py build(), provider 'ours', 48 x 2048 tokens per micro-batch, the step
           of bench/profile.py with the EMA), loop off and on
  N GPUs   torchrun --nproc_per_node=N -m bench.dist --worker: the same with Muon sharded over the ranks
           (reduce-scatter -> NS on the local shard -> all-gather), the step at accumulation 8 / N (the
           same 786,432 tokens) with train.py's guard across the ranks, and on every rank three Muon
           steps and one train step under torch.profiler
Steps are timed with CUDA events, a fixed number on every rank (collectives couple the ranks, so an
adaptive repeat count like do_bench's could differ between them and hang): median and p20-p80.

Figures (OUT/dist.json, the printed table, OUT/dist.png)
  Muon speedup   t_muon(1) / t_muon(N), N the slowest rank's median
  scaling        per-GPU throughput at N over throughput at 1 = t_step(1) / (N * t_step(N)), t_step(N) the
                 slowest rank's median; the global batch is the same, so 1.0 is perfect. Target >= 0.98.
  exposed comm   GPU time in which an NCCL kernel runs and nothing else does (bench.comm), worst rank, as
                 % of the timed step t_step(N). Target <= 5%.
  8 GPUs         an ESTIMATE, not a measurement: bench.comm.estimate_scaling from the measured times and
                 the bytes each rank sends per step (bench.comm.step_volume)

Over 500 lines on purpose: the command, the worker it launches under torchrun and the figures they pass
between them are one protocol, kept in one file so that both sides change together.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

GLOBAL_ACCUM = 8  # micro-batches per step over all ranks: the record's 8 GPUs x accumulation 1
RECORD_BANKS = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
TINY_BANKS = [(4, 32, 32), (4, 16, 32), (2, 64, 32), (2, 32, 64)]  # --dry-run
MODES = {"flat": False, "looped": True}
TARGETS = {"scaling": 0.98, "exposed_pct": 5.0}
ESTIMATE_GPUS = 8
MUON_PROFILED_STEPS = 3
SCHEMA = "golfbench.dist/1"


def _settings(quick: bool, dry: bool) -> dict:
    """Untimed and timed calls. Two untimed calls compile and capture Muon's CUDA graphs (the first call
    compiles, the second captures); the model's compile happens in the first train step."""
    if dry:
        return {"train_warmup": 1, "train_steps": 2, "muon_warmup": 2, "muon_steps": 5}
    if quick:
        return {"train_warmup": 2, "train_steps": 4, "muon_warmup": 3, "muon_steps": 20}
    return {"train_warmup": 3, "train_steps": 8, "muon_warmup": 3, "muon_steps": 50}


# ---------------------------------------------------------------------------------------------------------
# Worker: one process of one measurement (no process group at 1 GPU, torchrun's at N)
# ---------------------------------------------------------------------------------------------------------


def _sync(ctx) -> None:
    import torch

    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _stats(times: list[float]) -> dict:
    s = sorted(times)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "samples_ms": times}


def _time(fn, n: int, ctx) -> dict:
    """Milliseconds of each of n calls: CUDA events around each (no host sync between calls), or the
    host clock on the CPU."""
    import torch

    _sync(ctx)
    if ctx.device.type != "cuda":
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return _stats(times)
    pairs = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(ctx.device)
    return _stats([s.elapsed_time(e) for s, e in pairs])


def _synthetic_trace(step_ms: float) -> list[dict]:
    """--dry-run (no GPU activity to profile): a compute kernel over 90% of the step and an NCCL kernel
    over the last 10%, half of it under the compute. FAKE, so the parsing path runs end to end."""
    us = 1e3 * step_ms
    return [
        {"ph": "X", "cat": "kernel", "name": "fake_compute_kernel", "pid": 0, "ts": 0.0, "dur": 0.9 * us},
        {
            "ph": "X",
            "cat": "kernel",
            "name": "ncclDevKernel_fake",
            "pid": 0,
            "ts": 0.85 * us,
            "dur": 0.1 * us,
        },
    ]


def _profile(fn, calls: int, ctx, name: str) -> tuple[list[dict], bool]:
    """Events of `calls` calls under torch.profiler (the trace is kept under ctx.trace_dir if asked);
    on the CPU, the synthetic trace instead. Returns (events, synthetic)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.profile import load_trace

    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(ctx)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(ctx.device)
    elapsed_ms = 1e3 * (time.perf_counter() - t0)
    path = Path(ctx.trace_dir) / f"trace-{name}-world{ctx.world}-rank{ctx.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    events = load_trace(path)
    if ctx.keep_traces:  # open in https://ui.perfetto.dev
        with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
    path.unlink()
    if not cuda:
        return _synthetic_trace(elapsed_ms), True
    return events, False


def _comm(events: list[dict], synthetic: bool, ctx) -> dict:
    from bench.comm import exposed_communication

    per_device = exposed_communication(events)
    key = ctx.device.index if ctx.device.type == "cuda" and ctx.device.index in per_device else None
    r = per_device[key] if key is not None else next(iter(per_device.values()))
    return {**r, "synthetic": synthetic}


def measure_muon(ctx) -> dict:
    """Muon.step() on the four banks (sharded when the process group has several ranks); each rank's
    gradients differ, the initial weights are the same on every rank."""
    import torch

    from bench.harness import free_cuda_memory
    from optim import Muon

    shapes = TINY_BANKS if ctx.dry else RECORD_BANKS
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(ctx.device)) for s in shapes]
    gen = torch.Generator().manual_seed(1 + ctx.rank)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(ctx.device)
    opt = Muon(params, lr=0.022, weight_decay=0.095)
    for _ in range(ctx.settings["muon_warmup"]):
        opt.step()
    out = {
        "banks": shapes,
        "sharded": ctx.world > 1,
        "timing": _time(opt.step, ctx.settings["muon_steps"], ctx),
    }
    if ctx.world > 1:
        events, synthetic = _profile(opt.step, MUON_PROFILED_STEPS, ctx, "muon")
        out["comm"] = _comm(events, synthetic, ctx)
    del opt, params
    free_cuda_memory()
    return out


class _FixedBatches:
    """Stands in for train.Batches: the same micro-batches every step, already on the device."""

    def __init__(self, batches):
        self.batches = batches

    def next(self, j: int, device):
        return self.batches[j]


def _cpu_build(accum: int) -> SimpleNamespace:
    """What bench/suites/train.py build() gives, for --dry-run: the tiny preset on the CPU (reference
    kernels, eager), 2 x 128 tokens per micro-batch."""
    import torch

    from model.run.report import Logger
    from model.run_config import resolve_config
    from model.train_step import build_model
    from optim.distributed import Dist
    from optim.optimizers import Optimizers

    device, seqs, seq_len = torch.device("cpu"), 2, 128
    cli = {"grad_accum_steps": accum, "train_batch_tokens": accum * seqs * seq_len, "kernels": "torch"}
    cfg = resolve_config("tiny", env={}, cli={**cli, "compile": "off"})
    model = build_model(cfg, device)
    opts = Optimizers(model, cfg, device)
    opts.set_schedule(1.0, cfg.muon_momentum)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [
        tuple(torch.randint(0, vocab, (seqs, seq_len), generator=gen) for _ in range(2)) for _ in range(accum)
    ]
    return SimpleNamespace(
        cfg=cfg, model=model, model_c=model, opts=opts, batches=_FixedBatches(batches), accum=accum,
        device=device, pd=Dist(device=device), log=Logger(None, main=False),
    )  # fmt: skip


def measure_train(ctx, modes: list[str]) -> dict:
    """train.py's step at accumulation GLOBAL_ACCUM / world in each loop mode: warm-up (compilation),
    timed steps, and at several ranks one profiled step."""
    import torch

    from bench.profile import annotated_step, breakdown
    from optim.distributed import Dist
    from optim.ema import EMA

    accum = GLOBAL_ACCUM // ctx.world
    if ctx.dry:
        r = _cpu_build(accum)
    else:
        from bench.suites.train import build

        r = build("ours", accum)
    r.pd = Dist(ctx.rank, ctx.world, ctx.local_rank, ctx.device)  # the guard reduces across ranks
    step = annotated_step(r, EMA(r.model, r.cfg.ema_decay))
    dims = {"mlp_hidden": r.model.config.mlp_hidden, "vocab_size": r.model.config.vocab_size}
    micro_tokens = r.batches.batches[0][0].numel()
    out = {
        "accum": accum,
        "tokens_per_step": ctx.world * accum * micro_tokens,
        "banks": [tuple(p.shape) for p in r.opts.banks],
        "replicated": [(p.numel(), p.element_size()) for p in r.opts.replicated],
        "modes": {},
    }
    for mode in modes:
        r.model.set_looping(MODES[mode])
        t0 = time.perf_counter()
        for _ in range(ctx.settings["train_warmup"]):
            step()
        _sync(ctx)
        warm_s = time.perf_counter() - t0
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        entry = {"warmup_s": warm_s, "timing": _time(step, ctx.settings["train_steps"], ctx)}
        if ctx.device.type == "cuda":
            entry["peak_mem_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
        if ctx.world > 1:
            events, synthetic = _profile(step, 1, ctx, f"train-{mode}")
            entry["comm"] = _comm(events, synthetic, ctx)
            entry["families_ms"] = breakdown(events, dims)["families_ms"]
        out["modes"][mode] = entry
    return out


def worker(argv=None) -> int:
    import torch

    from optim.distributed import setup_processes

    p = argparse.ArgumentParser(prog="python -m bench.dist --worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--result", required=True, help="JSON file rank 0 writes")
    p.add_argument("--modes", default="flat,looped")
    p.add_argument("--parts", default="muon,train")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--keep-traces", action="store_true")
    args = p.parse_args(argv)
    pd = setup_processes("cpu" if args.dry_run else "cuda")  # train.py's process setup
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
        torch.backends.cudnn.allow_tf32 = True
    ctx = SimpleNamespace(
        rank=pd.rank, world=pd.world, local_rank=pd.local_rank, device=pd.device, dry=args.dry_run,
        settings=_settings(args.quick, args.dry_run), keep_traces=args.keep_traces,
        trace_dir=args.trace_dir or str(Path(args.result).parent),
    )  # fmt: skip
    world, rank = pd.world, pd.rank
    try:
        parts = args.parts.split(",")
        result = {"rank": rank, "world": world, "device": str(pd.device), "settings": ctx.settings}
        if not args.dry_run:
            result["gpu"] = torch.cuda.get_device_name(pd.device)
        if "muon" in parts:
            print(f"[bench dist] world {world} rank {rank}: Muon.step()", flush=True)
            result["muon"] = measure_muon(ctx)
        if "train" in parts:
            print(f"[bench dist] world {world} rank {rank}: train step (compiles each loop mode)", flush=True)
            result["train"] = measure_train(ctx, args.modes.split(","))
        results = pd.all_gather_object(result)
        if pd.main:
            Path(args.result).write_text(json.dumps({"world": world, "ranks": results}, default=str) + "\n")
        pd.barrier()
    finally:
        pd.close()
    return 0


# ---------------------------------------------------------------------------------------------------------
# The command: launch, summarise, report
# ---------------------------------------------------------------------------------------------------------


def _worst(values, key: str) -> dict:
    """The entry of the slowest rank (largest `key`)."""
    return max(values, key=lambda v: v[key])


def summarize(one: dict, many: dict, modes: list[str]) -> dict:
    """Figures from the 1-GPU result and the N-rank results (see the module docstring)."""
    from bench.comm import estimate_scaling, step_volume

    n = many["world"]
    single, ranks = one["ranks"][0], many["ranks"]
    out: dict = {"gpus": n, "targets": TARGETS}
    if "muon" in single:
        t1 = single["muon"]["timing"]
        tn = _worst([r["muon"]["timing"] for r in ranks], "median_ms")
        comm = _worst([r["muon"]["comm"] for r in ranks], "exposed_ms")
        out["muon"] = {
            "banks": single["muon"]["banks"],
            "t1": t1,
            "tn": tn,
            "per_rank_ms": [r["muon"]["timing"]["median_ms"] for r in ranks],
            "speedup": t1["median_ms"] / tn["median_ms"],
            "comm": comm,
        }
    if "train" in single:
        banks, replicated = single["train"]["banks"], single["train"]["replicated"]
        volume = {g: step_volume(banks, replicated, g) for g in sorted({n, ESTIMATE_GPUS})}
        out["volume_bytes"] = {str(g): v for g, v in volume.items()}
        out["train"] = {}
        for mode in modes:
            t1 = single["train"]["modes"][mode]["timing"]
            per_rank = [r["train"]["modes"][mode] for r in ranks]
            tn = _worst([r["timing"] for r in per_rank], "median_ms")
            comm = _worst([r["comm"] for r in per_rank], "exposed_ms")
            scaling = t1["median_ms"] / (n * tn["median_ms"])
            exposed_pct = 100.0 * comm["exposed_ms"] / tn["median_ms"]
            estimate = estimate_scaling(
                t1["median_ms"], tn["median_ms"], n, comm["exposed_ms"], volume[n]["total"],
                ESTIMATE_GPUS, volume[ESTIMATE_GPUS]["total"],
            )  # fmt: skip
            out["train"][mode] = {
                "t1": t1,
                "tn": tn,
                "per_rank_ms": [r["timing"]["median_ms"] for r in per_rank],
                "tokens_per_step": single["train"]["tokens_per_step"],
                "scaling": scaling,
                "scaling_pass": scaling >= TARGETS["scaling"],
                "comm": comm,
                "exposed_pct_of_step": exposed_pct,
                "exposed_pass": exposed_pct <= TARGETS["exposed_pct"],
                "families_ms": [r.get("families_ms") for r in per_rank],
                "warmup_s": {"1": single["train"]["modes"][mode]["warmup_s"],
                             str(n): max(r["warmup_s"] for r in per_rank)},
                "estimate": estimate,
            }  # fmt: skip
    return out


def _ms(t: dict) -> str:
    return f"{t['median_ms']:.3f} ({t['p20_ms']:.3f}-{t['p80_ms']:.3f})"


MODE_NAMES = {"flat": "loop off", "looped": "loop on"}


def format_table(result: dict) -> str:
    s, env = result["summary"], result["env"]
    n = s["gpus"]
    gpu = (env.get("gpu") or {}).get("name") or "CPU"
    fake = "  [FAKE: --dry-run, gloo ranks on the CPU, tiny sizes]" if env.get("dry_run") else ""
    lines = [f"bench dist: {n} x {gpu} against 1, git {env['git']['short_sha']}{fake}", ""]
    row = lambda what, a, b, figure: f"{what:24s} {a:>28s} {b:>28s}   {figure}"  # noqa: E731
    lines.append(row("", "1 GPU ms (p20-p80)", f"{n} GPUs ms (slowest rank)", "figure"))
    if "muon" in s:
        m = s["muon"]
        lines.append(row("Muon.step(), 4 banks", _ms(m["t1"]), _ms(m["tn"]), f"speedup {m['speedup']:.2f}x"))
    for mode, t in s.get("train", {}).items():
        verdict = "PASS" if t["scaling_pass"] else "MISS"
        figure = f"scaling {t['scaling']:.3f} (target >= {TARGETS['scaling']}: {verdict})"
        lines.append(row(f"train step, {MODE_NAMES[mode]}", _ms(t["t1"]), _ms(t["tn"]), figure))
    comm_row = lambda what, c, pct, note: (  # noqa: E731
        f"{what:24s} {c['comm_ms']:10.3f} {c['exposed_ms']:11.3f} {pct:9.2f}%  {note}"
    )
    lines += ["", f"{'communication, worst rank':24s} {'NCCL ms':>10s} {'exposed ms':>11s} {'exposed':>10s}"]
    if "muon" in s:
        c = s["muon"]["comm"]
        lines.append(comm_row(f"Muon.step() x{MUON_PROFILED_STEPS}", c, c["exposed_pct"], "of the GPU span"))
    for mode, t in s.get("train", {}).items():
        verdict = "PASS" if t["exposed_pass"] else "MISS"
        note = f"of the step (target <= {TARGETS['exposed_pct']}%: {verdict})"
        lines.append(comm_row(f"train step, {MODE_NAMES[mode]}", t["comm"], t["exposed_pct_of_step"], note))
    if "volume_bytes" in s:
        parts = []
        for g, v in s["volume_bytes"].items():
            detail = ", ".join(
                f"{k} {v[k] / 1e6:.1f}" for k in ("reduce_scatter", "all_gather", "all_reduce")
            )
            parts.append(f"{g} GPUs {v['total'] / 1e6:.1f} MB ({detail})")
        lines += ["", "bytes each rank sends per step: " + "; ".join(parts)]
        lines.append(f"{ESTIMATE_GPUS} GPUs, ESTIMATE (not measured; bench.comm.estimate_scaling):")
        for mode, t in s["train"].items():
            e = t["estimate"]
            lines.append(
                f"  {MODE_NAMES[mode]}: step ~{e['step_ms']:.1f} ms, scaling ~{e['scaling']:.3f} "
                f"(per-rank overhead {e['overhead_ms']:.1f} ms + exposed comm {e['exposed_comm_ms']:.2f} ms, "
                f"the measured exposure scaled with the bytes); with comm = wire time at "
                f"{e['link_gbps']:.0f} GB/s, none hidden: ~{e['scaling_wire']:.3f}"
            )
    return "\n".join(lines)


def _plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, env = result["summary"], result["env"]
    train = s.get("train", {})
    if not train:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    modes = list(train)
    ax1.bar(modes, [train[m]["scaling"] for m in modes], color="tab:blue", width=0.5)
    ax1.axhline(TARGETS["scaling"], ls="--", color="tab:red", label=f"target {TARGETS['scaling']}")
    ax1.axhline(1.0, ls=":", color="gray")
    values = [train[m]["scaling"] for m in modes]
    ax1.set_ylim(min(0.8, *values) - 0.02, max(1.05, *values) + 0.02)
    ax1.set_ylabel(f"scaling 1 -> {s['gpus']} GPUs")
    ax1.legend(loc="lower right")
    hidden = [train[m]["comm"]["hidden_ms"] for m in modes]
    exposed = [train[m]["comm"]["exposed_ms"] for m in modes]
    ax2.bar(modes, hidden, label="NCCL, hidden under compute", color="tab:green", width=0.5)
    ax2.bar(modes, exposed, bottom=hidden, label="NCCL, exposed", color="tab:orange", width=0.5)
    ax2.set_ylabel("ms per step (worst rank)")
    ax2.legend()
    gpu = (env.get("gpu") or {}).get("name") or "CPU"
    fake = " [FAKE]" if env.get("dry_run") else ""
    fig.suptitle(f"train.py step on {s['gpus']} x {gpu} vs 1 @ {env['git']['short_sha']}{fake}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_dist(args) -> int:
    import torch

    from bench.env import collect_env, output_folder
    from bench.launch import child_env, run, torchrun_command

    env = collect_env()
    dry = args.dry_run
    if not env["cuda_available"] and not dry:
        print(f"bench dist: no CUDA GPU ({env['no_gpu_reason']}): nothing was measured.")
        print("Without GPUs, walk the whole path on gloo ranks: python -m bench dist --dry-run")
        return 2  # nothing measured is not a success
    n = args.nproc or (2 if dry else torch.cuda.device_count())  # --nproc given is >= 2 (_nproc)
    if n < 2:  # auto on a machine with one GPU
        print(f"bench dist: needs at least 2 GPUs ({n} visible); nothing was measured.")
        return 2
    now = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out) if args.out else output_folder("dist", env["git"]["short_sha"], now)
    out.mkdir(parents=True, exist_ok=True)
    modes = ["flat", "looped"] if args.modes == "both" else [args.modes]
    common = ["--worker", "--modes", ",".join(modes), "--parts", args.parts, "--trace-dir", str(out)]
    common += [
        flag
        for flag, on in (("--quick", args.quick), ("--dry-run", dry), ("--keep-traces", args.keep_traces))
        if on
    ]
    files = {1: out / "world1.json", n: out / f"world{n}.json"}
    launches = [
        (1, [sys.executable, "-m", "bench.dist", "--result", str(files[1]), *common]),
        (n, torchrun_command(n, ["-m", "bench.dist", "--result", str(files[n]), *common])),
    ]
    if dry:
        print("bench dist --dry-run: FAKE FIGURES (gloo ranks on the CPU, tiny sizes); nothing is measured")
    # On the CPU, one thread per process for both launches (torchrun sets it for its workers)
    child = child_env(OMP_NUM_THREADS=1) if dry else child_env()
    seconds = {}
    for world, cmd in launches:
        print(f"== {world} GPU(s): {' '.join(cmd)}", flush=True)
        finished = run(cmd, env=child, timeout=args.timeout, capture=False)
        seconds[str(world)] = finished.seconds
        if finished.returncode != 0 or finished.timed_out or not files[world].is_file():
            late = (
                f"timed out after {args.timeout:.0f} s"
                if finished.timed_out
                else f"exit {finished.returncode}"
            )
            print(
                f"bench dist: the {world}-GPU measurement failed ({late}); see its output above",
                file=sys.stderr,
            )
            return 1
    one, many = (json.loads(files[w].read_text()) for w in (1, n))
    env.update(dry_run=dry, quick=args.quick, timestamp=now.isoformat(timespec="seconds"),
               command=" ".join(["python -m bench", *sys.argv[1:]]))  # fmt: skip
    result = {
        "schema": SCHEMA,
        "env": env,
        "settings": one["ranks"][0]["settings"],
        "launch_seconds": seconds,
        "summary": summarize(one, many, modes),
        "world1": one,
        f"world{n}": many,
    }
    (out / "dist.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    _plot(out / "dist.png", result)
    print()
    print(format_table(result))
    took = ", ".join(f"{k} GPU(s) {v:.0f} s" for k, v in seconds.items())
    print(f"\nwrote {out}/dist.json and dist.png (launches: {took})")
    return 0


def _nproc(value: str) -> int:
    """--nproc: 2 or more (N GPUs are compared with 1; 0 used to fall back to 2 silently)."""
    n = int(value) if value.lstrip("-").isdigit() else 0
    if n < 2:
        raise argparse.ArgumentTypeError(
            f"{value}: bench dist needs at least 2 processes (it compares N GPUs with 1); "
            "leave --nproc out to use every visible GPU"
        )
    return n


def add_parser(sub) -> None:
    from bench.env import out_folder_arg

    p = sub.add_parser(
        "dist", help="sharded Muon and train.py's step on N GPUs vs 1 (torchrun), exposed comm"
    )
    p.add_argument("--nproc", type=_nproc, default=None, help="GPUs, at least 2 (default: all visible)")
    p.add_argument(
        "--modes", choices=("flat", "looped", "both"), default="both", help="loop mode(s) of the step"
    )
    p.add_argument("--parts", default="muon,train", help="comma-separated: muon,train (default both)")
    p.add_argument("--quick", action="store_true", help="fewer timed steps")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds for each of the two launches")
    p.add_argument("--keep-traces", action="store_true", help="keep the profiled traces under --out")
    p.add_argument(
        "--out", type=out_folder_arg, help="output folder (default runs/bench/dist-<UTC time>-<git sha>/)"
    )
    p.add_argument("--dry-run", action="store_true", help="no GPU: gloo ranks on the CPU, tiny sizes, FAKE")
    p.set_defaults(func=run_dist)


if __name__ == "__main__":
    if "--worker" not in sys.argv[1:]:
        sys.exit("bench.dist: run `python -m bench dist` (this module is its worker with --worker)")
    sys.exit(worker())
