"""Timing, ceilings and the record of one (case, provider) measurement.

Every time is `triton.testing.do_bench` (or `do_bench_cudagraph` for microsecond kernels) with
return_mode="all": one timing call returns every per-call time, the median is reported with its
p20-p80 spread (never the mean), and up to MAX_SAMPLES of the raw times are kept in the record
(`samples_ms`) so that two runs can be compared with their spread (bench/compare.py).
do_bench flushes L2 before each call, so bandwidth figures are HBM figures. Each figure is also a
ratio: speedup against the case's baseline timed in the same run, and % of the two ceilings
(an 8192^3 bf16 matmul and a large device-to-device copy) measured at the start of the run.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from bench.registry import SUITES, Case, Provider

QUANTILES = [0.5, 0.2, 0.8]
# Raw per-call times kept per record. do_bench takes ~100 ms of calls: tens of thousands for a 5 us
# kernel, ~10 for a training step. The quantiles come from all of them; the record keeps an evenly
# spaced subsample in time order (enough for a bootstrap of the median, ~5 KB of JSON per record).
MAX_SAMPLES = 256

CEILING_MATMUL_N = 8192
CEILING_COPY_BYTES = 2 * 2**30  # 2 GiB read + 2 GiB written: far past L2, launch cost negligible

# Fake numbers for --dry-run: plausible H100 figures so tables and plots look like real ones.
FAKE_MATMUL_TFLOPS = 750.0
FAKE_COPY_GBPS = 3000.0


@dataclass(frozen=True)
class Timing:
    """do_bench settings: warm-up and measured repetition time per provider in ms, and the fewest timed
    calls (a 1-second training step would otherwise be timed once, with no spread to report)."""

    warmup_ms: int = 25
    rep_ms: int = 100
    min_samples: int = 10

    @classmethod
    def for_mode(cls, quick: bool) -> Timing:
        return cls(10, 40, 5) if quick else cls()


# The ceilings' timing: long enough that both ceilings are stable; quick runs take a shorter look.
CEILING_TIMING = Timing(warmup_ms=50, rep_ms=300)
QUICK_CEILING_TIMING = Timing(warmup_ms=10, rep_ms=60)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default; triton.testing's too)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def thin(samples: list[float], cap: int = MAX_SAMPLES) -> list[float]:
    """At most `cap` of `samples`, evenly spaced in time order (first and last kept)."""
    n = len(samples)
    if n <= cap:
        return list(samples)
    return [samples[round(i * (n - 1) / (cap - 1))] for i in range(cap)]


def summarize(samples: list[float]) -> dict:
    """The timing fields of a record from raw per-call times in ms: median, p20, p80 over all of
    them, `n_samples`, and `samples_ms` (thinned to MAX_SAMPLES, 6 significant digits)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("no timing samples")
    ordered = sorted(values)
    return {
        "median_ms": quantile(ordered, 0.5),
        "p20_ms": quantile(ordered, 0.2),
        "p80_ms": quantile(ordered, 0.8),
        "n_samples": len(values),
        "samples_ms": [float(f"{v:.6g}") for v in thin(values)],
    }


def bench_ms(fn: Callable[[], object], *, cuda_graph: bool = False, timing: Timing = Timing()) -> dict:
    """Time `fn` once with do_bench over at least ``timing.min_samples`` calls; `summarize`'s fields.

    return_mode="all" hands back every per-call time (do_bench ignores return_mode when quantiles
    are given, so none are): the quantiles and the kept samples come from the same calls.
    do_bench_cudagraph returns 10 samples, each the mean of one replay of ~rep_ms of unrolled calls."""
    from triton.testing import do_bench, do_bench_cudagraph

    if cuda_graph:
        samples = do_bench_cudagraph(fn, rep=timing.rep_ms, return_mode="all")
    else:
        # do_bench repeats rep_ms / (its own estimate) times: stretch rep_ms for long calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep_ms = max(timing.rep_ms, timing.min_samples * start.elapsed_time(end))
        samples = do_bench(fn, warmup=timing.warmup_ms, rep=rep_ms, return_mode="all")
    return summarize(samples)


def compile_cache_state() -> dict:
    """torch.compile's persistent caches before this run (files_at_start 0: a cold start that compiles
    everything; the quick budget assumes ~cold). Within a run, a graph compiled for one case is reused
    by any other that traces to the same graph; across runs on one machine (and the rounds of
    `bench compare --revs`) the caches skip most compilation. Compilation is never part of a timing."""
    from model.train_step import compile_cache

    try:
        state = compile_cache()
    except Exception as exc:  # another torch: report, never fail a run over it
        return {"error": f"{type(exc).__name__}: {exc}"}
    keys = ("inductor_dir", "fx_graph_cache", "autograd_cache")
    return {**{k: state[k] for k in keys}, "files_at_start": state["files"]}


