"""A/B of two benchmark runs: per (suite, case, provider), the ratio of medians and a verdict.

    python -m bench compare BASE.json HEAD.json [--threshold PCT] [--out DIR] [--force]
    python -m bench compare --revs REV_A REV_B [SUITE ...] [--rounds N] [--quick] [--dry-run]  (bench/revs.py)

ratio = head median / base median (a time ratio: > 1 is slower). Verdicts:
  slower        ratio > 1 + t  and the confidence interval of the ratio lies above 1
  faster        ratio < 1 / (1 + t)  and the interval lies below 1
  within noise  otherwise
  head error    the head's provider failed where the base's ran (counts as a failure)
  not compared  missing on one side, skipped, or failed in the base (the note says which)
Exit status: 1 when a record is slower (or newly fails), 0 otherwise, 2 when the runs cannot be
compared (different GPU models, suite versions, dry-run vs measured, quick vs full; --force compares
anyway and records what it forced past) or share no case timed on both sides.

Why two tests, and why these. A run's records carry the raw per-call times (`samples_ms`). Two sources
of noise separate a base median from a head median:
  1. within a run: which calls happened to be sampled. With hundreds of samples the median is known
     to a fraction of a percent; a training step timed 10 times is known far less well.
  2. between runs: clocks, temperature, allocator and cuBLAS heuristics move a whole run's medians by
     several percent at once (9.4% for bf16 GEMMs on the H100) -- far beyond what the samples of one
     run can show, because they all share that run's state.
(1) is measured here with a bootstrap confidence interval of the ratio of medians: each side's
samples are resampled with replacement (RESAMPLES times, numpy, a seeded generator per record, so
the verdict is reproducible) and the central `confidence` share of the resampled ratios is the
interval. The bootstrap is chosen over a Mann-Whitney U (rank) test because it is about the statistic
we report -- the ratio of medians, with an interval that reads as an effect size -- rather than a
p-value for "the distributions differ", which any two runs with thousands of samples pass; it needs
no normality, no scipy, no tie correction (event timers quantise times), and it degrades gracefully
with few samples: with 10 calls the interval is about as wide as the data, so only a change larger
than the spread of the calls counts. Records with fewer than MIN_SAMPLES on a side (or written
before samples were kept) get no interval and are judged on the threshold alone, which the note says.
(2) cannot be seen in one pair of runs; it is the threshold t, measured per GPU model and suite from
two runs of one revision (bench/noise.py: bench/baselines/<gpu>/threshold.json, else 15%). A
difference inside +-t is "within noise" even when the bootstrap calls it significant, and a
difference beyond t counts only if the interval excludes "no change" too. Caveat: calls within a run
are not independent (clock drift), so the interval is optimistic; that is one more reason the
threshold from repeated runs is the main guard, and why `--revs` alternates the two revisions.
"""

from __future__ import annotations

import datetime as dt
import json
import zlib
from pathlib import Path

import numpy as np

from bench.env import output_folder
from bench.noise import change_pct, gpu_of, record_key, suite_thresholds
from model.atomic import atomic_write

SCHEMA = "golfbench.compare/1"
RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_SAMPLES = 3
VERDICTS = ("faster", "slower", "within noise", "head error", "not compared")
FAILING = ("slower", "head error")


# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------


