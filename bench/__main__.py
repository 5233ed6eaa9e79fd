"""python -m bench env | run | plot | gate | compare | profile | check | dist

python -m bench env [--measure-ceilings] [--json]      what this machine is (and its ceilings)
python -m bench run [SUITE ...] [--quick] [--dry-run]  time suites -> runs/bench/<time>-<sha>/ JSON + CSV
python -m bench plot RESULTS.json ... [--out DIR]      PNGs per suite and metric
python -m bench gate [--update] [--threshold PCT]      pytest-benchmark regression gate (GPU)
python -m bench compare BASE.json HEAD.json            A/B verdicts: faster / slower / within noise
python -m bench compare --revs REV_A REV_B [SUITE ...] the same for two revisions, run alternately here
python -m bench profile [--accum N] [--looping MODE]   where one train.py step goes (torch.profiler)
python -m bench check [--json FILE]                    prove our kernels on this GPU before training
python -m bench dist [--nproc N] [--quick] [--dry-run] sharded Muon and train.py's step on N GPUs vs 1
python -m bench parity --revs REV_A REV_B [--steps N]  train.py's loss curve at two revisions, step by step
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

# Only what the parser needs is imported here: torch, the harness and the suites take seconds to import,
# and `--help` or a mistyped flag must answer at once. Each command imports what it runs.
from bench.env import out_folder_arg


def cmd_env(args) -> int:
    import torch

    from bench import harness
    from bench.env import collect_env, format_env

    env = collect_env()
    if args.measure_ceilings:
        if torch.cuda.is_available():
            env["ceilings"] = harness.measure_ceilings()
        else:
            env["ceilings_skipped"] = f"needs a CUDA GPU ({env['no_gpu_reason']})"
    if args.json:
        print(json.dumps(env, indent=1))
        return 0
    print(format_env(env))
    if env["gpu"] is None:
        skipped = "GPU name, SMs, L2, driver, datasheet peaks"
        if args.measure_ceilings:
            skipped += ", the matmul and copy ceilings"
        print(f"skipped       {skipped}: no CUDA GPU ({env['no_gpu_reason']})")
    return 0


def _load_suites(names: list[str]) -> list[str] | None:
    from bench.registry import suite_modules

    known = suite_modules()  # a suite is named like its module: an unknown name is refused before any import
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"bench run: unknown suite(s) {unknown}; registered: {', '.join(known)}", file=sys.stderr)
        return None
    import bench.suites  # noqa: F401  (registers every suite)
    from bench.registry import SUITES

    return names or sorted(SUITES)


def _explain_no_gpu(names: list[str], quick: bool, reason: str) -> None:
    from bench import harness

    print(f"bench run: no CUDA GPU ({reason}): NOTHING WAS TIMED and no results were written.")
    print("Skipped (suite: cases -> why):")
    for suite, cases, error in harness.build_cases(names, quick):
        if error:
            print(f"  {suite}: building its cases failed: {error}")
            continue
        reasons = {}
        for case in cases:
            for p in case.providers:
                try:
                    why = p.unavailable() or "needs a CUDA GPU to time"
                except Exception as exc:
                    why = f"unavailable() raised {type(exc).__name__}: {exc}"
                reasons.setdefault(why, set()).add(p.name)
        labels = ", ".join(c.label for c in cases)
        print(f"  {suite}: {len(cases)} case(s) [{labels}]")
        for why, provs in sorted(reasons.items()):
            print(f"      {', '.join(sorted(provs))}: {why}")
    print(
        "To walk every suite end to end without a GPU (fake timings, JSON + CSV written):\n"
        "    python -m bench run --dry-run"
    )


def cmd_run(args) -> int:
    start = time.perf_counter()
    names = _load_suites(args.suites)
    if names is None:
        return 2
    from bench import harness
    from bench.env import collect_env, output_folder
    from bench.registry import SUITES

    providers = set(args.providers.split(",")) if args.providers else None
    env = collect_env()
    if not env["cuda_available"] and not args.dry_run:
        _explain_no_gpu(names, args.quick, env["no_gpu_reason"])
        return 2  # nothing timed is not a success
    now = dt.datetime.now(dt.timezone.utc)
    timing = harness.Timing.for_mode(args.quick)
    env.update(
        dry_run=args.dry_run,
        quick=args.quick,
        suites=names,
        suite_versions={n: SUITES[n].version for n in names},
        providers=sorted(providers) if providers else None,
        timestamp=now.isoformat(timespec="seconds"),
        timing={
            "method": "triton.testing.do_bench(return_mode='all')",
            "quantiles": harness.QUANTILES,
            "max_samples": harness.MAX_SAMPLES,
            **vars(timing),
        },
        command=" ".join(["python -m bench", *sys.argv[1:]]),
        compile_cache=harness.compile_cache_state(),
    )
    if args.dry_run:
        print("bench run --dry-run: FAKE TIMINGS; providers are not set up and nothing is measured")
    else:
        print("measuring the ceilings (8192^3 bf16 matmul, 2 GiB device copy) ...", flush=True)
    t0 = time.perf_counter()
    ceiling_timing = harness.QUICK_CEILING_TIMING if args.quick else harness.CEILING_TIMING
    env["ceilings"] = harness.measure_ceilings(fake=args.dry_run, timing=ceiling_timing)
    ceilings_s = time.perf_counter() - t0
    c = env["ceilings"]
    fake = " (FAKE)" if c["fake"] else ""
    print(f"ceilings: {c['matmul_tflops']:.1f} TFLOP/s, {c['copy_gbps']:.1f} GB/s{fake}")
    log = lambda msg: print(msg, flush=True)
    records = harness.run_suites(
        names,
        quick=args.quick,
        dry_run=args.dry_run,
        providers=providers,
        ceilings=c,
        timing=timing,
        log=log,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    per_suite = harness.wall_by_suite(records)
    env["wall_s"] = {
        "run": round(time.perf_counter() - start, 1),
        "ceilings": round(ceilings_s, 1),
        "suites": per_suite,
    }
    if providers:
        known = {r["provider"] for r in records}
        for p in sorted(providers - known):
            print(f"note: no case has a provider named {p!r}")

    from bench.resultsfile import format_table, make_results, write_results

    results = make_results(env, records)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else output_folder("", env["git"]["short_sha"], now)
    stem = "results" if not (out / "results.json").exists() else f"results-{stamp}"
    json_path, csv_path = write_results(results, out, stem)
    print(f"wrote {json_path} and {csv_path}")
    errors = [r for r in records if r["status"] == "error"]
    for r in errors:
        print(f"ERROR {r['suite']}/{r['case']}/{r['provider']}: {r['reason']}")
    print()
    print(format_table(results))
    print(
        f"\nwall time: {env['wall_s']['run']:.1f} s after start-up (ceilings {ceilings_s:.1f} s; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in per_suite.items())
        + f"; compile cache {'warm' if env['compile_cache'].get('files_at_start') else 'cold'} at the start)"
    )
    return 1 if errors else 0


def cmd_plot(args) -> int:
    from bench.plot import plot_results, results_files

    try:
        files, broken = results_files(args.results)
        out = Path(args.out) if args.out else files[0].parent / "plots"
        written = plot_results(files, out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"bench plot: {exc}", file=sys.stderr)
        return 2
    for why in broken:
        print(f"bench plot: left out {why}", file=sys.stderr)
    for p in written:
        print(p)
    if not written:
        print("bench plot: no successful records to plot (all skipped or errors?)", file=sys.stderr)
        return 1
    return 0


def cmd_gate(args) -> int:
    from bench.gate import derive_threshold, run_gate

    kwargs = {"baselines": args.baselines} if args.baselines else {}
    if args.derive_threshold:
        return derive_threshold(*args.derive_threshold, force=args.force, **kwargs)
    return run_gate(update=args.update, threshold=args.threshold, **kwargs)


def cmd_compare(args) -> int:
    if args.revs:
        names = _load_suites(args.args)
        if names is None:
            return 2
        from bench.revs import run_revs

        return run_revs(
            *args.revs,
            args.args,  # as given: an empty list runs every suite each revision has
            rounds=args.rounds,
            quick=args.quick,
            dry_run=args.dry_run,
            providers=args.providers,
            out=args.out,
            threshold_pct=args.threshold,
            confidence=args.confidence,
            force=args.force,
            baselines=args.baselines,
        )
    from bench.compare import run_compare

    if len(args.args) != 2 or args.rounds != 2 or args.quick or args.dry_run or args.providers:
        print(
            "bench compare: give two results files (BASE.json HEAD.json), or --revs REV_A REV_B [SUITE ...]; "
            "--rounds, --quick, --dry-run and --providers go with --revs",
            file=sys.stderr,
        )
        return 2
    return run_compare(
        *args.args,
        threshold_pct=args.threshold,
        out=args.out,
        force=args.force,
        confidence=args.confidence,
        baselines=args.baselines,
    )


def cmd_profile(args) -> int:
    from bench.profile import run_profile

    return run_profile(args)


def cmd_parity(args) -> int:
    from bench.env import output_folder
    from bench.parity import run_parity

    out = Path(args.out) if args.out else output_folder("parity", f"{args.revs[0]}-{args.revs[1]}")
    try:
        return run_parity(*args.revs, steps=args.steps, looped=args.looped, preset=args.preset, out=out,
                          tol=args.tol)  # fmt: skip
    except ValueError as exc:
        print(f"bench parity: {exc}", file=sys.stderr)
        return 2


def cmd_check(args) -> int:
    import torch

    from model.run.preflight import check_kernels, format_table

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    result = check_kernels(device, timed=not args.no_time)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    bad = [r["kernel"] for r in result["kernels"] if r["status"] == "fail"]
    if bad:
        print(f"bench check: FAILED: {', '.join(bad)} (train.py would run their references instead)")
        return 1
    skipped = [r for r in result["kernels"] if r["status"] == "skipped"]
    if not skipped:
        return 0
    names = ", ".join(r["kernel"] for r in skipped)
    if device.type == "cuda":  # this GPU cannot run them: train.py runs the references (a note, as before)
        print(f"bench check: not proven: {names} did not run ({skipped[0]['reason']})")
        return 0
    # CPU without the interpreter: our Triton kernels did not run at all (only Muon's CPU path did);
    # exit 2 like bench gate on CPU, not 0 as if they had been proven
    print(
        f"bench check: NOT PROVEN: {names} did not run ({skipped[0]['reason']}); run it on the GPU "
        "machine, or TRITON_INTERPRET=1 python -m bench check to run them in the Triton interpreter",
        file=sys.stderr,
    )
    return 2


def _confidence(value: str) -> float:
    """--confidence: a level strictly between 0 and 1 (else numpy's quantile error, naming no option)."""
    try:
        c = float(value)
    except ValueError:
        c = float("nan")
    if not 0.0 < c < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1 (exclusive); e.g. 0.95")
    return c


def build_parser() -> argparse.ArgumentParser:
    from bench.noise import BASELINES_DIR, DEFAULT_THRESHOLD_PCT

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="describe the machine: GPU, SMs, L2, driver, versions, git sha, peaks")
    p.add_argument(
        "--measure-ceilings", action="store_true", help="time an 8192^3 bf16 matmul and a 2 GiB copy"
    )
    p.add_argument("--json", action="store_true", help="print the environment as JSON")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("run", help="time benchmark suites; writes JSON + CSV and prints a table")
    p.add_argument("suites", nargs="*", help="suites to run (default: all registered)")
    p.add_argument(
        "--out", type=out_folder_arg, help="output folder (default runs/bench/<UTC time>-<git sha>/)"
    )
    p.add_argument("--dry-run", action="store_true", help="no GPU: build every case, fake timings (marked)")
    p.add_argument("--quick", action="store_true", help="fewer cases and shorter timing")
    p.add_argument(
        "--providers", help="comma-separated providers to time (each case's baseline is always timed)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is no TTY)"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plot", help="PNG plots from results JSON files")
    p.add_argument("results", nargs="+", help="results JSON files or folders (several: overlaid)")
    p.add_argument(
        "--out", type=out_folder_arg, help="output folder (default: <folder of the first file>/plots)"
    )
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("gate", help="perf regression gate over tests/perf (pytest-benchmark, GPU)")
    p.add_argument("--update", action="store_true", help="store the timings as this GPU's new baseline")
    p.add_argument(
        "--threshold",
        type=int,
        help="fail when a median is more than this many percent slower (default: this GPU's "
        f"<baselines>/<gpu>/threshold.json, else {DEFAULT_THRESHOLD_PCT})",
    )
    p.add_argument("--baselines", help=f"baseline folder (default {BASELINES_DIR})")
    p.add_argument(
        "--derive-threshold",
        nargs=2,
        metavar=("RUN1.json", "RUN2.json"),
        help="write this GPU's noise threshold from two `bench run` results of one revision",
    )
    p.add_argument("--force", action="store_true", help="with --derive-threshold: accept mismatched runs")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser(
        "compare",
        help="A/B verdicts (faster / slower / within noise) for two results files or two revisions",
        description="Compare BASE.json with HEAD.json, or run two revisions alternately on this machine "
        "(--revs) and compare them. Exit 1 when a record is slower beyond the noise threshold, "
        "2 when the runs cannot be compared. Method: bench/compare.py.",
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="FILE_OR_SUITE",
        help="BASE.json HEAD.json; with --revs: the suites to run (default: all)",
    )
    p.add_argument(
        "--revs", nargs=2, metavar=("REV_A", "REV_B"), help="two git revisions: A = base, B = head"
    )
    p.add_argument("--rounds", type=int, default=2, help="with --revs: runs per revision, alternating (2)")
    p.add_argument("--quick", action="store_true", help="with --revs: bench run --quick")
    p.add_argument("--dry-run", action="store_true", help="with --revs: bench run --dry-run (fake timings)")
    p.add_argument("--providers", help="with --revs: bench run --providers")
    p.add_argument(
        "--threshold",
        type=float,
        help="noise threshold in percent for every suite (default: per suite from "
        f"<baselines>/<gpu>/threshold.json, else {DEFAULT_THRESHOLD_PCT})",
    )
    p.add_argument(
        "--confidence", type=_confidence, default=0.95, help="bootstrap interval level, 0 < c < 1 (0.95)"
    )
    p.add_argument("--baselines", help=f"where the threshold files are (default {BASELINES_DIR})")
    p.add_argument(
        "--out", type=out_folder_arg, help="output folder (default runs/bench/compare-<UTC time>-<shas>/)"
    )
    p.add_argument("--force", action="store_true", help="compare even across GPU models, suite versions ...")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("profile", help="profile one train.py step: GPU time by family, ours vs reference")
    p.add_argument("--accum", type=int, default=8, help="micro-batches of 48 x 2048 per step (default 8)")
    p.add_argument("--looping", choices=("flat", "looped", "both"), default="both", help="loop mode(s)")
    p.add_argument("--providers", help="comma-separated: reference,ours (default both)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation; default 3)")
    p.add_argument("--steps", type=int, default=5, help="timed steps for the step time (default 5)")
    p.add_argument(
        "--out", type=out_folder_arg, help="output folder (default runs/bench/profile-<UTC time>-<git sha>/)"
    )
    p.add_argument("--dry-run", action="store_true", help="no GPU: synthetic trace, fake times (marked)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("check", help="each kernel of ours vs its reference on this GPU: errors and times")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--no-time", action="store_true", help="correctness only (no timing against references)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("parity", help="train.py's loss curves at two revisions, step by step (one seed)")
    p.add_argument("--revs", nargs=2, required=True, metavar=("REV_A", "REV_B"), help="base and head commits")
    p.add_argument("--steps", type=int, default=30, help="training steps of each run (default 30)")
    p.add_argument("--looped", action="store_true", help="depth recurrence on from step 1")
    p.add_argument("--preset", default="record", choices=("record", "tiny"), help="train.py preset")
    p.add_argument("--tol", type=float, default=0.004, help="largest allowed per-step |loss difference|")
    p.add_argument("--out", type=out_folder_arg, help="output folder (default runs/bench/parity-<time>)")
    p.set_defaults(func=cmd_parity)

    from bench.dist import add_parser

    add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
