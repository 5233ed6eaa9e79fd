"""The perf gate for real: pytest-benchmark in a subprocess over a generated benchmark whose duration
is set by an environment variable, timed with a CPU timer, against baselines in a temporary folder."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from bench import gate, noise
from bench.env import REPO_ROOT, gpu_slug

SLEEP_VAR = "GOLFBENCH_TEST_SLEEP_MS"
BASE_MS = 10.0
CPU_TIMER = "time.perf_counter"  # the test's stand-in for bench.gate.cuda_timer

CONFTEST = f"""
import importlib.util

# The real hooks and fixture of tests/perf/conftest.py, loaded from its file.
_path = {str(REPO_ROOT / "tests/perf/conftest.py")!r}
_spec = importlib.util.spec_from_file_location("golfbench_perf_conftest", _path)
_perf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_perf)
cuda_bench = _perf.cuda_bench
pytest_benchmark_update_machine_info = _perf.pytest_benchmark_update_machine_info
pytest_benchmark_compare_machine_info = _perf.pytest_benchmark_compare_machine_info


def pytest_addoption(parser):  # what tests/conftest.py provides in the repo
    parser.addoption("--run-perf", action="store_true")


def pytest_configure(config):
    config.addinivalue_line("markers", "perf: perf gate")
"""

BENCH = f"""
import os
import time

import pytest

pytestmark = pytest.mark.perf


def test_perf_sleep(cuda_bench):
    seconds = float(os.environ["{SLEEP_VAR}"]) / 1e3
    cuda_bench(lambda: time.sleep(seconds), rounds=12, iterations=1, warmup_rounds=1)
