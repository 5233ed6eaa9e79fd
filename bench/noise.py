"""Run-to-run noise of medians on one GPU model, and the thresholds derived from it.

Two runs of the same revision on the same GPU never agree exactly: clocks, temperature, memory
placement and (for bf16 GEMMs) cuBLAS's choice between kernels move a median by a few percent from one
run to the next, much more than the spread within one run suggests. The threshold of a suite is that
noise with a margin: a change of a median smaller than it is "within noise" for `bench compare`, and
the gate fails only beyond it. It is measured, per GPU model, from two runs of one revision:

    python -m bench run gemm copy mlp muon ce --out runs/bench/noise-1
    python -m bench run gemm copy mlp muon ce --out runs/bench/noise-2
    python -m bench gate --derive-threshold runs/bench/noise-1/results.json runs/bench/noise-2/results.json

which writes bench/baselines/<gpu-slug>/threshold.json (commit it with the baseline):

    {"schema": "golfbench.threshold/1", "gpu": "NVIDIA H200", "gate_pct": 12, "default_pct": 12,
     "suites": {"gemm": {"threshold_pct": 12, "noise_pct": 7.3, "worst": "case | provider", "records": 4},
                ...},
     "rule": "...", "derived_from": [{"path", "sha", "timestamp", "quick"}, ...], "derived_at": "..."}

Rule: noise_pct = the largest |change| of a median between the two runs over the suite's records,
as max(r, 1/r) - 1 of the ratio r (symmetric for faster and slower); threshold_pct = max(MIN_PCT,
ceil(MARGIN x noise_pct)). The margin is that of the H100's 15% (9.4% measured): two runs see only a
sample of the noise, and a third run may go further. `bench gate` uses gate_pct (pytest-benchmark
takes one threshold for all tests): the largest suite threshold. `bench compare` uses each suite's own,
and default_pct (also the largest) for suites without one.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

from bench.env import REPO_ROOT, gpu_slug

# Allowed slowdown of a median before the gate fails / compare says "slower", in percent, where no
# threshold was derived for the GPU. Set from the noise floor measured on the H100 on 2026-11-24: two
# `bench run gemm copy` of one commit differed by up to 9.4% in a median (bf16 GEMMs are bimodal
# there; copies >= 64 MiB agree within 1%), so 15% leaves a margin above it.
DEFAULT_THRESHOLD_PCT = 15

BASELINES_DIR = REPO_ROOT / "bench" / "baselines"
THRESHOLD_FILE = "threshold.json"
SCHEMA = "golfbench.threshold/1"
MARGIN = 1.5
MIN_PCT = 3
RULE = (
    f"per suite: threshold_pct = max({MIN_PCT}, ceil({MARGIN} x noise_pct)), noise_pct = largest "
    "100 x (max(r, 1/r) - 1) over the suite's records, r = ratio of the two runs' medians"
)


def change_pct(ratio: float) -> float:
    """Size of a change given as a ratio, in percent, the same for x1.1 and x1/1.1."""
    return 100.0 * (max(ratio, 1.0 / ratio) - 1.0)


def record_key(rec: dict) -> tuple[str, str, str]:
    return rec["suite"], rec["case"], rec["provider"]


def gpu_of(results: dict) -> str | None:
    return (results["env"].get("gpu") or {}).get("name")


def threshold_path(gpu: str, baselines: str | Path = BASELINES_DIR) -> Path:
    return Path(baselines) / gpu_slug(gpu) / THRESHOLD_FILE


def load_thresholds(
    gpu: str | None, baselines: str | Path = BASELINES_DIR
) -> tuple[dict | None, Path | None]:
    """(the threshold file of this GPU model, its path), or (None, path or None) when there is none."""
    if not gpu:
        return None, None
    path = threshold_path(gpu, baselines)
    if not path.exists():
        return None, path
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: unreadable threshold file ({exc}); re-derive it (--derive-threshold)"
        ) from None
    if data.get("schema") != SCHEMA or data.get("gpu") != gpu:
        raise ValueError(
            f"{path}: not a threshold file for {gpu!r} "
            f"(schema {data.get('schema')!r}, gpu {data.get('gpu')!r})"
        )
    return data, path


def suite_thresholds(
    gpu: str | None, override_pct: float | None = None, baselines: str | Path = BASELINES_DIR
) -> tuple[dict[str, float], float, str]:
    """({suite: pct}, pct for other suites, where they come from) for comparing runs on `gpu`."""
    if override_pct is not None:
        return {}, float(override_pct), f"--threshold {override_pct:g}% for every suite"
    data, path = load_thresholds(gpu, baselines)
    if data is None:
        where = f"no {path} yet" if path else "no GPU"
        return {}, float(DEFAULT_THRESHOLD_PCT), f"default {DEFAULT_THRESHOLD_PCT}% ({where})"
    per_suite = {s: float(v["threshold_pct"]) for s, v in data["suites"].items()}
    return per_suite, float(data["default_pct"]), f"per suite from {path}"


def gate_threshold(gpu: str, baselines: str | Path = BASELINES_DIR) -> tuple[int, str]:
    """(percent, where it comes from) for the gate on `gpu`."""
    data, path = load_thresholds(gpu, baselines)
    if data is None:
        return DEFAULT_THRESHOLD_PCT, (
            f"the default (no {path}: derive one for this GPU with "
            "`python -m bench gate --derive-threshold RUN1.json RUN2.json`)"
        )
    return int(math.ceil(data["gate_pct"])), f"{path}, derived {data.get('derived_at', '?')}"


def derive(
    run1: dict, run2: dict, *, sources: tuple[str, str] = ("run1", "run2"), force: bool = False
) -> dict:
    """The threshold file's content from two results of one revision on one GPU (ValueError if not)."""
    gpus = gpu_of(run1), gpu_of(run2)
    problems = []
    if not gpus[0] or not gpus[1]:
        raise ValueError(
            f"thresholds are per GPU model, and {sources[0 if not gpus[0] else 1]} was not run on a GPU"
        )
    if gpus[0] != gpus[1]:
        raise ValueError(f"the runs are from different GPU models: {gpus[0]!r} and {gpus[1]!r}")
    shas = run1["env"]["git"]["sha"], run2["env"]["git"]["sha"]
    if shas[0] != shas[1]:
        problems.append(f"different revisions ({shas[0][:10]} and {shas[1][:10]}): noise is measured on one")
    if run1["env"].get("dry_run") or run2["env"].get("dry_run"):
        problems.append("a run is a --dry-run: its timings are fake")
    if bool(run1["env"].get("quick")) != bool(run2["env"].get("quick")):
        problems.append("one run is --quick and the other is not")
    if problems and not force:
        raise ValueError("refusing to derive a threshold: " + "; ".join(problems) + " (--force overrides)")
    second = {record_key(r): r for r in run2["records"] if r["status"] == "ok"}
    suites: dict[str, dict] = {}
    for rec in run1["records"]:
        other = second.get(record_key(rec))
        if rec["status"] != "ok" or other is None:
            continue
        noise = change_pct(other["median_ms"] / rec["median_ms"])
        entry = suites.setdefault(rec["suite"], {"noise_pct": -1.0, "worst": None, "records": 0})
        entry["records"] += 1
        if noise > entry["noise_pct"]:
            entry.update(noise_pct=round(noise, 2), worst=f"{rec['case']} | {rec['provider']}")
    if not suites:
        raise ValueError(f"{sources[0]} and {sources[1]} have no successful record in common")
    for entry in suites.values():
        entry["threshold_pct"] = max(MIN_PCT, math.ceil(MARGIN * entry["noise_pct"]))
    top = max(e["threshold_pct"] for e in suites.values())
    return {
        "schema": SCHEMA,
        "gpu": gpus[0],
        "gate_pct": top,
        "default_pct": top,
        "suites": dict(sorted(suites.items())),
        "rule": RULE,
        "derived_from": [
            {
                "path": str(src),
                "sha": r["env"]["git"]["sha"],
                "timestamp": r["env"].get("timestamp"),
                "quick": bool(r["env"].get("quick")),
            }
            for src, r in zip(sources, (run1, run2))
        ],
        "forced_past": problems,
        "derived_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_thresholds(data: dict, baselines: str | Path = BASELINES_DIR) -> Path:
    from model.atomic import atomic_write  # model/ imports torch: not at `bench --help`

    path = threshold_path(data["gpu"], baselines)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
    return path


def format_thresholds(data: dict) -> str:
    lines = [f"noise thresholds for {data['gpu']} ({data['rule']}):"]
    for suite, e in data["suites"].items():
        lines.append(
            f"  {suite:<10} noise {e['noise_pct']:6.2f}% -> threshold {e['threshold_pct']:3d}%"
            f"   (worst: {e['worst']}; {e['records']} records)"
        )
    lines.append(f"  gate (one threshold for all perf tests): {data['gate_pct']}%")
    return "\n".join(lines)