def free_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_ceilings(*, fake: bool = False, timing: Timing = CEILING_TIMING) -> dict:
    """Compute and bandwidth ceilings of this GPU, measured the same way as every provider."""
    n = CEILING_MATMUL_N
    flops = 2.0 * n**3
    copy_bytes = 2 * CEILING_COPY_BYTES  # read + write
    ms = lambda t: (t["median_ms"], t["p20_ms"], t["p80_ms"])
    if fake:
        mm = (flops / FAKE_MATMUL_TFLOPS / 1e9,) * 3
        cp = (copy_bytes / FAKE_COPY_GBPS / 1e6,) * 3
    else:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        mm = ms(bench_ms(lambda: torch.mm(a, b), timing=timing))
        del a, b
        free_cuda_memory()
        src = torch.randint(0, 256, (CEILING_COPY_BYTES,), device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        cp = ms(bench_ms(lambda: dst.copy_(src), timing=timing))
        del src, dst
        free_cuda_memory()
    return {
        "fake": fake,
        "matmul_shape": f"{n}x{n}x{n}",
        "matmul_ms": mm[0],
        # rate percentiles come from the opposite time percentiles: the fastest 20% of calls
        # (time p20) are the top 20% of throughput (rate p80)
        "matmul_tflops": flops / mm[0] / 1e9,
        "matmul_tflops_p20": flops / mm[2] / 1e9,
        "matmul_tflops_p80": flops / mm[1] / 1e9,
        "copy_bytes": CEILING_COPY_BYTES,
        "copy_ms": cp[0],
        "copy_gbps": copy_bytes / cp[0] / 1e6,
        "copy_gbps_p20": copy_bytes / cp[2] / 1e6,
        "copy_gbps_p80": copy_bytes / cp[1] / 1e6,
    }


def fake_samples(case: Case, provider: str, timing: Timing = Timing()) -> list[float]:
    """Deterministic stand-in for a measurement (--dry-run): per-call times in ms around a roofline
    time varied per provider, as many as do_bench would take (at least timing.min_samples, 10 for
    CUDA-graph cases), with a realistic shape: ~2% log-normal spread and a 5% tail of slow calls."""
    ideal_s = max(case.flops / (FAKE_MATMUL_TFLOPS * 1e12), case.bytes / (FAKE_COPY_GBPS * 1e9), 4e-6)
    h = zlib.crc32(f"{case.suite}/{case.label}/{provider}".encode())
    factor = 1.15 if provider == case.baseline else 0.8 + (h % 60) / 100
    center = ideal_s * 1e3 * factor
    n = 10 if case.cuda_graph else min(max(int(timing.rep_ms / center), timing.min_samples), 1000)
    rng = random.Random(h)
    samples = []
    for _ in range(n):
        slow = 1.0 + rng.uniform(0.05, 0.3) if rng.random() < 0.05 else 1.0
        samples.append(center * math.exp(rng.gauss(0.0, 0.02)) * slow)
    return samples


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Memory one steady-state call allocates at its peak, beyond what was allocated before it.

    A first, unmeasured call absorbs compilation and autotuning allocations."""
    warm = fn()
    torch.cuda.synchronize()
    del warm
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def new_record(case: Case, provider: str) -> dict:
    return {
        "suite": case.suite,
        "case": case.label,
        "provider": provider,
        "baseline": case.baseline,
        "is_baseline": provider == case.baseline,
        "params": dict(case.params),
        "x": case.x,
        "series": list(case.series),
        "flops": float(case.flops),
        "bytes": float(case.bytes),
        "cuda_graph": case.cuda_graph,
        "notes": case.notes,
        "status": "ok",
        "reason": None,
        "fake": False,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "n_samples": None,
        "samples_ms": None,
        "wall_s": None,
        "peak_mem_bytes": None,
        "tflops": None,
        "gbps": None,
        "pct_matmul_ceiling": None,
        "pct_copy_ceiling": None,
        "tokens_per_s": None,
        "speedup": None,
        "accuracy": None,
    }


def fill_rates(rec: dict, ceilings: dict) -> None:
    """Throughputs and ratios from the timing already in `rec` (speedup is set per case)."""
    ms = rec["median_ms"]
    if rec["flops"] > 0:
        rec["tflops"] = rec["flops"] / ms / 1e9
        rec["pct_matmul_ceiling"] = 100.0 * rec["tflops"] / ceilings["matmul_tflops"]
    if rec["bytes"] > 0:
        rec["gbps"] = rec["bytes"] / ms / 1e6
        rec["pct_copy_ceiling"] = 100.0 * rec["gbps"] / ceilings["copy_gbps"]
    if "tokens" in rec["params"]:
        rec["tokens_per_s"] = rec["params"]["tokens"] / (ms / 1e3)


def measure_provider(case: Case, provider: Provider, ceilings: dict, *, dry_run: bool, timing: Timing):
    """The record of one provider on one case; never raises for a provider's failure."""
    rec = new_record(case, provider.name)
    if dry_run:
        rec.update(summarize(fake_samples(case, provider.name, timing)))
        rec["fake"] = True
        fill_rates(rec, ceilings)
        return rec
    fn = None
    try:
        reason = provider.unavailable()
        if reason:
            rec.update(status="skipped", reason=str(reason))
            return rec
        if provider.check is not None:
            rec["accuracy"] = provider.check()
        fn = provider.setup()
        # CUDA-graph replays allocate from the graph's private pool, invisible to the allocator stats
        rec["peak_mem_bytes"] = None if case.cuda_graph else peak_memory_bytes(fn)
        rec.update(bench_ms(fn, cuda_graph=case.cuda_graph, timing=timing))
        fill_rates(rec, ceilings)
    except Exception as exc:  # one broken provider must not end the run
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}".strip()[:2000])
        for key in (
            "median_ms",
            "p20_ms",
            "p80_ms",
            "n_samples",
            "samples_ms",
            "tflops",
            "gbps",
            "tokens_per_s",
        ):
            rec[key] = None
    finally:
        del fn
        free_cuda_memory()
    return rec


