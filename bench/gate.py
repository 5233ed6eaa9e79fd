"""The perf regression gate: pytest-benchmark over tests/perf against a stored per-GPU baseline.

    python -m bench gate --update     # time tests/perf and store the result as this GPU's new baseline
    python -m bench gate              # time again; fail when a median is > threshold % slower

    python -m bench gate --derive-threshold RUN1.json RUN2.json   # this GPU's noise threshold

Baselines live in bench/baselines/<gpu-slug>/<pytest-benchmark machine id>/NNNN_baseline.json.
The folder is keyed by GPU model and the stored machine_info carries the GPU name (added by
tests/perf/conftest.py), and the gate refuses to compare timings from a different GPU model.
The threshold is the GPU's own, bench/baselines/<gpu-slug>/threshold.json (bench/noise.py: derived
from two `bench run` of one revision on that GPU), else DEFAULT_THRESHOLD_PCT; --threshold overrides.
Timings use `cuda_timer`, which synchronises the device, so a round measures finished GPU work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import noise
from bench.env import REPO_ROOT, gpu_slug

# Allowed slowdown of a test's median against the baseline before the gate fails, in percent
# (pytest-benchmark takes whole percents), where this GPU has no threshold file: see bench/noise.py.
DEFAULT_THRESHOLD_PCT = noise.DEFAULT_THRESHOLD_PCT

BASELINES_DIR = noise.BASELINES_DIR
PERF_TESTS = REPO_ROOT / "tests" / "perf"
BASELINE_NAME = "baseline"
# The GPU name the gate keys on, handed to tests/perf/conftest.py to record in machine_info.
GPU_ENV_VAR = "GOLFBENCH_GATE_GPU"


def cuda_timer() -> float:
    """pytest-benchmark timer (--benchmark-timer=bench.gate.cuda_timer): waits for queued GPU work."""
    torch.cuda.synchronize()
    return time.perf_counter()


def baseline_files(folder: Path) -> list[tuple[Path, dict]]:
    """Saved pytest-benchmark runs under `folder` (any machine id), oldest first."""
    found = []
    for path in Path(folder).glob("*/[0-9][0-9][0-9][0-9]_*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{path}: unreadable baseline ({exc}); delete it or re-run with --update"
            ) from None
        found.append((path, data))
    found.sort(key=lambda pd: (pd[1].get("datetime", ""), pd[0].name))
    return found


def _say(msg: str) -> None:
    print(f"bench gate: {msg}", flush=True)


def pytest_command(tests: Path, storage: Path, timer: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        str(tests),
        "--run-perf",
        "-m",
        "perf",
        "-p",
        "no:cacheprovider",
        f"--benchmark-timer={timer}",
        f"--benchmark-storage=file://{storage}",
        "--benchmark-sort=name",
        "--benchmark-columns=min,median,iqr,max,rounds,iterations",
    ]


def how_to_make_a_baseline(gpu: str, folder: Path) -> str:
    """The exact commands that give `gpu` a baseline and a threshold (run from the repository root)."""
    return (
        f"To make one on this {gpu}, from the repository root, on a clean checkout of the revision to "
        "protect:\n"
        "  1. time the suites twice with that one revision (the run-to-run noise of this GPU):\n"
        "       python -m bench run gemm copy mlp muon ce --out runs/bench/noise-1\n"
        "       python -m bench run gemm copy mlp muon ce --out runs/bench/noise-2\n"
        "  2. derive this GPU's noise threshold from them (writes threshold.json):\n"
        "       python -m bench gate --derive-threshold runs/bench/noise-1/results.json "
        "runs/bench/noise-2/results.json\n"
        "  3. record the perf tests as this GPU's baseline:\n"
        "       python -m bench gate --update\n"
        "  4. check that the gate passes against it:\n"
        "       python -m bench gate\n"
        f"then commit {folder}/ (the baseline and threshold.json)."
    )


def derive_threshold(
    run1: str | Path, run2: str | Path, *, baselines=BASELINES_DIR, force: bool = False
) -> int:
    """`bench gate --derive-threshold RUN1 RUN2`: write the GPU's threshold file; 0 done, 2 refused."""
    from bench.resultsfile import read_results

    try:
        data = noise.derive(
            read_results(run1), read_results(run2), sources=(str(run1), str(run2)), force=force
        )
    except (FileNotFoundError, ValueError) as exc:
        _say(str(exc))
        return 2
    path = noise.write_thresholds(data, baselines)
    print(noise.format_thresholds(data))
    for p in data["forced_past"]:
        _say(f"FORCED past: {p}")
    _say(f"wrote {path}: `bench gate` fails beyond {data['gate_pct']}%, `bench compare` uses each suite's")
    return 0


