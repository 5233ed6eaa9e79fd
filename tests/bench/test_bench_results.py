"""Results files: JSON schema round trip, CSV consistent with the JSON, harness record logic, plots."""

import json
import math

import pytest

from bench import harness
from bench.env import collect_env
from bench.plot import plot_results
from bench.registry import Case, Provider
from bench.resultsfile import (
    REQUIRED_RECORD_KEYS,
    SCHEMA,
    make_results,
    read_csv,
    read_results,
    write_results,
)


def _never_called():
    raise AssertionError("--dry-run must not set providers up")


def synthetic_results(dry_run: bool = True, seed_label: str = "a") -> dict:
    """A small results object from the harness's own record code: 2 series x 3 sizes x 2 providers."""
    cases = [
        Case(
            suite="synth",
            label=f"{mode} n={n}",
            params={"n": n, "mode": mode, "tokens": 4 * n},
            flops=2.0 * n**3,
            bytes=6.0 * n * n,
            providers=[Provider("ref", _never_called), Provider(f"ours-{seed_label}", _never_called)],
            baseline="ref",
            x="n",
            series=("mode",),
        )
        for mode in ("fwd", "bwd")
        for n in (256, 1024, 4096)
    ]
    ceilings = harness.measure_ceilings(fake=True)
    records = []
    for case in cases:
        recs = [
            harness.measure_provider(case, p, ceilings, dry_run=True, timing=harness.Timing())
            for p in case.providers
        ]
        harness.set_speedups(recs)
        records += recs
    env = collect_env() | {"ceilings": ceilings, "dry_run": dry_run, "timestamp": "2026-01-01T00:00:00+00:00"}
    return make_results(env, records)


def test_json_round_trip(tmp_path):
    results = synthetic_results()
    json_path, _ = write_results(results, tmp_path / "out")
    back = read_results(json_path)
    assert back == json.loads(json.dumps(results))
    assert back["schema"] == SCHEMA
    assert len(back["records"]) == 12
    for rec in back["records"]:
        assert set(REQUIRED_RECORD_KEYS) <= set(rec)
        assert rec["fake"] is True and rec["status"] == "ok"
        assert math.isclose(rec["tflops"], rec["flops"] / rec["median_ms"] / 1e9)
        assert math.isclose(rec["tokens_per_s"], rec["params"]["tokens"] / rec["median_ms"] * 1e3)
        base = next(r for r in back["records"] if r["case"] == rec["case"] and r["is_baseline"])
        assert math.isclose(rec["speedup"], base["median_ms"] / rec["median_ms"])
    # not every provider equals the baseline: the speedups actually vary
    assert len({round(r["speedup"], 6) for r in back["records"]}) > 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: r.update(schema="other/1"), "not a golfbench results file"),
        (lambda r: r["env"].pop("ceilings"), "env lacks"),
        (lambda r: r["records"][3].pop("median_ms"), "record 3"),
        (lambda r: r["records"][0].update(status="fine"), "status"),
    ],
)
def test_validation_names_the_problem(tmp_path, damage, message):
    results = synthetic_results()
    json_path, _ = write_results(results, tmp_path)
    obj = json.loads(json_path.read_text())
    damage(obj)
    json_path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=message):
        read_results(json_path)


def test_csv_matches_json(tmp_path):
    results = synthetic_results()
    results["records"][1].update(status="error", reason="RuntimeError: boom, with a comma", median_ms=None)
    results["records"][1].update(p20_ms=None, p80_ms=None, tflops=None, gbps=None, speedup=None)
    json_path, csv_path = write_results(results, tmp_path)
    rows = read_csv(csv_path)
    records = read_results(json_path)["records"]
    assert len(rows) == len(records)
    for row, rec in zip(rows, records):
        for key in ("suite", "case", "provider", "status", "baseline"):
            assert row[key] == str(rec[key])
        for key in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "speedup", "tokens_per_s"):
            if rec[key] is None:
                assert row[key] == ""
            else:
                assert float(row[key]) == rec[key]  # exact: the CSV holds the JSON's numbers
        assert int(row["param.n"]) == rec["params"]["n"] and row["param.mode"] == rec["params"]["mode"]
    assert rows[1]["reason"] == "RuntimeError: boom, with a comma"


