"""Two revisions on one machine: `python -m bench compare --revs REV_A REV_B [SUITE ...]`.

Both revisions are resolved to commits and checked out (`git worktree add --detach`) into a
temporary folder; `python -m bench run SUITE ... --out DIR` then runs inside each worktree as a
subprocess of this interpreter (sys.executable, GOLFBENCH_GIT_SHA set to the revision's commit, the
worktree first on sys.path), `rounds` times per revision, alternating: A B | B A | A B | ...
Each round reverses the order of the last, so a drift of clocks or temperature that is linear in
time falls on both revisions equally (plain A B A B would put every B later than its A). Each side's
rounds are merged into one results file (samples concatenated, medians over all of them), and the
two are compared like two results files (bench/compare.py). Worktrees are removed at the end, also
after a failure or Ctrl-C.

    OUT/A/round-1/results.json ...  each run as `bench run` wrote it
    OUT/A/results.json, OUT/B/...   the merged rounds of each revision
    OUT/comparison.{txt,json,png}   the verdicts, A = base, B = head

Only flags that every revision's `bench run` knows are passed (--out, --quick, --dry-run,
--providers), so an older revision can be compared too; its records have no raw samples if it
predates them, and the verdicts then rest on the threshold alone (the comparison says so).
Compilation caches (inductor, Triton) are shared by the runs: a cache hit needs the same generated
code, so it never mixes the revisions' kernels, and compilation is not part of any timing.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import harness
from bench.compare import CONFIDENCE, default_out, make_comparison, report
from bench.env import REPO_ROOT
from bench.noise import record_key
from bench.resultsfile import make_results, read_results, write_results

SIDES = ("A", "B")


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def resolve(repo: Path, rev: str) -> str:
    """The commit sha of `rev` (a branch, tag, sha, HEAD~2 ...) in `repo`; ValueError if none."""
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RuntimeError:
        raise ValueError(f"{rev!r} is not a commit in {repo} (git rev-parse --verify {rev})") from None


def schedule(rounds: int) -> list[tuple[int, str]]:
    """(round, side) in run order: A B, then B A, then A B, ..."""
    out = []
    for k in range(1, rounds + 1):
        out += [(k, s) for s in (SIDES if k % 2 else SIDES[::-1])]
    return out


def run_command(suites, out_dir: Path, *, quick: bool, dry_run: bool, providers: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "bench", "run", *suites, "--out", str(out_dir)]
    if quick:
        cmd.append("--quick")
    if dry_run:
        cmd.append("--dry-run")
    if providers:
        cmd += ["--providers", providers]
    return cmd


def child_env(sha: str, repo: Path) -> dict:
    env = {**os.environ, "GOLFBENCH_GIT_SHA": sha, "PYTHONUNBUFFERED": "1"}
    # the worktree's packages must win: drop this checkout from PYTHONPATH (the gate puts it there)
    paths = [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != repo.resolve()
    ]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


def merge_rounds(rounds: list[dict], label: str | None = None) -> dict:
    """One results object from several runs of one revision: per record, the samples of every round
    concatenated and the median/p20/p80 over them (without samples: the median of the rounds'
    figures); a record that failed in any round keeps that failure. env: the first round's, plus
    `rounds` and each round's timestamp and ceilings (rates use the first round's ceilings)."""
    first = rounds[0]
    env = copy.deepcopy(first["env"])
    env["rounds"] = len(rounds)
    env["round_envs"] = [
        {"timestamp": r["env"].get("timestamp"), "ceilings": r["env"].get("ceilings")} for r in rounds
    ]
    if label:
        env["label"] = label
    by_round = [{record_key(r): r for r in res["records"]} for res in rounds]
    records = []
    for rec in first["records"]:
        key = record_key(rec)
        recs = [b.get(key) for b in by_round]
        merged = copy.deepcopy(rec)
        k = next((i for i, r in enumerate(recs, 1) if r is None or r["status"] != "ok"), None)
        if k is not None:
            bad = recs[k - 1]
            if bad is None:
                merged.update(status="error", reason=f"missing from round {k}")
            else:
                merged.update(status=bad["status"], reason=f"round {k}: {bad['reason']}")
            for f in ("median_ms", "p20_ms", "p80_ms", "n_samples", "samples_ms", "tflops", "gbps"):
                merged[f] = None
            merged["tokens_per_s"] = merged["speedup"] = None
        elif all(r.get("samples_ms") for r in recs):
            merged.update(harness.summarize([v for r in recs for v in r["samples_ms"]]))
            merged["samples_ms"] = [v for r in recs for v in r["samples_ms"]]  # all of them: no thinning
            merged["n_samples"] = sum(r.get("n_samples") or len(r["samples_ms"]) for r in recs)
        else:
            for f in ("median_ms", "p20_ms", "p80_ms"):
                merged[f] = harness.quantile(sorted(r[f] for r in recs), 0.5)
            merged["samples_ms"] = None
        if merged["status"] == "ok":
            merged["wall_s"] = sum(r.get("wall_s") or 0.0 for r in recs)
            harness.fill_rates(merged, env["ceilings"])
        records.append(merged)
    cases: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        cases.setdefault((r["suite"], r["case"]), []).append(r)
    for recs in cases.values():
        harness.set_speedups(recs)
    return make_results(env, records)


def _remove_worktree(repo: Path, path: Path) -> None:
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True)


def run_revs(
    rev_a: str,
    rev_b: str,
    suites: list[str],
    *,
    rounds: int = 2,
    quick: bool = False,
    dry_run: bool = False,
    providers: str | None = None,
    out: str | Path | None = None,
    threshold_pct: float | None = None,
    confidence: float = CONFIDENCE,
    force: bool = False,
    baselines=None,
    repo: Path = REPO_ROOT,
    say=print,
) -> int:
    """0 nothing slower, 1 slower (or failing only in B), 2 could not run or compare."""
    if rounds < 1:
        say("bench compare --revs: --rounds must be at least 1")
        return 2
    try:
        shas = {"A": resolve(repo, rev_a), "B": resolve(repo, rev_b)}
    except ValueError as exc:
        say(f"bench compare --revs: {exc}")
        return 2
    names = {"A": rev_a, "B": rev_b}
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            say(
                "bench compare --revs: no CUDA GPU here, so nothing could be timed. "
                "--dry-run walks the same steps with fake timings."
            )
            return 2
    out = Path(out) if out else default_out(f"{shas['A'][:10]}-{shas['B'][:10]}")
    for s in SIDES:
        say(f"{s} = {names[s]} = {shas[s]}")
    if shas["A"] == shas["B"]:
        say("both revisions are the same commit: the comparison measures noise")
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout
    if dirty:
        say(f"note: {repo} has uncommitted changes: they are in neither revision (commit to measure them)")
    tmp = Path(tempfile.mkdtemp(prefix="golfbench-revs-"))
    trees: dict[str, Path] = {}
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: Ctrl-C and failures still clean up below
        previous = None
    try:
        for s in SIDES:
            trees[s] = tmp / s
            _git(repo, "worktree", "add", "--detach", str(trees[s]), shas[s])
        results: dict[str, list[dict]] = {s: [] for s in SIDES}
        plan = schedule(rounds)
        for i, (k, s) in enumerate(plan, 1):
            run_dir = (out / s / f"round-{k}").resolve()
            cmd = run_command(suites, run_dir, quick=quick, dry_run=dry_run, providers=providers)
            say(f"=== run {i}/{len(plan)}: {s} ({names[s]} {shas[s][:10]}) round {k}: {' '.join(cmd[1:])}")
            sys.stdout.flush()  # our lines before the child's, which it writes to the same stdout
            rc = subprocess.run(cmd, cwd=trees[s], env=child_env(shas[s], repo)).returncode
            path = run_dir / "results.json"
            if not path.exists():
                say(f"bench compare --revs: the run of {s} ({names[s]}) wrote no {path} (exit code {rc})")
                return 2
            if rc != 0:
                say(f"note: the run of {s} exited with {rc} (a provider failed; its record says why)")
            results[s].append(read_results(path))
        merged = {}
        for s in SIDES:
            merged[s] = merge_rounds(results[s], label=f"{s} = {names[s]}")
            write_results(merged[s], out / s)
        comp = make_comparison(
            merged["A"],
            merged["B"],
            base_path=out / "A" / "results.json",
            head_path=out / "B" / "results.json",
            threshold_pct=threshold_pct,
            baselines=baselines,
            confidence=confidence,
            force=force,
        )
    except (RuntimeError, ValueError) as exc:
        say(f"bench compare --revs: {exc}")
        return 2
    except KeyboardInterrupt:
        say("bench compare --revs: interrupted; removing the worktrees")
        return 130
    finally:
        for path in trees.values():
            _remove_worktree(repo, path)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return report(comp, out, say)