def set_speedups(records: list[dict]) -> None:
    base = next((r for r in records if r["is_baseline"] and r["status"] == "ok"), None)
    for r in records:
        if base is not None and r["status"] == "ok":
            r["speedup"] = base["median_ms"] / r["median_ms"]


def build_cases(names: Iterable[str], quick: bool) -> list[tuple[str, list[Case] | None, str | None]]:
    """(suite, cases, error) per suite; a suite whose case builder raises gets its error instead."""
    out = []
    for name in names:
        try:
            out.append((name, list(SUITES[name].cases(quick)), None))
        except Exception as exc:
            out.append((name, None, f"{type(exc).__name__}: {exc}"))
    return out


def _chosen(case: Case, providers: set[str] | None) -> list[Provider]:
    chosen = [
        p for p in case.providers if providers is None or p.name in providers or p.name == case.baseline
    ]
    chosen.sort(key=lambda p: p.name != case.baseline)
    return chosen


def run_suites(
    names: list[str],
    *,
    quick: bool,
    dry_run: bool,
    providers: set[str] | None = None,
    ceilings: dict,
    timing: Timing,
    log: Callable[[str], None] = print,
    progress: bool | object = False,
) -> list[dict]:
    """Records for every (case, provider) of the named suites, in order; baselines first per case.

    `providers` restricts which providers run; a case's baseline is always timed so that every
    figure keeps its ratio. `progress`: a tqdm bar over every (case, provider) of the run, with the
    elapsed time and an estimate of the time left (tqdm's: recent rate x what is left, so it is rough
    while fast kernels give way to compiled models), on stderr (or on the file object given);
    the log lines still print, above the bar.
    """
    from tqdm import tqdm

    built = build_cases(names, quick)
    total = sum(len(_chosen(c, providers)) for _, cases, _ in built for c in cases or [])
    bar = tqdm(
        total=total,
        unit="run",
        file=progress if progress not in (True, False) else sys.stderr,
        disable=progress is False,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
    )

    def say(msg: str) -> None:
        if bar.disable:
            log(msg)
        else:
            with bar.external_write_mode():
                log(msg)

    records: list[dict] = []
    try:
        for suite, cases, error in built:
            if error is not None:
                say(f"[{suite}] building the cases failed: {error}")
                rec = new_record(Case(suite, "<cases()>", {}, 0.0, 0.0, [], baseline=""), provider="<none>")
                rec.update(status="error", reason=f"cases() raised {error}")
                records.append(rec)
                continue
            for case in cases:
                case_records = []
                for provider in _chosen(case, providers):
                    bar.set_description_str(f"{suite} {case.label} | {provider.name}"[:48], refresh=True)
                    t0 = time.perf_counter()
                    rec = measure_provider(case, provider, ceilings, dry_run=dry_run, timing=timing)
                    rec["wall_s"] = round(time.perf_counter() - t0, 3)
                    case_records.append(rec)
                    if rec["status"] == "ok":
                        what = f"{rec['median_ms']:.4f} ms (p20-p80 {rec['p20_ms']:.4f}-{rec['p80_ms']:.4f})"
                        if rec["tokens_per_s"]:
                            what += f" {rec['tokens_per_s']:,.0f} tok/s"
                    else:
                        what = f"{rec['status']}: {rec['reason']}"
                    say(f"[{suite}] {case.label} | {provider.name}: {what} ({rec['wall_s']:.1f} s)")
                    bar.update(1)
                set_speedups(case_records)
                records.extend(case_records)
    finally:
        bar.close()
    return records


def wall_by_suite(records: list[dict]) -> dict[str, float]:
    """Seconds each suite took (setup, compilation, warm-up and timing of its providers)."""
    out: dict[str, float] = {}
    for r in records:
        out[r["suite"]] = round(out.get(r["suite"], 0.0) + (r.get("wall_s") or 0.0), 2)
    return out