def test_skipped_and_failing_providers_get_records():
    def broken_setup():
        raise RuntimeError("setup exploded")

    case = Case(
        "synth",
        "one",
        {"n": 1},
        1.0,
        1.0,
        [
            Provider("ref", broken_setup),
            Provider("absent", _never_called, lambda: "needs a Blackwell GPU"),
        ],
        baseline="ref",
    )
    ceilings = harness.measure_ceilings(fake=True)
    err, skip = (
        harness.measure_provider(case, p, ceilings, dry_run=False, timing=harness.Timing())
        for p in case.providers
    )
    assert err["status"] == "error" and "setup exploded" in err["reason"] and err["median_ms"] is None
    assert skip["status"] == "skipped" and skip["reason"] == "needs a Blackwell GPU"
    harness.set_speedups([err, skip])
    assert err["speedup"] is None and skip["speedup"] is None


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_png_per_suite_series_and_metric(tmp_path):
    run1, _ = write_results(synthetic_results(seed_label="a"), tmp_path / "run1")
    run2, _ = write_results(synthetic_results(seed_label="b"), tmp_path / "run2")
    written = plot_results([run1, run2], tmp_path / "plots")
    names = sorted(p.name for p in written)
    # series "mode" splits the 6 cases into two figures; flops > 0 -> a TFLOP/s plot
    assert names == sorted(
        f"synth-mode_{m}-{metric}.png"
        for m in ("fwd", "bwd")
        for metric in ("median_ms", "tflops", "speedup")
    )
    for p in written:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p


def test_plot_skips_failed_records(tmp_path):
    results = synthetic_results()
    for r in results["records"]:
        r.update(status="skipped", reason="no GPU", median_ms=None)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert plot_results([path], tmp_path / "plots") == []


def test_summarize_keeps_thinned_samples_and_exact_quantiles():
    import numpy as np

    rng = np.random.default_rng(0)
    times = list(rng.lognormal(0.0, 0.1, 5000))
    s = harness.summarize(times)
    assert s["n_samples"] == 5000 and len(s["samples_ms"]) == harness.MAX_SAMPLES
    first, last = (pytest.approx(t, rel=1e-5) for t in (times[0], times[-1]))  # 6 significant digits
    assert s["samples_ms"][0] == first and s["samples_ms"][-1] == last
    for key, q in (("median_ms", 0.5), ("p20_ms", 0.2), ("p80_ms", 0.8)):
        assert s[key] == pytest.approx(np.quantile(times, q), rel=1e-12)  # over all samples, not the kept
    assert harness.summarize([3.0, 1.0, 2.0])["samples_ms"] == [3.0, 1.0, 2.0]  # time order kept
    with pytest.raises(ValueError, match="no timing samples"):
        harness.summarize([])


def test_progress_bar_counts_every_run_and_log_lines_still_print():
    import io

    import bench.suites  # noqa: F401  (registers the suites)

    bar, lines = io.StringIO(), []
    records = harness.run_suites(
        ["gemm", "copy"],
        quick=True,
        dry_run=True,
        ceilings=harness.measure_ceilings(fake=True),
        timing=harness.Timing.for_mode(True),
        log=lines.append,
        progress=bar,
    )
    assert len(records) == len(lines) == 8  # 4 gemm + 2 x 2 copy, one log line each
    assert all(line.startswith(("[gemm]", "[copy]")) for line in lines)
    text = bar.getvalue()
    assert "8/8" in text and "<" in text and "copy 1 GiB | triton" in text  # count, time left, current run
    assert all(r["wall_s"] is not None and r["samples_ms"] for r in records)
    assert harness.wall_by_suite(records).keys() == {"gemm", "copy"}
    # without a bar nothing goes anywhere but the log
    lines.clear()
    harness.run_suites(
        ["gemm"], quick=True, dry_run=True, ceilings=harness.measure_ceilings(fake=True),
        timing=harness.Timing.for_mode(True), log=lines.append, progress=False,
    )  # fmt: skip
    assert len(lines) == 4


def test_bench_ms_asks_triton_for_every_sample(monkeypatch):
    import triton.testing

    # the installed Triton hands back the raw list for return_mode="all" only without quantiles
    assert triton.testing._summarize_statistics([3.0, 1.0, 2.0], None, "all") == [3.0, 1.0, 2.0]
    seen = {}

    def fake_cudagraph(fn, rep=20, grad_to_none=None, quantiles=None, return_mode="mean"):
        seen.update(rep=rep, quantiles=quantiles, return_mode=return_mode)
        return triton.testing._summarize_statistics([0.5, 0.4, 0.6, 0.45, 0.55], quantiles, return_mode)

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_cudagraph)
    out = harness.bench_ms(lambda: None, cuda_graph=True, timing=harness.Timing(rep_ms=77))
    assert seen == {"rep": 77, "quantiles": None, "return_mode": "all"}
    assert (
        out["n_samples"] == 5 and out["median_ms"] == 0.5 and out["samples_ms"] == [0.5, 0.4, 0.6, 0.45, 0.55]
    )


@pytest.mark.gpu
def test_bench_ms_on_the_gpu_keeps_raw_samples():
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for graph in (False, True):
        out = harness.bench_ms(lambda: a @ a, cuda_graph=graph, timing=harness.Timing(10, 50, 5))
        s = out["samples_ms"]
        assert out["n_samples"] >= len(s) >= (10 if graph else 5) and len(s) <= harness.MAX_SAMPLES
        assert min(s) <= out["p20_ms"] <= out["median_ms"] <= out["p80_ms"] <= max(s)
        assert 0.05 < out["median_ms"] < 5.0  # a 4096^3 bf16 matmul: ~0.2 ms on an H100/H200
