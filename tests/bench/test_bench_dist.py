"""python -m bench dist without GPUs: --dry-run walks both launches (one process, then torchrun with gloo
ranks) end to end with FAKE figures; the summary's arithmetic on hand-made results."""

import json
import os
import subprocess
import sys

import pytest

from bench.comm import step_volume
from bench.dist import GLOBAL_ACCUM, TINY_BANKS, format_table, summarize
from bench.env import REPO_ROOT


def bench_cli(*args, check_rc=0):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_dry_run_end_to_end(tmp_path):
    out = bench_cli("dist", "--dry-run", "--nproc", "2", "--out", str(tmp_path))
    assert "FAKE" in out and "scaling" in out and "ESTIMATE" in out
    result = json.loads((tmp_path / "dist.json").read_text())
    assert result["schema"] == "golfbench.dist/1" and result["env"]["dry_run"] is True
    assert (tmp_path / "dist.png").stat().st_size > 0
    one, two = result["world1"], result["world2"]
    assert one["world"] == 1 and two["world"] == 2 and [r["rank"] for r in two["ranks"]] == [0, 1]
    assert not one["ranks"][0]["muon"]["sharded"] and all(r["muon"]["sharded"] for r in two["ranks"])
    assert (
        one["ranks"][0]["train"]["accum"] == GLOBAL_ACCUM
        and two["ranks"][0]["train"]["accum"] == GLOBAL_ACCUM // 2
    )
    tokens = {r["train"]["tokens_per_step"] for r in [*one["ranks"], *two["ranks"]]}
    assert len(tokens) == 1  # the same global batch at 1 and 2 ranks
    s = result["summary"]
    assert s["gpus"] == 2 and s["muon"]["comm"]["synthetic"]
    for mode in ("flat", "looped"):
        t = s["train"][mode]
        assert t["scaling"] == pytest.approx(t["t1"]["median_ms"] / (2 * t["tn"]["median_ms"]))
        assert t["tn"]["median_ms"] == max(t["per_rank_ms"])
        assert t["comm"]["synthetic"] and t["comm"]["comm_ms"] > 0
        assert t["families_ms"][0]["communication"] > 0  # the step profile's families, from the same trace
        assert t["estimate"]["gpus"] == 8
    banks = [tuple(b) for b in one["ranks"][0]["train"]["banks"]]
    replicated = one["ranks"][0]["train"]["replicated"]
    assert s["volume_bytes"]["2"] == step_volume(banks, replicated, 2)
    assert one["ranks"][0]["muon"]["banks"] == [list(b) for b in TINY_BANKS]


def test_without_gpus_nothing_is_launched(tmp_path):
    out = bench_cli("dist", "--out", str(tmp_path / "d"), check_rc=2)  # nothing measured
    assert "no CUDA GPU" in out and "--dry-run" in out and not (tmp_path / "d").exists()


def _rank(muon_ms, steps_ms, exposed_ms, world):
    comm = lambda e: {
        "comm_ms": 2 * e,
        "exposed_ms": e,
        "hidden_ms": e,
        "exposed_pct": 1.0,
        "synthetic": False,
    }  # noqa: E731
    timing = lambda ms: {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}  # noqa: E731
    modes = {
        m: {"timing": timing(ms), "comm": comm(exposed_ms), "warmup_s": 60.0} for m, ms in steps_ms.items()
    }
    return {
        "muon": {"banks": TINY_BANKS, "timing": timing(muon_ms), "comm": comm(0.1)},
        "train": {"accum": GLOBAL_ACCUM // world, "tokens_per_step": 786432, "banks": TINY_BANKS,
                  "replicated": [(1000, 2)], "modes": modes},
    }  # fmt: skip


def test_summary_takes_the_slowest_rank():
    one = {"world": 1, "ranks": [_rank(1.2, {"flat": 706.5, "looped": 1074.0}, 0.0, 1)]}
    fast, slow = (
        _rank(0.7, {"flat": 360.0, "looped": 548.0}, 3.0, 2),
        _rank(0.8, {"flat": 361.5, "looped": 549.0}, 9.0, 2),
    )
    s = summarize(one, {"world": 2, "ranks": [fast, slow]}, ["flat", "looped"])
    assert s["muon"]["speedup"] == pytest.approx(1.2 / 0.8)
    flat = s["train"]["flat"]
    assert flat["scaling"] == pytest.approx(706.5 / (2 * 361.5)) and not flat["scaling_pass"]
    assert flat["comm"]["exposed_ms"] == 9.0 and flat["exposed_pct_of_step"] == pytest.approx(100 * 9 / 361.5)
    assert flat["exposed_pass"]
    assert flat["estimate"]["overhead_ms"] == pytest.approx(361.5 - 706.5 / 2 - 9.0)
    table = format_table({"summary": s, "env": {"gpu": {"name": "NVIDIA H200"}, "git": {"short_sha": "abc"}}})
    assert "scaling 0.977 (target >= 0.98: MISS)" in table and "8 GPUs, ESTIMATE" in table
