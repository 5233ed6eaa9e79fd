"""`python -m bench` on bad input: a one-line error naming the argument or file, a non-zero exit status,
no traceback, before any work; and never exit 0 when nothing was measured or compared."""

import copy

import pytest
import torch

from bench.__main__ import build_parser
from tests.bench.test_bench_compare import _write, bench_cli
from tests.model.test_preflight import _bench_check


@pytest.fixture(scope="module")
def two_suites(tmp_path_factory):
    """One `bench run gemm copy --dry-run`: (its results.json, the results read back)."""
    from bench.resultsfile import read_results

    out = tmp_path_factory.mktemp("dry")
    rc, text = bench_cli("run", "gemm", "copy", "--dry-run", "--out", str(out))
    assert rc == 0, text
    return out / "results.json", read_results(out / "results.json")


def _only(results, suite):
    out = copy.deepcopy(results)
    out["records"] = [r for r in out["records"] if r["suite"] == suite]
    return out


def _refused(rc, text, *words):
    assert rc == 2 and "Traceback" not in text, text
    for w in words:
        assert w in text, text


def test_compare_of_runs_with_no_common_case_exits_2(two_suites, tmp_path):
    _, results = two_suites
    base, head = (
        _write(tmp_path, "gemm", _only(results, "gemm")),
        _write(tmp_path, "copy", _only(results, "copy")),
    )
    rc, text = bench_cli("compare", str(base), str(head), "--out", str(tmp_path / "cmp"))
    _refused(rc, text, "no case is common to both runs", "base suites: gemm", "head suites: copy")
    assert "PASS" not in text and not (tmp_path / "cmp").exists()


def test_compare_of_runs_with_only_skipped_common_cases_exits_2(two_suites, tmp_path):
    _, results = two_suites
    skipped = copy.deepcopy(results)
    for r in skipped["records"]:
        r.update(status="skipped", reason="needs a CUDA GPU", median_ms=None, samples_ms=None)
    base, head = _write(tmp_path, "base", skipped), _write(tmp_path, "head", skipped)
    rc, text = bench_cli("compare", str(base), str(head), "--out", str(tmp_path / "cmp"))
    _refused(rc, text, "nothing was compared")
    assert "PASS" not in text


@pytest.mark.parametrize(
    "command",
    [
        ["plot", "{results}"],
        ["run", "gemm", "--dry-run"],
        ["compare", "{results}", "{results}"],
        ["profile", "--dry-run"],
        ["dist", "--dry-run", "--nproc", "2"],
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("below", [False, True], ids=["file", "under-a-file"])
def test_out_at_an_existing_file_is_refused_before_any_work(two_suites, tmp_path, command, below):
    path, _ = two_suites
    (tmp_path / "taken").write_text("not a folder\n")
    out = tmp_path / "taken" / "sub" if below else tmp_path / "taken"
    rc, text = bench_cli(*[a.format(results=path) for a in command], "--out", str(out))
    _refused(rc, text, "argument --out", f"{tmp_path / 'taken'} is a file, not a folder")
    assert "FAKE" not in text  # refused before any (fake) work
    assert (tmp_path / "taken").read_text() == "not a folder\n"


@pytest.mark.parametrize("level", ["2", "nan", "0", "1", "-0.5"])
def test_compare_confidence_outside_0_1_is_refused(two_suites, tmp_path, level):
    path, _ = two_suites
    rc, text = bench_cli("compare", str(path), str(path), "--confidence", level, "--out", str(tmp_path / "c"))
    _refused(rc, text, "argument --confidence", "between 0 and 1")
    assert "Quantiles" not in text and not (tmp_path / "c").exists()


@pytest.mark.parametrize("nproc", ["0", "1", "-3"])
def test_dist_refuses_fewer_than_two_processes(tmp_path, nproc):
    rc, text = bench_cli("dist", "--dry-run", "--nproc", nproc, "--out", str(tmp_path / "d"))
    _refused(rc, text, "argument --nproc", "needs at least 2 processes")
    assert "== " not in text and not (tmp_path / "d").exists()  # nothing launched
    assert build_parser().parse_args(["dist"]).nproc is None  # left out: every visible GPU, as before


def test_profile_without_a_gpu_exits_2(tmp_path):
    rc, text = bench_cli("profile", "--out", str(tmp_path / "p"))
    _refused(rc, text, "no CUDA GPU", "nothing was profiled", "--dry-run")
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU without the Triton interpreter")
def test_check_on_cpu_without_the_interpreter_proves_nothing_and_exits_2():
    proc = _bench_check({"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text
    assert "NOT PROVEN: mlp_fwd, mlp_bwd, ce_fwd, ce_bwd" in text and "TRITON_INTERPRET=1" in text
