"""PNG plots of results files: per suite, per series (case.series), per metric; and of a train.py run.

Each results figure has one line per provider (and per results file when several are given) of the
median against the case's x parameter, with a shaded p20-p80 band; TFLOP/s and GB/s plots carry the
run's measured ceiling as a dashed line; the title names the GPU and the git sha. A training run gets
loss.png and throughput.png from its metric records (`plot_training`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench.resultsfile import read_results  # noqa: E402

# metric -> (axis label, value from a record with its p20/p80 band, ceiling key in env.ceilings)
METRICS = {
    "median_ms": ("median time (ms)", None),
    "tflops": ("TFLOP/s", "matmul_tflops"),
    "gbps": ("GB/s", "copy_gbps"),
    "speedup": ("speedup vs baseline (x)", None),
}


def _band(rec: dict, metric: str, base_ms: float | None) -> tuple[float, float, float] | None:
    """(value, low, high) of `metric` for an ok record; the band comes from p20/p80 of its time."""
    ms, p20, p80 = rec["median_ms"], rec["p20_ms"], rec["p80_ms"]
    if metric == "median_ms":
        return ms, p20, p80
    if metric == "tflops":
        f = rec["flops"] / 1e9
        return f / ms, f / p80, f / p20
    if metric == "gbps":
        b = rec["bytes"] / 1e6
        return b / ms, b / p80, b / p20
    if base_ms is None:
        return None
    return base_ms / ms, base_ms / p80, base_ms / p20


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s).strip("_") or "all"


def _run_label(results: dict, path: Path) -> str:
    env = results["env"]
    return f"{path.parent.name or path.stem} @ {env['git']['short_sha']}"


def _x_value(rec: dict):
    return rec["params"].get(rec["x"]) if rec["x"] else rec["case"]


def _meant_as_results(path: Path) -> bool:
    """A file `bench run` wrote (results.json, results-<time>.json) or one that says it is a results file:
    when it cannot be read, that is an error to report, not a file to skip."""
    if path.name.startswith("results"):
        return True
    try:
        return '"golfbench.results' in path.read_text(errors="replace")[:200]
    except OSError:
        return False


def results_files(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """(the results files to plot, why each broken one is left out). A folder stands for every results
    JSON under it: other JSON files (reports, comparisons) are skipped, results files that cannot be read
    (corrupt, truncated, another schema) are named with the reason; with none readable, ValueError."""
    files: list[Path] = []
    broken: list[str] = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)
            continue
        found = []
        for f in sorted(p.rglob("*.json")):
            try:
                read_results(f)
            except ValueError as exc:
                if _meant_as_results(f):
                    broken.append(str(exc))
                continue
            found.append(f)
        if not found:
            if broken:
                raise ValueError(f"{p}: no readable results JSON under this folder: " + "; ".join(broken))
            raise ValueError(
                f"{p}: no results JSON under this folder (python -m bench run writes results.json)"
            )
        files += found
    return files, broken


def plot_results(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the PNGs for the given results files into out_dir; returns the files written."""
    runs = [(Path(p), read_results(p)) for p in paths]
    multi = len(runs) > 1
    # (suite, series values) -> list of (run index, record)
    groups: dict[tuple[str, tuple], list[tuple[int, dict]]] = defaultdict(list)
    for i, (_, res) in enumerate(runs):
        for rec in res["records"]:
            if rec["status"] != "ok":
                continue
            series = tuple((k, rec["params"].get(k)) for k in rec["series"])
            groups[(rec["suite"], series)].append((i, rec))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (suite, series), items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        metrics = ["median_ms"]
        if any(r["flops"] > 0 for _, r in items):
            metrics.append("tflops")
        elif any(r["bytes"] > 0 for _, r in items):
            metrics.append("gbps")
        metrics.append("speedup")
        for metric in metrics:
            path = _plot_one(suite, series, metric, items, runs, multi, out_dir)
            written.append(path)
    return written


