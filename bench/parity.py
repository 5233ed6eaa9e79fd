"""Same training, two revisions: `python -m bench parity --revs REV_A REV_B [--steps 30] [--looped]`.

A kernel that changes the loss curve is a bug, not a speed-up. Each revision is checked out into a
temporary worktree (as `bench compare --revs` does) and runs `train.py --train-only` for `steps`
steps from one seed, with the same config and data; the per-step training losses of the two runs
(metrics.jsonl) are compared, and the verdict is PASS when every |loss_B - loss_A| <= tol.

The learning-rate warmdown and the recurrence switch are keyed to the wallclock fraction, so a short
run stays before both (constant LR; looping off) unless --looped turns the recurrence on from step 1
(ENABLE_LOOPING_AT=0). The priming steps are cut to one per loop mode: they are undone before step 1.

    OUT/A/<run>/metrics.jsonl, OUT/B/...   each revision's train.py run folder
    OUT/parity.json                        per-step losses, differences and the verdict
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.env import REPO_ROOT
from bench.revs import SIDES, _git, _remove_worktree, child_env, resolve

TOL = 0.004  # issue #21's bound on the per-step loss difference over 30 steps


def read_losses(run_dir: Path) -> list[float]:
    """Training losses by step from a train.py run folder's metrics.jsonl."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec and rec.get("kind") is None:
            losses[rec["step"]] = rec["loss"]
    return [losses[s] for s in sorted(losses)]


def verdict(a: list[float], b: list[float], tol: float = TOL) -> dict:
    """Per-step differences of two loss curves and PASS/FAIL (FAIL too when the lengths differ)."""
    diffs = [y - x for x, y in zip(a, b)]
    worst = max((abs(d) for d in diffs), default=float("nan"))
    ok = len(a) == len(b) and len(a) > 0 and worst <= tol
    return {"steps": len(diffs), "max_abs_diff": worst, "tol": tol, "diffs": diffs, "pass": ok,
            "steps_a": len(a), "steps_b": len(b)}  # fmt: skip


def run_parity(rev_a: str, rev_b: str, *, steps: int = 30, looped: bool = False, preset: str = "record",
               out: Path, tol: float = TOL, extra_env: dict | None = None, repo: Path = REPO_ROOT,
               say=print) -> int:  # fmt: skip
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"--tol must be a finite number >= 0, got {tol}")
    shas = {"A": resolve(repo, rev_a), "B": resolve(repo, rev_b)}
    out = Path(out).resolve()
    env_run = {"ITERATIONS": str(steps), "SEED": "1337", "WARMUP_STEPS": "1", "VAL_LOSS_EVERY": "0"}
    if looped:
        env_run["ENABLE_LOOPING_AT"] = "0"
    env_run.update(extra_env or {})
    tmp = Path(tempfile.mkdtemp(prefix="golfbench-parity-"))
    losses = {}
    try:
        for s in SIDES:
            tree = tmp / s
            _git(repo, "worktree", "add", "--detach", str(tree), shas[s])
            cmd = [sys.executable, "train.py", "--preset", preset, "--train-only",
                   "--out-dir", str(out / s), "--run-id", f"parity-{s}"]  # fmt: skip
            say(f"=== {s} ({rev_a if s == 'A' else rev_b} {shas[s][:10]}): {' '.join(cmd[1:])} {env_run}")
            sys.stdout.flush()
            rc = subprocess.run(cmd, cwd=tree, env={**child_env(shas[s], repo), **env_run}).returncode
            if rc != 0:
                say(f"bench parity: the run of {s} exited with {rc}")
                return 2
            losses[s] = read_losses(out / s / f"parity-{s}")
    finally:
        for s in SIDES:
            _remove_worktree(repo, tmp / s)
    result = {"revs": {s: shas[s] for s in SIDES}, "env": env_run, "preset": preset, "loss_a": losses["A"],
              "loss_b": losses["B"], **verdict(losses["A"], losses["B"], tol)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(result, indent=1))
    say(f"{'step':>5} {'loss A':>9} {'loss B':>9} {'B - A':>9}")
    for i, (x, y) in enumerate(zip(losses["A"], losses["B"]), 1):
        say(f"{i:5d} {x:9.5f} {y:9.5f} {y - x:+9.5f}")
    say(f"{'PASS' if result['pass'] else 'FAIL'}: max |loss_B - loss_A| = {result['max_abs_diff']:.5f} "
        f"over {result['steps']} steps (tol {tol}); {out / 'parity.json'}")  # fmt: skip
    return 0 if result["pass"] else 1
