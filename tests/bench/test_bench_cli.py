"""`python -m bench` as a user runs it, on a machine without CUDA (forced with CUDA_VISIBLE_DEVICES="")."""

import json
import os
import subprocess
import sys

import bench.suites  # noqa: F401  (registers the suites)
from bench.env import REPO_ROOT
from bench.registry import SUITES
from bench.resultsfile import read_csv, read_results


def bench_cli(*args, check_rc=0):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc.stdout


def test_dry_run_covers_every_registered_suite(tmp_path):
    out = bench_cli("run", "--dry-run", "--out", str(tmp_path))
    results = read_results(tmp_path / "results.json")
    assert results["env"]["dry_run"] is True and results["env"]["ceilings"]["fake"] is True
    records = results["records"]
    assert SUITES and {r["suite"] for r in records} == set(SUITES)
    broken = [(r["suite"], r["case"], r["provider"], r["reason"]) for r in records if r["status"] != "ok"]
    assert not broken
    assert all(r["fake"] for r in records)
    for suite in SUITES.values():  # every case and provider of every suite appears
        expected = {(c.label, p.name) for c in suite.cases(False) for p in c.providers}
        assert {(r["case"], r["provider"]) for r in records if r["suite"] == suite.name} == expected
    assert len(read_csv(tmp_path / "results.csv")) == len(records)
    table = out[out.index("FAKE TIMINGS (--dry-run)") :]
    assert "FAKE TIMINGS: median ms" in table
    assert all(f"\n{name} " in table for name in SUITES)


def test_env_without_cuda():
    out = bench_cli("env", "--measure-ceilings")
    for word in ("python", "torch", "triton", "git", "gpu           none"):
        assert word in out
    assert "skipped" in out and "ceilings" in out and "no CUDA GPU" in out
    env = json.loads(bench_cli("env", "--json", "--measure-ceilings"))
    assert env["gpu"] is None and env["cuda_available"] is False
    assert "needs a CUDA GPU" in env["ceilings_skipped"] and "ceilings" not in env


def test_run_without_cuda_times_nothing_and_says_what_it_skipped(tmp_path):
    out = bench_cli("run", "gemm", "copy", "--out", str(tmp_path / "r"), check_rc=2)  # nothing timed
    assert "NOTHING WAS TIMED" in out and "--dry-run" in out
    assert "gemm: 4 case(s)" in out and "copy: 5 case(s)" in out
    assert "cublas: needs a CUDA GPU" in out and "torch.copy_, triton: needs a CUDA GPU" in out
    assert not (tmp_path / "r").exists()


def test_unknown_suite_is_an_error():
    bench_cli("run", "no-such-suite", "--dry-run", check_rc=2)


def test_quick_mode_runs_fewer_cases_and_a_smaller_record_model():
    pairs = lambda cases: {(c.label, p.name) for c in cases for p in c.providers}
    total = 0
    for suite in SUITES.values():
        quick, full = pairs(suite.cases(True)), pairs(suite.cases(False))
        assert 0 < len(quick) <= len(full), suite.name
        total += len(quick)
    assert total < sum(len(pairs(s.cases(False))) for s in SUITES.values()) / 2
    for name in ("model", "train", "eval"):  # record width, heads, sequence; 3 layers instead of 11
        (case,) = SUITES[name].cases(True)
        assert case.params["layers"] == 3 and case.params["seq_len"] == 2048 and "L=3" in case.label
        assert {c.params["layers"] for c in SUITES[name].cases(False)} == {11}


def test_help_and_argument_errors_answer_without_importing_torch():
    """`python -m bench --help` or a mistyped flag or suite must answer at once (~0.3 s), not after the
    seconds torch, the kernels and the suites take to import (7 s before)."""
    script = (
        "import sys\n"
        "from bench.__main__ import main\n"
        "for argv in (['--help'], ['run', '--help'], ['run', '--bogus'], ['run', 'no-such-suite'],\n"
        "             ['compare', '--revs', 'A', 'B', 'no-such-suite'], ['gate', '--threshold', 'x'],\n"
        "             ['compare', 'a.json', 'b.json', '--confidence', '2'], ['dist', '--nproc', '1']):\n"
        "    try:\n"
        "        rc = main(argv)\n"
        "    except SystemExit as exc:\n"
        "        rc = exc.code\n"
        "    assert rc not in (0, None) or argv[-1] == '--help', argv\n"
        "heavy = sorted(m for m in ('torch', 'triton', 'numpy', 'model', 'kernels') if m in sys.modules)\n"
        "print('imported:', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("imported: []"), proc.stdout[-2000:]


def test_every_suite_is_registered_under_its_module_name():
    from bench.registry import suite_modules

    assert suite_modules() == sorted(SUITES)  # what `bench run NAME` checks before importing anything
