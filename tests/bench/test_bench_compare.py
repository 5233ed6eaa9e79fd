"""`python -m bench compare`: verdicts on dry-run results with planted changes, the refusals, the
bootstrap, per-GPU thresholds, and `--revs` on two commits of a throwaway repository."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import compare, revs
from bench.__main__ import main as bench_main
from bench.env import REPO_ROOT, gpu_slug
from bench.noise import derive, write_thresholds
from bench.resultsfile import read_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLOW_KEY = ("copy", "1 GiB", "triton")  # hundreds of samples
FEW_KEY = ("train", "looped accum=1", "ours")  # a training step: 10 samples, as on the GPU


def bench_cli(*args, cwd=REPO_ROOT):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `bench run --dry-run` of three suites, read back (the fake samples have a realistic spread)."""
    out = tmp_path_factory.mktemp("dry")
    rc, text = bench_cli("run", "gemm", "copy", "train", "--dry-run", "--out", str(out))
    assert rc == 0, text
    return read_results(out / "results.json")


def _record(results, key):
    return next(r for r in results["records"] if (r["suite"], r["case"], r["provider"]) == key)


def _scaled(results, key, factor):
    out = copy.deepcopy(results)
    rec = _record(out, key)
    rec["median_ms"] *= factor
    rec["samples_ms"] = [v * factor for v in rec["samples_ms"]]
    return out


def _write(tmp_path, name, results):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(results))
    return path


@pytest.fixture
def run_compare(capsys, tmp_path):
    """`python -m bench compare BASE HEAD --out tmp/cmp ...` in this process: (exit code, output, json)."""

    def run(base, head, *extra):
        rc = bench_main(["compare", str(base), str(head), "--out", str(tmp_path / "cmp"), *extra])
        captured = capsys.readouterr()
        return rc, captured.out + captured.err, _comparison(tmp_path, rc)

    return run


def _comparison(tmp_path, rc):
    return json.loads((tmp_path / "cmp" / "comparison.json").read_text()) if rc in (0, 1) else None


def _verdicts(comp):
    return {(r["suite"], r["case"], r["provider"]): r["verdict"] for r in comp["rows"]}


def test_dry_run_records_carry_samples_with_spread(dry_run):
    for rec in dry_run["records"]:
        s = rec["samples_ms"]
        assert 10 <= len(s) <= 256 and rec["n_samples"] >= len(s)
        assert min(s) < rec["median_ms"] < max(s) and max(s) / min(s) > 1.02
    assert _record(dry_run, FEW_KEY)["n_samples"] == 10
    assert set(dry_run["env"]["suite_versions"]) == {"gemm", "copy", "train"}


def test_identical_runs_are_within_noise(dry_run, tmp_path, run_compare):
    base = _write(tmp_path, "base", dry_run)
    rc, out, comp = run_compare(base, _write(tmp_path, "head", dry_run))
    assert rc == 0, out
    assert set(_verdicts(comp).values()) == {"within noise"}
    assert all(r["ci_low"] < 1.0 < r["ci_high"] for r in comp["rows"])
    assert "PASS" in out and "within noise" in out
    assert (tmp_path / "cmp" / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "cmp" / "comparison.txt").read_text().startswith("base: ")


@pytest.mark.parametrize("key", [SLOW_KEY, FEW_KEY], ids=["many-samples", "ten-samples"])
def test_planted_slowdown_is_slower_and_fails(dry_run, tmp_path, key, run_compare):
    base = _write(tmp_path, "base", dry_run)
    rc, out, comp = run_compare(base, _write(tmp_path, "head", _scaled(dry_run, key, 1.3)))
    assert rc == 1, out
    verdicts = _verdicts(comp)
    assert verdicts.pop(key) == "slower"
    assert set(verdicts.values()) == {"within noise"}
    assert f"SLOWER: {' / '.join(key)}: 30.0% slower" in out and "FAIL" in out


def test_planted_speedup_is_faster(dry_run, tmp_path, run_compare):
    base = _write(tmp_path, "base", dry_run)
    rc, out, comp = run_compare(base, _write(tmp_path, "head", _scaled(dry_run, SLOW_KEY, 1 / 1.3)))
    assert rc == 0, out
    verdicts = _verdicts(comp)
    assert verdicts.pop(SLOW_KEY) == "faster"
    assert set(verdicts.values()) == {"within noise"}