"""


@pytest.fixture(scope="module")
def perf_setup(tmp_path_factory):
    """Generated perf tests, and a baseline saved by `gate --update` for GPU model "Test GPU A"."""
    root = tmp_path_factory.mktemp("gate")
    tests = root / "perf"
    tests.mkdir()
    (tests / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tests / "test_perf_sleep.py").write_text(BENCH)
    baselines = root / "baselines"
    kw = dict(tests=tests, baselines=baselines, timer=CPU_TIMER)
    assert gate.run_gate(update=True, gpu="Test GPU A", env={SLEEP_VAR: str(BASE_MS)}, **kw) == 0
    return kw


def _saved(baselines, gpu):
    return sorted((baselines / gpu_slug(gpu)).glob("*/*.json"))


def test_update_saves_baseline_with_gpu_name(perf_setup):
    (path,) = _saved(perf_setup["baselines"], "Test GPU A")
    data = json.loads(path.read_text())
    assert path.name == "0001_baseline.json"
    assert data["machine_info"]["gpu"] == "Test GPU A"
    (bench,) = data["benchmarks"]
    assert bench["stats"]["rounds"] == 12
    assert BASE_MS / 1e3 <= bench["stats"]["median"] < 2 * BASE_MS / 1e3


def test_equal_timings_pass_and_planted_regression_fails(perf_setup, capfd):
    kw = dict(perf_setup, gpu="Test GPU A", threshold=10)
    assert gate.run_gate(env={SLEEP_VAR: str(BASE_MS)}, **kw) == 0
    assert "PASS" in capfd.readouterr().out
    assert gate.run_gate(env={SLEEP_VAR: str(1.2 * BASE_MS)}, **kw) == 1  # 20% slower, threshold 10%
    captured = capfd.readouterr()
    assert "Performance has regressed" in captured.out + captured.err and "FAIL" in captured.out
    # compare never writes a baseline
    assert len(_saved(perf_setup["baselines"], "Test GPU A")) == 1


def test_refuses_baseline_from_another_gpu_model(perf_setup, tmp_path, capfd):
    # A baseline recorded on model A planted in model B's folder: the gate reads machine_info, not the path.
    (src,) = _saved(perf_setup["baselines"], "Test GPU A")
    baselines = tmp_path / "baselines"
    dst = baselines / gpu_slug("Test GPU B") / src.parent.name / src.name
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    kw = dict(perf_setup, baselines=baselines)
    assert gate.run_gate(gpu="Test GPU B", env={SLEEP_VAR: str(BASE_MS)}, **kw) == 2
    out = capfd.readouterr().out
    assert "refusing to compare across GPU models" in out and "Test GPU A" in out
    # pytest run by hand against it: tests/perf/conftest.py refuses too
    cmd = [sys.executable, "-m", "pytest", str(kw["tests"]), "-p", "no:cacheprovider", "--run-perf"]
    cmd += [f"--benchmark-timer={CPU_TIMER}", f"--benchmark-compare={dst}"]
    env = {**gate.os.environ, gate.GPU_ENV_VAR: "Test GPU B", SLEEP_VAR: "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "refusing to compare perf timings across GPU models" in proc.stdout + proc.stderr


def test_no_baseline_for_this_gpu_says_how_to_create_one(perf_setup, capfd):
    assert gate.run_gate(gpu="Test GPU C", **perf_setup) == 2
    out = capfd.readouterr().out
    assert "no baseline for 'Test GPU C'" in out
    assert gpu_slug("Test GPU A") in out  # names the baselines that do exist
    # the exact commands, in order: two runs of one revision, the threshold, the baseline, a check
    steps = [
        "python -m bench run gemm copy mlp muon ce --out runs/bench/noise-1",
        "python -m bench run gemm copy mlp muon ce --out runs/bench/noise-2",
        "python -m bench gate --derive-threshold runs/bench/noise-1/results.json "
        "runs/bench/noise-2/results.json",
        "python -m bench gate --update",
        "python -m bench gate\n",
        f"commit {perf_setup['baselines'].resolve() / gpu_slug('Test GPU C')}/",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), out


@pytest.mark.parametrize("gate_pct, rc", [(10, 1), (30, 0)])
def test_gate_takes_the_threshold_of_the_gpu(perf_setup, tmp_path, capfd, gate_pct, rc):
    baselines = tmp_path / "baselines"
    shutil.copytree(perf_setup["baselines"], baselines)
    data = {"schema": noise.SCHEMA, "gpu": "Test GPU A", "gate_pct": gate_pct, "default_pct": gate_pct}
    data["suites"] = {}
    noise.write_thresholds(data, baselines)
    kw = dict(perf_setup, baselines=baselines, gpu="Test GPU A")
    assert gate.run_gate(env={SLEEP_VAR: str(1.2 * BASE_MS)}, **kw) == rc  # 20% slower
    out = capfd.readouterr().out
    assert (
        f"more than {gate_pct}% slower (threshold from {noise.threshold_path('Test GPU A', baselines)}" in out
    )


def _noise_runs(tmp_path, capsys, factor=1.08, sha2=None, dry_run=False):
    """Two `bench run gemm copy --dry-run` results made to look like measurements on "Test GPU N",
    the second with one copy median `factor` slower."""
    from bench.__main__ import main

    assert main(["run", "gemm", "copy", "--dry-run", "--no-progress", "--out", str(tmp_path / "r1")]) == 0
    capsys.readouterr()
    run1 = json.loads((tmp_path / "r1" / "results.json").read_text())
    run1["env"].update(gpu={"name": "Test GPU N"}, dry_run=dry_run)
    run2 = json.loads(json.dumps(run1))
    rec = next(r for r in run2["records"] if r["case"] == "64 MiB" and r["provider"] == "triton")
    rec["median_ms"] *= factor
    if sha2:
        run2["env"]["git"]["sha"] = sha2
    paths = tmp_path / "n1.json", tmp_path / "n2.json"
    for path, run in zip(paths, (run1, run2)):
        path.write_text(json.dumps(run))
    return [str(p) for p in paths]


def test_derive_threshold_writes_the_gpus_file(tmp_path, capsys):
    from bench.__main__ import main

    paths = _noise_runs(tmp_path, capsys)
    baselines = tmp_path / "baselines"
    assert main(["gate", "--derive-threshold", *paths, "--baselines", str(baselines)]) == 0
    out = capsys.readouterr().out
    data = json.loads(noise.threshold_path("Test GPU N", baselines).read_text())
    assert data["suites"]["copy"] == {
        "noise_pct": 8.0,
        "worst": "64 MiB | triton",
        "records": 10,
        "threshold_pct": 12,
    }
    assert (
        data["suites"]["gemm"]["noise_pct"] == 0 and data["suites"]["gemm"]["threshold_pct"] == noise.MIN_PCT
    )
    assert data["gate_pct"] == 12 and data["default_pct"] == 12 and data["forced_past"] == []
    assert [d["path"] for d in data["derived_from"]] == paths
    assert "copy" in out and "-> threshold  12%" in out and "fails beyond 12%" in out
    assert noise.gate_threshold("Test GPU N", baselines)[0] == 12
    assert noise.suite_thresholds("Test GPU N", None, baselines)[:2] == ({"copy": 12.0, "gemm": 3.0}, 12.0)


@pytest.mark.parametrize(
    "kw, message",
    [({"sha2": "f" * 40}, "different revisions"), ({"dry_run": True}, "a run is a --dry-run")],
    ids=["two-revisions", "dry-run"],
)
def test_derive_threshold_refuses_runs_that_do_not_measure_noise(tmp_path, capsys, kw, message):
    from bench.__main__ import main

    paths = _noise_runs(tmp_path, capsys, **kw)
    baselines = tmp_path / "baselines"
    assert main(["gate", "--derive-threshold", *paths, "--baselines", str(baselines)]) == 2
    out = capsys.readouterr().out
    assert message in out and "--force" in out
    assert not noise.threshold_path("Test GPU N", baselines).exists()
    assert main(["gate", "--derive-threshold", *paths, "--baselines", str(baselines), "--force"]) == 0
    assert message in capsys.readouterr().out  # FORCED past ..., and recorded in the file
    assert message in json.loads(noise.threshold_path("Test GPU N", baselines).read_text())["forced_past"][0]


def test_gate_without_cuda_needs_a_gpu(monkeypatch, capfd):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gate.run_gate() == 2
    assert "needs a CUDA GPU" in capfd.readouterr().out
