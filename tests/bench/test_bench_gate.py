"""The perf gate for real: pytest-benchmark in a subprocess over a generated benchmark whose duration
is set by an environment variable, timed with a CPU timer, against baselines in a temporary folder."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from bench import gate
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
    assert "no baseline for 'Test GPU C'" in out and "python -m bench gate --update" in out
    assert gpu_slug("Test GPU A") in out  # names the baselines that do exist


def test_gate_without_cuda_needs_a_gpu(monkeypatch, capfd):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gate.run_gate() == 2
    assert "needs a CUDA GPU" in capfd.readouterr().out