def test_a_change_inside_the_threshold_is_within_noise(dry_run, tmp_path, run_compare):
    # 10% slower, clearly significant within the run (2% spread), but inside the default 15% band
    base = _write(tmp_path, "base", dry_run)
    rc, out, comp = run_compare(base, _write(tmp_path, "head", _scaled(dry_run, SLOW_KEY, 1.1)))
    assert rc == 0, out
    row = next(r for r in comp["rows"] if (r["suite"], r["case"], r["provider"]) == SLOW_KEY)
    assert row["verdict"] == "within noise" and row["ci_low"] > 1.05
    # the same 10% with a 5% threshold is slower
    rc, out, comp = run_compare(base, tmp_path / "head.json", "--threshold", "5")
    assert rc == 1 and _verdicts(comp)[SLOW_KEY] == "slower"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda env: env.update(gpu={"name": "NVIDIA H200"}), "different GPU models"),
        (lambda env: env["suite_versions"].update(copy="2"), "suite 'copy' changed version"),
        (lambda env: env.update(dry_run=False), "--dry-run (fake timings) and the other is measured"),
        (lambda env: env.update(quick=True), "--quick run"),
    ],
    ids=["gpu-model", "suite-version", "dry-run", "quick"],
)
def test_incompatible_runs_are_refused_unless_forced(dry_run, tmp_path, damage, message, run_compare):
    base = copy.deepcopy(dry_run)
    base["env"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3"} if "gpu" in message else None
    head = copy.deepcopy(base)
    damage(head["env"])
    rc, out, _ = run_compare(_write(tmp_path, "base", base), _write(tmp_path, "head", head))
    assert rc == 2 and "refusing to compare" in out and message in out and "--force" in out
    assert not (tmp_path / "cmp").exists()
    rc, out, comp = run_compare(tmp_path / "base.json", tmp_path / "head.json", "--force")
    assert rc == 0 and "FORCED past" in out and message in comp["problems_forced"][0]


def test_unreadable_input_is_a_clear_error(tmp_path):
    rc, out = bench_cli("compare", str(tmp_path / "nope.json"), str(tmp_path / "nope.json"))
    assert rc == 2 and "no such results file" in out
    rc, out = bench_cli("compare", "one.json")
    assert rc == 2 and "two results files" in out


def test_per_suite_threshold_of_the_gpu(dry_run, tmp_path, run_compare):
    base = copy.deepcopy(dry_run)
    base["env"].update(gpu={"name": "Test GPU T"}, dry_run=False)
    # a threshold file as --derive-threshold writes it: copy noise 20% -> threshold 30%
    data = derive(base, _scaled(base, ("copy", "64 MiB", "triton"), 1.2), force=True)
    assert data["suites"]["copy"]["threshold_pct"] == 30 and data["suites"]["gemm"]["threshold_pct"] == 3
    baselines = tmp_path / "baselines"
    write_thresholds(data, baselines)
    head = _scaled(base, SLOW_KEY, 1.25)  # copy: 25% slower, inside its 30% band
    head = _scaled(head, ("gemm", "up 98304x2048x512", "cublas"), 1.05)  # gemm: 5% slower, beyond 3%
    args = ("--baselines", str(baselines))
    rc, out, comp = run_compare(_write(tmp_path, "b", base), _write(tmp_path, "h", head), *args)
    assert rc == 1, out
    verdicts = _verdicts(comp)
    assert (
        verdicts[SLOW_KEY] == "within noise" and verdicts[("gemm", "up 98304x2048x512", "cublas")] == "slower"
    )
    assert str(baselines / gpu_slug("Test GPU T") / "threshold.json") in out


def test_verdict_rules_with_few_or_no_samples():
    v, note = compare.verdict(1.3, None, 15)  # no samples: the threshold decides, and the note says so
    assert v == "slower" and "threshold alone" in note
    assert compare.verdict(1.3, (0.9, 1.6), 15)[0] == "within noise"  # the interval includes no change
    assert compare.verdict(1.3, (1.2, 1.4), 15)[0] == "slower"
    assert compare.verdict(0.7, (0.6, 0.8), 15)[0] == "faster"
    assert compare.verdict(1.1, (1.09, 1.11), 15)[0] == "within noise"
    # ten calls each, half of the head's calls 60% slower: median +30%, but not a clear change
    base = {"suite": "s", "case": "c", "provider": "p", "status": "ok", "median_ms": 10.0}
    head = dict(base, median_ms=13.0)
    base["samples_ms"] = [10.0 + 0.01 * i for i in range(10)]
    head["samples_ms"] = [10.0 + 0.01 * i for i in range(5)] + [16.0 + 0.01 * i for i in range(5)]
    rows = compare.compare_records({"records": [base]}, {"records": [head]}, thresholds={}, default_pct=15)
    assert rows[0]["verdict"] == "within noise" and "interval includes no change" in rows[0]["note"]


def test_bootstrap_is_seeded_and_covers_the_true_ratio():
    import numpy as np

    rng = np.random.default_rng(1)
    base = list(np.exp(rng.normal(0, 0.05, 200)))
    head = list(1.2 * np.exp(rng.normal(0, 0.05, 200)))
    ci = compare.bootstrap_ratio_ci(base, head, seed=7)
    assert ci == compare.bootstrap_ratio_ci(base, head, seed=7)
    assert ci[0] < 1.2 < ci[1] and ci[1] - ci[0] < 0.05


def test_head_error_fails_and_one_sided_records_are_listed(dry_run, tmp_path, run_compare):
    head = copy.deepcopy(dry_run)
    _record(head, SLOW_KEY).update(
        status="error", reason="RuntimeError: boom", median_ms=None, samples_ms=None
    )
    head["records"] = [r for r in head["records"] if r["suite"] != "gemm"]
    rc, out, comp = run_compare(_write(tmp_path, "b", dry_run), _write(tmp_path, "h", head))
    assert rc == 1 and "HEAD ERROR" in out
    assert _verdicts(comp)[SLOW_KEY] == "head error"
    gemm = [r for r in comp["rows"] if r["suite"] == "gemm"]
    assert len(gemm) == 4 and all(
        r["verdict"] == "not compared" and r["note"] == "only in the base" for r in gemm
    )


# ---------------------------------------------------------------------------------------------------
# two revisions
# ---------------------------------------------------------------------------------------------------


def test_schedule_alternates_and_reverses():
    assert revs.schedule(3) == [(1, "A"), (1, "B"), (2, "B"), (2, "A"), (3, "A"), (3, "B")]


def test_merge_rounds_concatenates_samples(dry_run):
    second = _scaled(dry_run, SLOW_KEY, 1.1)
    _record(second, ("gemm", "square 8192x8192x8192", "cublas")).update(status="error", reason="boom")
    merged = revs.merge_rounds([dry_run, second], label="A = main")
    one, two, m = (_record(r, SLOW_KEY) for r in (dry_run, second, merged))
    assert m["samples_ms"] == one["samples_ms"] + two["samples_ms"]
    assert m["n_samples"] == one["n_samples"] + two["n_samples"]
    assert one["median_ms"] < m["median_ms"] < two["median_ms"]
    assert m["gbps"] == pytest.approx(m["bytes"] / m["median_ms"] / 1e6)
    bad = _record(merged, ("gemm", "square 8192x8192x8192", "cublas"))
    assert bad["status"] == "error" and bad["reason"] == "round 2: boom" and bad["median_ms"] is None
    assert merged["env"]["rounds"] == 2 and merged["env"]["label"] == "A = main"


def _throwaway_repo(root):
    """This repository's files (tracked and new, as they are now) in two commits, the second trivial."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO_ROOT / name
        if name.startswith("bench/results/") or not src.is_file():
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, root / name)
    git = lambda *a: subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=root, check=True, capture_output=True
    )
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    gemm = root / "bench" / "suites" / "gemm.py"  # a trivial change that shows in the records' notes
    gemm.write_text(gemm.read_text().replace('notes=f"A', 'notes=f"(two) A'))
    git("commit", "-qam", "two")
    return git


def test_revs_runs_both_revisions_in_worktrees(tmp_path):
    repo = tmp_path / "repo"
    _throwaway_repo(repo)
    sha = lambda rev: subprocess.run(
        ["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    out = tmp_path / "out"
    rc, text = bench_cli("compare", "--revs", "HEAD~1", "HEAD", "gemm", "--dry-run", "--rounds", "1",
                         "--out", str(out), cwd=repo)  # fmt: skip
    assert rc == 0, text
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["base"]["sha"] == sha("HEAD~1") and comp["head"]["sha"] == sha("HEAD")
    assert comp["summary"]["within noise"] == 4 and comp["base"]["rounds"] == 1
    for side, rev in (("A", "HEAD~1"), ("B", "HEAD")):  # each ran its commit's code, and knew its sha
        run = read_results(out / side / "round-1" / "results.json")
        assert run["env"]["git"]["sha"] == sha(rev)
        assert {r["notes"].startswith("(two)") for r in run["records"]} == {side == "B"}
    assert f"A = HEAD~1 = {sha('HEAD~1')}" in text and "run 2/2: B" in text
    # the worktrees are gone, and the repository is as it was
    listed = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1
    assert not subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
    ).stdout


def test_revs_refuses_unknown_revision_and_no_gpu(tmp_path):
    rc, text = bench_cli("compare", "--revs", "HEAD", "no-such-rev-xyz", "gemm", "--dry-run")
    assert rc == 2 and "'no-such-rev-xyz' is not a commit" in text
    rc, text = bench_cli("compare", "--revs", "HEAD", "HEAD", "gemm")
    assert rc == 2 and "no CUDA GPU" in text and "--dry-run" in text