def bootstrap_ratio_ci(
    base: list[float],
    head: list[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed=0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of median(head) / median(base), both sides resampled."""
    rng = np.random.default_rng(seed)
    b, h = np.asarray(base, dtype=np.float64), np.asarray(head, dtype=np.float64)
    mb = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)
    mh = np.median(h[rng.integers(0, h.size, size=(resamples, h.size))], axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(mh / mb, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def verdict(ratio: float, ci: tuple[float, float] | None, threshold_pct: float) -> tuple[str, str]:
    """(verdict, note) for a time ratio head/base, its interval (None: none) and the noise threshold."""
    band = 1.0 + threshold_pct / 100.0
    beyond = "slower" if ratio > band else "faster" if ratio < 1.0 / band else None
    if beyond is None:
        return "within noise", ""
    if ci is None:
        return beyond, "no interval (too few samples): judged on the threshold alone"
    if (beyond == "slower" and ci[0] > 1.0) or (beyond == "faster" and ci[1] < 1.0):
        return beyond, ""
    return "within noise", f"{beyond} beyond the threshold, but the interval includes no change"


def _samples(rec: dict) -> list[float] | None:
    s = rec.get("samples_ms")
    return s if s and len(s) >= MIN_SAMPLES else None


def compare_records(
    base: dict,
    head: dict,
    *,
    thresholds: dict[str, float],
    default_pct: float,
    confidence: float = CONFIDENCE,
) -> list[dict]:
    """One row per (suite, case, provider) of either run, in the head's order, then base-only ones."""
    base_by = {record_key(r): r for r in base["records"]}
    head_by = {record_key(r): r for r in head["records"]}
    keys = list(head_by) + [k for k in base_by if k not in head_by]
    rows = []
    for key in keys:
        b, h = base_by.get(key), head_by.get(key)
        t = thresholds.get(key[0], default_pct)
        row = {
            "suite": key[0],
            "case": key[1],
            "provider": key[2],
            "base_ms": None,
            "head_ms": None,
            "ratio": None,
            "change_pct": None,
            "ci_low": None,
            "ci_high": None,
            "threshold_pct": t,
            "n_base": None,
            "n_head": None,
            "verdict": "not compared",
            "note": "",
        }
        rows.append(row)
        if b is None or h is None:
            row["note"] = "only in the head" if b is None else "only in the base"
            continue
        row.update(base_ms=b["median_ms"], head_ms=h["median_ms"], n_base=b.get("n_samples"))
        row["n_head"] = h.get("n_samples")
        if b["status"] != "ok" or h["status"] != "ok":
            if b["status"] == "ok" and h["status"] == "error":
                row.update(verdict="head error", note=f"head: {h['reason']}")
            else:
                side, rec = ("base", b) if b["status"] != "ok" else ("head", h)
                row["note"] = f"{side} {rec['status']}: {rec['reason']}"
            continue
        ratio = h["median_ms"] / b["median_ms"]
        sb, sh = _samples(b), _samples(h)
        ci = None
        if sb and sh:
            seed = zlib.crc32("/".join(key).encode())
            ci = bootstrap_ratio_ci(sb, sh, confidence=confidence, seed=seed)
        v, note = verdict(ratio, ci, t)
        row.update(ratio=ratio, change_pct=100.0 * (ratio - 1.0), verdict=v, note=note)
        if ci:
            row.update(ci_low=ci[0], ci_high=ci[1])
    return rows


# ---------------------------------------------------------------------------------------------------
# compatibility
# ---------------------------------------------------------------------------------------------------


def check_compatible(base: dict, head: dict) -> tuple[list[str], list[str]]:
    """(problems that make the comparison meaningless, notes worth reading) for two results."""
    eb, eh = base["env"], head["env"]
    problems, notes = [], []
    gb, gh = gpu_of(base), gpu_of(head)
    if gb != gh:
        problems.append(
            f"different GPU models: base on {gb or 'no GPU'!r}, head on {gh or 'no GPU'!r}; "
            "timings are only comparable on one model"
        )
    if bool(eb.get("dry_run")) != bool(eh.get("dry_run")):
        fake = "base" if eb.get("dry_run") else "head"
        problems.append(f"the {fake} is a --dry-run (fake timings) and the other is measured")
    if bool(eb.get("quick")) != bool(eh.get("quick")):
        quick = "base" if eb.get("quick") else "head"
        problems.append(f"the {quick} is a --quick run (other cases, shorter timing) and the other is full")
    vb, vh = eb.get("suite_versions"), eh.get("suite_versions")
    suites = {r["suite"] for r in base["records"]} & {r["suite"] for r in head["records"]}
    if vb is None or vh is None:
        older = " and ".join(n for n, v in (("base", vb), ("head", vh)) if v is None)
        notes.append(f"no suite versions in the {older} (written before they existed): not checked")
    else:
        for s in sorted(suites):
            if s in vb and s in vh and vb[s] != vh[s]:
                problems.append(
                    f"suite {s!r} changed version ({vb[s]} in the base, {vh[s]} in the head): its cases "
                    "time different work (bench/registry.py says when a version is bumped)"
                )
    if eb["git"]["sha"] == eh["git"]["sha"] and eb["git"]["sha"] != "unknown":
        notes.append("both runs are of the same revision: this measures noise")
    for key in ("torch", "triton", "cuda_runtime"):
        if eb.get(key) != eh.get(key):
            notes.append(f"{key} differs: {eb.get(key)} (base) vs {eh.get(key)} (head)")
    driver = lambda e: (e.get("gpu") or {}).get("driver")
    if driver(eb) != driver(eh):
        notes.append(f"GPU driver differs: {driver(eb)} (base) vs {driver(eh)} (head)")
    for name, e in (("base", eb), ("head", eh)):
        if e["git"].get("dirty"):
            notes.append(f"the {name} was run from a tree with uncommitted changes")
    no_samples = [
        n for n, r in (("base", base), ("head", head)) if not any(x.get("samples_ms") for x in r["records"])
    ]
    if no_samples:
        notes.append(
            f"no raw samples in the {' and '.join(no_samples)} (an older results file): "
            "verdicts from the threshold alone"
        )
    return problems, notes


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------


def _side(results: dict, path: str | Path | None) -> dict:
    e = results["env"]
    return {
        "path": str(path) if path else None,
        "sha": e["git"]["sha"],
        "short_sha": e["git"]["short_sha"],
        "label": e.get("label"),
        "gpu": gpu_of(results),
        "timestamp": e.get("timestamp"),
        "dry_run": bool(e.get("dry_run")),
        "quick": bool(e.get("quick")),
        "rounds": e.get("rounds"),
        "suites": sorted({r["suite"] for r in results["records"]}),
    }


def make_comparison(
    base: dict,
    head: dict,
    *,
    base_path=None,
    head_path=None,
    threshold_pct: float | None = None,
    baselines=None,
    confidence: float = CONFIDENCE,
    force: bool = False,
) -> dict:
    """The comparison of two results (ValueError naming the problems when incompatible, unless force)."""
    problems, notes = check_compatible(base, head)
    if problems and not force:
        raise ValueError("refusing to compare: " + "; ".join(problems) + ". Pass --force to compare anyway.")
    kw = {"baselines": baselines} if baselines else {}
    per_suite, default_pct, source = suite_thresholds(gpu_of(head), threshold_pct, **kw)
    rows = compare_records(base, head, thresholds=per_suite, default_pct=default_pct, confidence=confidence)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base": _side(base, base_path),
        "head": _side(head, head_path),
        "method": {
            "ratio": "head median / base median (time; > 1 is slower)",
            "interval": f"{confidence:.0%} percentile bootstrap of the ratio of medians, {RESAMPLES} "
            f"resamples of each side's samples, seeded per record; none below {MIN_SAMPLES} samples",
            "verdict": "slower/faster when the ratio leaves the noise band +-threshold AND the interval "
            "excludes 1; else within noise",
            "thresholds": source,
            "threshold_pct": {"default": default_pct, **per_suite},
        },
        "problems_forced": problems,
        "notes": notes,
        "summary": counts,
        "failed": counts["slower"] + counts["head error"] > 0,
        "rows": rows,
    }


def _cell(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_comparison(comp: dict) -> str:
    b, h = comp["base"], comp["head"]
    name = lambda s: f"{s['label'] + ' ' if s.get('label') else ''}{s['short_sha']}"
    rounds = lambda s: f", {s['rounds']} rounds" if s.get("rounds") else ""
    lines = [
        f"base: {name(b)} ({b['path'] or '-'}{rounds(b)})",
        f"head: {name(h)} ({h['path'] or '-'}{rounds(h)})",
        f"GPU: {h['gpu'] or 'none'}{'  FAKE TIMINGS (--dry-run)' if h['dry_run'] or b['dry_run'] else ''}"
        f"{'  quick' if h['quick'] else ''}",
        f"noise thresholds: {comp['method']['thresholds']}; interval: {comp['method']['interval']}",
    ]
    for p in comp["problems_forced"]:
        lines.append(f"FORCED past: {p}")
    for n in comp["notes"]:
        lines.append(f"note: {n}")
    level = comp["method"]["interval"].split("%")[0] + "%"
    header = [
        "suite",
        "case",
        "provider",
        "base ms",
        "head ms",
        "head/base",
        f"{level} CI",
        "noise",
        "verdict",
    ]
    table = []
    for r in comp["rows"]:
        ci = f"{r['ci_low']:.3f}-{r['ci_high']:.3f}" if r["ci_low"] is not None else "-"
        v = r["verdict"].upper() if r["verdict"] in FAILING else r["verdict"]
        table.append(
            [
                r["suite"],
                r["case"],
                r["provider"],
                _cell(r["base_ms"], ".4f"),
                _cell(r["head_ms"], ".4f"),
                _cell(r["ratio"], ".3f"),
                ci,
                f"+-{r['threshold_pct']:g}%",
                v + (f" ({r['note']})" if r["note"] else ""),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines += ["", line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in table]
    s = comp["summary"]
    lines.append("")
    lines.append(
        f"{s['faster']} faster, {s['slower']} slower, {s['within noise']} within noise, "
        f"{s['head error']} failing in the head only, {s['not compared']} not compared"
    )
    bad = [r for r in comp["rows"] if r["verdict"] in FAILING]
    for r in bad:
        what = f"{change_pct(r['ratio']):.1f}% slower" if r["ratio"] else r["note"]
        lines.append(f"{r['verdict'].upper()}: {r['suite']} / {r['case']} / {r['provider']}: {what}")
    return "\n".join(lines)


COLORS = {"faster": "tab:green", "slower": "tab:red", "within noise": "tab:gray"}


def plot_comparison(comp: dict, path: str | Path) -> Path | None:
    """Ratio per compared record (log axis) with its interval, the noise band shaded, colored by
    verdict; GPU and shas in the title. None when no record was compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in comp["rows"] if r["ratio"] is not None]
    if not rows:
        return None
    n = len(rows)
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.24 * n))
    ys = list(range(n))[::-1]
    for y, r in zip(ys, rows):
        band = 1.0 + r["threshold_pct"] / 100.0
        ax.barh(y, band - 1.0 / band, left=1.0 / band, height=0.8, color="0.85", zorder=0)
        color = COLORS.get(r["verdict"], "black")
        err = None
        if r["ci_low"] is not None:
            err = [[max(r["ratio"] - r["ci_low"], 0.0)], [max(r["ci_high"] - r["ratio"], 0.0)]]
        ax.errorbar(r["ratio"], y, xerr=err, fmt="o", color=color, capsize=3, markersize=4, zorder=2)
    ax.axvline(1.0, color="black", linewidth=0.8, zorder=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    lo = min(min(r["ci_low"] or r["ratio"], r["ratio"], 1 / (1 + r["threshold_pct"] / 100)) for r in rows)
    hi = max(max(r["ci_high"] or r["ratio"], r["ratio"], 1 + r["threshold_pct"] / 100) for r in rows)
    ax.set_xlim(lo / 1.05, hi * 1.05)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=8))  # a narrow range: linear ticks
    ax.set_yticks(ys, [f"{r['suite']} | {r['case']} | {r['provider']}" for r in rows], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("head / base median time (< 1 faster, > 1 slower); bars: confidence interval")
    ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(color=c, label=v) for v, c in COLORS.items()] + [Patch(color="0.85", label="noise band")]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    b, h = comp["base"], comp["head"]
    fake = " — FAKE TIMINGS (--dry-run)" if b["dry_run"] or h["dry_run"] else ""
    s = comp["summary"]
    ax.set_title(
        f"{h['gpu'] or 'no GPU'}: base {b['short_sha']} -> head {h['short_sha']}{fake}\n"
        f"{s['faster']} faster, {s['slower']} slower, {s['within noise']} within noise",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_comparison(comp: dict, out_dir: str | Path) -> list[Path]:
    """comparison.json, comparison.txt (the table) and comparison.png into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("comparison.json", json.dumps(comp, indent=1) + "\n"),
        ("comparison.txt", format_comparison(comp) + "\n"),
    ):
        with atomic_write(out / name, "w") as fh:
            fh.write(text)
        written.append(out / name)
    png = plot_comparison(comp, out / "comparison.png")
    if png:
        written.append(png)
    return written


def default_out(label: str) -> Path:
    return output_folder("compare", label)


def nothing_compared(comp: dict) -> str | None:
    """Why no record of the two runs was compared, or None. A PASS over nothing would read as "no
    slowdown" (e.g. runs of different suites), so report() exits 2 instead, as for incomparable runs."""
    rows = comp["rows"]
    if any(r["verdict"] != "not compared" for r in rows):
        return None
    b, h = comp["base"], comp["head"]
    if all(r["note"].startswith("only in the") for r in rows):
        return (
            f"no case is common to both runs (base suites: {', '.join(b['suites']) or 'none'}; head suites: "
            f"{', '.join(h['suites']) or 'none'}); nothing was compared: give two runs of the same suites"
        )
    return (
        "no case common to both runs has a timing on both sides (skipped, or failed in the base: "
        "rerun them); nothing was compared"
    )


def report(comp: dict, out_dir: str | Path | None, say=print) -> int:
    """Print the table, write the files; the exit status (1 when something is slower or newly fails)."""
    out = (
        Path(out_dir) if out_dir else default_out(f"{comp['base']['short_sha']}-{comp['head']['short_sha']}")
    )
    nothing = nothing_compared(comp)
    if nothing:
        say(f"bench compare: {nothing}")
        return 2
    say(format_comparison(comp))
    for p in write_comparison(comp, out):
        say(f"wrote {p}")
    if comp["failed"]:
        say("bench compare: FAIL: slower beyond the noise threshold (or failing only in the head)")
        return 1
    say("bench compare: PASS: nothing slower beyond the noise threshold")
    return 0


def run_compare(
    base_path,
    head_path,
    *,
    threshold_pct=None,
    out=None,
    force=False,
    confidence=CONFIDENCE,
    baselines=None,
    say=print,
) -> int:
    """`python -m bench compare BASE.json HEAD.json`: 0 pass, 1 slower, 2 cannot compare."""
    from bench.resultsfile import read_results

    try:
        base, head = read_results(base_path), read_results(head_path)
        comp = make_comparison(
            base,
            head,
            base_path=base_path,
            head_path=head_path,
            threshold_pct=threshold_pct,
            baselines=baselines,
            confidence=confidence,
            force=force,
        )
    except (FileNotFoundError, ValueError) as exc:
        say(f"bench compare: {exc}")
        return 2
    return report(comp, out, say)
