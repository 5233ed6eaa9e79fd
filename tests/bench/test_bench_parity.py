"""bench parity: two revisions' train.py loss curves compared step by step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.parity import read_losses, verdict


def test_verdict_passes_equal_curves_and_fails_a_drift_or_a_short_run():
    a = [9.0, 8.5, 8.1]
    assert verdict(a, list(a))["pass"] and verdict(a, list(a))["max_abs_diff"] == 0
    drift = verdict(a, [9.0, 8.5, 8.1 + 0.0041])
    assert not drift["pass"] and drift["max_abs_diff"] == pytest.approx(0.0041)
    assert verdict(a, [9.0, 8.5, 8.1 + 0.0039])["pass"]
    assert not verdict(a, a[:2])["pass"]  # a run that stopped early is not the same training
    assert not verdict([], [])["pass"]  # nothing compared is not a pass


def test_read_losses_takes_training_steps_only(tmp_path):
    lines = [{"step": 2, "loss": 8.0}, {"kind": "val", "step": 2, "val_loss": 7.0}, {"step": 1, "loss": 9.0},
             {"kind": "phase", "phase": "train"}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_losses(tmp_path) == [9.0, 8.0]


@pytest.mark.slow
def test_one_revision_against_itself_is_the_same_curve(tmp_path):
    """End to end on CPU: HEAD vs HEAD, tiny preset, 2 steps: bit-identical losses."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "parity", "--revs", "HEAD", "HEAD", "--preset", "tiny",
         "--steps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "parity.json").read_text())
    assert result["pass"] and result["steps"] == 2 and result["max_abs_diff"] == 0.0


@pytest.mark.parametrize("flags, named", [(["--steps", "0"], "--steps"), (["--tol", "nan"], "--tol")])
def test_bad_arguments_are_refused_before_any_run(tmp_path, flags, named):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "parity", "--revs", "HEAD", "HEAD", "--out", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing run, nothing written