def _plot_one(suite, series, metric, items, runs, multi, out_dir: Path) -> Path:
    label, ceiling_key = METRICS[metric]
    xs_all = [_x_value(r) for _, r in items]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    categories = list(dict.fromkeys(xs_all)) if not numeric else []
    base_ms = {(i, r["case"]): r["median_ms"] for i, r in items if r["is_baseline"]}
    lines: dict[tuple[int, str], list] = defaultdict(list)
    for i, r in items:
        point = _band(r, metric, base_ms.get((i, r["case"])))
        if point is not None:
            lines[(i, r["provider"])].append((_x_value(r), *point))

    fig, ax = plt.subplots(figsize=(8, 5))
    for (i, provider), pts in sorted(lines.items()):
        if numeric:
            pts.sort(key=lambda p: p[0])
        xs = [p[0] if numeric else categories.index(p[0]) for p in pts]
        name = f"{provider} [{_run_label(runs[i][1], runs[i][0])}]" if multi else provider
        (line,) = ax.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.2)
    if ceiling_key:
        seen = set()
        for i, (path, res) in enumerate(runs):
            ceil = (res["env"].get("ceilings") or {}).get(ceiling_key)
            if ceil is None or f"{ceil:.0f}" in seen:
                continue
            seen.add(f"{ceil:.0f}")
            fake = " FAKE" if res["env"]["ceilings"].get("fake") else ""
            who = f" [{_run_label(res, path)}]" if multi else ""
            ax.axhline(
                ceil,
                linestyle="--",
                color="gray" if i == 0 else "black",
                linewidth=1.0,
                label=f"measured ceiling {ceil:.0f}{fake}{who}",
            )
    if metric == "speedup":
        ax.axhline(1.0, linestyle=":", color="black", linewidth=0.8)
    x_name = items[0][1]["x"] or "case"
    if numeric:
        if min(xs_all) > 0 and max(xs_all) / min(xs_all) > 8:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    else:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=20, ha="right")
    ax.set_xlabel(x_name)
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    gpus = sorted({(res["env"].get("gpu") or {}).get("name", "no GPU") for _, res in runs})
    shas = sorted({res["env"]["git"]["short_sha"] for _, res in runs})
    fake = " — FAKE TIMINGS (--dry-run)" if any(res["env"].get("dry_run") for _, res in runs) else ""
    series_txt = ", ".join(f"{k}={v}" for k, v in series)
    ax.set_title(
        f"{suite}{' (' + series_txt + ')' if series_txt else ''}: {label}{fake}\n"
        f"{' / '.join(gpus)} @ {' / '.join(shas)}",
        fontsize=10,
    )
    fig.tight_layout()
    stem = "-".join([suite] + [_slug(f"{k}={v}") for k, v in series] + [metric])
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(run_dir: str | Path, records: list[dict]) -> None:
    """loss.png (train loss per step, validation loss) and throughput.png (tok/s per metric window and
    cumulative) in run_dir, from train.py's metric records (metrics.jsonl)."""
    steps = [r for r in records if "loss" in r and "kind" not in r]
    vals = [r for r in records if r.get("kind") == "val"]
    if steps:
        curves = [([r["step"] for r in steps], [r["loss"] for r in steps], dict(lw=1, label="train loss"))]
        if vals:
            xs, ys = [r["step"] for r in vals], [r["val_loss"] for r in vals]
            curves.append((xs, ys, dict(marker="o", label="val loss (live weights)")))
        _save_curves(Path(run_dir) / "loss.png", "loss (nats/token)", curves)
    tps = [r for r in steps if "tok_s" in r]
    if tps:
        xs = [r["step"] for r in tps]
        curves = [
            (xs, [r["tok_s"] for r in tps], dict(marker="o", label="tok/s (window)")),
            (xs, [r["tok_s_avg"] for r in tps], dict(linestyle="--", label="tok/s (cumulative)")),
        ]
        _save_curves(Path(run_dir) / "throughput.png", "tokens / s", curves)


def _save_curves(path: Path, ylabel: str, curves: list[tuple[list, list, dict]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for xs, ys, style in curves:
        ax.plot(xs, ys, **style)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