def run_gate(
    update: bool = False,
    threshold: int | None = None,
    *,
    gpu: str | None = None,
    tests: str | Path = PERF_TESTS,
    baselines: str | Path = BASELINES_DIR,
    timer: str = "bench.gate.cuda_timer",
    env: dict | None = None,
) -> int:
    """0 pass / baseline saved, 1 regression or failing tests, 2 cannot gate (no GPU, no or foreign baseline).

    `gpu` and `timer` exist for the gate's own CPU test: with gpu=None the GPU is detected via CUDA.
    threshold=None: this GPU's threshold file (bench/noise.py), else DEFAULT_THRESHOLD_PCT.
    """
    if gpu is None:
        if not torch.cuda.is_available():
            _say(
                "the perf gate needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed. "
                "Run it on the GPU machine: python -m bench gate [--update]"
            )
            return 2
        gpu = torch.cuda.get_device_name(0)
    baselines = Path(baselines).resolve()
    folder = baselines / gpu_slug(gpu)
    cmd = pytest_command(Path(tests), folder, timer)
    if update:
        cmd.append(f"--benchmark-save={BASELINE_NAME}")
        before = {p for p, _ in baseline_files(folder)}
    else:
        saved = baseline_files(folder)
        if not saved:
            others = sorted(p.name for p in baselines.glob("*") if p.is_dir() and any(p.glob("*/*.json")))
            _say(
                f"no baseline for {gpu!r} in {folder}, so there is nothing to compare with. "
                + (
                    f"Baselines exist for: {', '.join(others)} (other GPU models: not comparable). "
                    if others
                    else ""
                )
                + how_to_make_a_baseline(gpu, folder)
            )
            return 2
        path, data = saved[-1]
        stored = (data.get("machine_info") or {}).get("gpu")
        if stored != gpu:
            _say(
                f"refusing to compare across GPU models: the latest baseline {path} was recorded on "
                f"{stored!r}, this machine is {gpu!r}. Store one for this GPU with --update."
            )
            return 2
        if threshold is None:
            try:
                threshold, source = noise.gate_threshold(gpu, baselines)
            except ValueError as exc:
                _say(str(exc))
                return 2
        else:
            source = "--threshold"
        _say(
            f"comparing against {path} ({data.get('datetime', '?')}); "
            f"fail if a median is more than {threshold}% slower (threshold from {source})"
        )
        cmd += [f"--benchmark-compare={path}", f"--benchmark-compare-fail=median:{threshold}%"]
    run_env = {**os.environ, GPU_ENV_VAR: gpu, **(env or {})}
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    _say(" ".join(cmd[1:]))
    rc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env).returncode
    if rc != 0:
        why = "a perf test failed" + ("" if update else f", or a median regressed by more than {threshold}%")
        _say(f"FAIL (pytest exit code {rc}): {why}")
        return 1
    if update:
        new = [(p, d) for p, d in baseline_files(folder) if p not in before]
        if not new:
            _say(f"pytest passed but saved no baseline under {folder} (did any perf test run?)")
            return 2
        path, data = new[-1]
        if (data.get("machine_info") or {}).get("gpu") != gpu:
            _say(
                f"{path} lacks machine_info.gpu={gpu!r}: "
                "is the machine-info hook of tests/perf/conftest.py loaded?"
            )
            return 2
        _say(f"saved the new baseline for {gpu!r}: {path}")
    else:
        _say("PASS: no median regressed beyond the threshold")
    return 0
