"""The results-file format of one `python -m bench run`: JSON (the source of truth), a CSV derived from
it, and the table printed at the end of a run. (Runs are written under runs/bench/; the published ones
are kept in bench/results/.)

    {"schema": "golfbench.results/1",
     "env": {python, torch, triton, git, gpu, datasheet, ceilings, dry_run, quick, timestamp, ...},
     "records": [{suite, case, provider, status, median_ms, p20_ms, p80_ms, tflops, gbps, speedup, ...}]}

Optional fields (absent in files written before they existed): env.suite_versions {suite: version},
env.wall_s; per record n_samples (calls timed), samples_ms (up to bench.harness.MAX_SAMPLES of the raw
per-call times, in time order, for bench/compare.py) and wall_s (seconds spent on the record).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from model.atomic import atomic_write

SCHEMA = "golfbench.results/1"

REQUIRED_ENV_KEYS = ("python", "torch", "triton", "git", "gpu", "ceilings", "dry_run", "timestamp")
REQUIRED_RECORD_KEYS = (
    "suite",
    "case",
    "provider",
    "baseline",
    "is_baseline",
    "status",
    "reason",
    "fake",
    "params",
    "x",
    "series",
    "flops",
    "bytes",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_bytes",
    "tflops",
    "gbps",
    "pct_matmul_ceiling",
    "pct_copy_ceiling",
    "tokens_per_s",
    "speedup",
)
STATUSES = ("ok", "skipped", "error")

# CSV: one row per record; params flattened to "param.<name>" columns after these.
CSV_COLUMNS = (
    "suite",
    "case",
    "provider",
    "baseline",
    "status",
    "reason",
    "fake",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "n_samples",
    "tflops",
    "gbps",
    "pct_matmul_ceiling",
    "pct_copy_ceiling",
    "tokens_per_s",
    "speedup",
    "peak_mem_bytes",
    "wall_s",
    "flops",
    "bytes",
    "gpu",
    "git_sha",
)


def validate(results: dict, source: str = "results") -> dict:
    """Raise ValueError naming `source` and what is missing when `results` is not a results file."""
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        found = results.get("schema") if isinstance(results, dict) else type(results).__name__
        raise ValueError(f"{source}: not a golfbench results file (schema {found!r}, expected {SCHEMA!r})")
    for key in ("env", "records"):
        if key not in results:
            raise ValueError(f"{source}: missing top-level key {key!r}")
    missing = [k for k in REQUIRED_ENV_KEYS if k not in results["env"]]
    if missing:
        raise ValueError(f"{source}: env lacks {missing}")
    for i, rec in enumerate(results["records"]):
        missing = [k for k in REQUIRED_RECORD_KEYS if k not in rec]
        if missing:
            raise ValueError(f"{source}: record {i} ({rec.get('suite')}/{rec.get('case')}) lacks {missing}")
        if rec["status"] not in STATUSES:
            raise ValueError(f"{source}: record {i} has status {rec['status']!r}, expected one of {STATUSES}")
        if rec["status"] == "ok" and rec["median_ms"] is None:
            raise ValueError(f"{source}: record {i} is 'ok' but has no median_ms")
        samples = rec.get("samples_ms")
        if samples is not None and not (
            isinstance(samples, list) and all(isinstance(v, (int, float)) and v > 0 for v in samples)
        ):
            raise ValueError(f"{source}: record {i} has samples_ms that are not a list of positive times")
    return results


def make_results(env: dict, records: list[dict]) -> dict:
    return validate({"schema": SCHEMA, "env": env, "records": records})


# A list of numbers (no strings, lists or objects in it), as json.dumps(indent=...) spreads it out
_NUMBER_LIST = re.compile(r"\[\n\s*([-+0-9.eE]+(?:,\n\s*[-+0-9.eE]+)*)\n\s*\]")


def dumps(results: dict) -> str:
    """The JSON text of a results object: indented, with lists of numbers (samples_ms) on one line."""
    text = json.dumps(results, indent=1, sort_keys=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ",".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def csv_rows(results: dict) -> tuple[list[str], list[dict]]:
    """Column names and rows of the CSV view of `results`."""
    gpu = (results["env"].get("gpu") or {}).get("name", "none")
    sha = results["env"]["git"]["sha"]
    param_keys = sorted({k for r in results["records"] for k in r["params"]})
    columns = list(CSV_COLUMNS) + [f"param.{k}" for k in param_keys]
    rows = []
    for r in results["records"]:
        row = {k: r.get(k) for k in CSV_COLUMNS}
        row.update(gpu=gpu, git_sha=sha)
        row.update({f"param.{k}": r["params"].get(k) for k in param_keys})
        rows.append(row)
    return columns, rows


def write_results(results: dict, out_dir: Path, stem: str = "results") -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.csv` into out_dir (created); returns both paths."""
    validate(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    csv_path = out_dir / f"{stem}.csv"
    with atomic_write(json_path, "w") as fh:
        fh.write(dumps(results) + "\n")
    columns, rows = csv_rows(results)
    with atomic_write(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            # repr keeps floats exact, so the CSV is the JSON's numbers, not rounded copies
            writer.writerow(
                {k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in row.items()}
            )
    return json_path, csv_path


def read_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such results file (python -m bench run writes them)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return validate(obj, str(path))


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: dict) -> str:
    """suite | case | provider | median ms (p20-p80) | TFLOP/s | GB/s | speedup, one line per record."""
    fake = results["env"].get("dry_run")
    header = ["suite", "case", "provider", "median ms (p20-p80)", "TFLOP/s", "GB/s", "speedup"]
    if fake:
        header[3] = "FAKE TIMINGS: median ms"
    rows = []
    for r in results["records"]:
        if r["status"] == "ok":
            timing = f"{r['median_ms']:.4f} ({r['p20_ms']:.4f}-{r['p80_ms']:.4f})"
        else:
            reason = r["reason"] or ""
            timing = f"{r['status'].upper()}: {reason[:60]}{'...' if len(reason) > 60 else ''}"
        speed = _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else "")
        if r["is_baseline"] and r["status"] == "ok":
            speed += " (base)"
        rows.append(
            [
                r["suite"],
                r["case"],
                r["provider"],
                timing,
                _fmt(r["tflops"], ".1f"),
                _fmt(r["gbps"], ".1f"),
                speed,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    if fake:
        out.insert(0, "FAKE TIMINGS (--dry-run): nothing below was measured")
    return "\n".join(out)
