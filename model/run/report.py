"""What a run says about itself: train.log and metrics.jsonl (Logger), the step metric line, the
per-phase results, and at the end report.json (with the compliance block: PASS/FAIL per challenge limit)
and submission.json in the challenge's format. The plots are bench/plot.py's.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import write_json
from ..run_config import Config, config_hash
from .shipped_code import code_hash

CAP_TRAIN_S = 600.0  # challenge limits (SPEC §8.5, §7.5)
CAP_EVAL_S = 600.0
_EVAL_PHASES = ("quantized", "sliding", "ttt")  # what the challenge's evaluation budget covers


class Logger:
    """Rank 0 prints and appends to train.log; every rank can append to metrics.jsonl through rank 0.
    Without a run folder yet (the start-up checks run before it is made) lines are printed and kept, and
    written to train.log when ``attach`` opens the folder."""

    def __init__(self, run_dir: Path | None, main: bool):
        self.main = main
        self.log_path = self.metrics_path = None
        self.records: list[dict] = []
        self._pending: list[str] = []
        self._errors: set[str] = set()  # errors already logged (so that error() does not repeat them)
        if run_dir is not None:
            self.attach(run_dir)

    def attach(self, run_dir: Path) -> None:
        """Log into ``run_dir`` from now on, starting with the lines printed before it existed."""
        if not self.main:
            return
        self.log_path, self.metrics_path = run_dir / "train.log", run_dir / "metrics.jsonl"
        if self._pending:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write("".join(m + "\n" for m in self._pending))
            self._pending = []

    def __call__(self, msg: str = "") -> None:
        if not self.main:
            return
        print(msg, flush=True)
        if msg.startswith("ERROR: "):
            self._errors.add(msg[len("ERROR: ") :])
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")
        else:
            self._pending.append(msg)

    def error(self, exc: BaseException) -> None:
        """Append the error that ends the run to train.log (its traceback too, unless it is a refusal):
        Python prints it on stderr, the log keeps it. Before the run folder exists there is no log."""
        if not (self.main and self.log_path) or (isinstance(exc, SystemExit) and exc.code in (None, 0)):
            return
        text = str(exc.code) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        if str(exc) in self._errors or text in self._errors:
            return
        if not isinstance(exc, SystemExit | KeyboardInterrupt):
            text += "\n" + "".join(traceback.format_exception(exc)).rstrip()
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"ERROR: {text}\n")

    def metric(self, record: dict) -> None:
        if not self.main:
            return
        self.records.append(record)
        if self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class StepMeter:
    """Throughput since the last metric line (tok/s, TFLOP/s, MFU against ``peak_flops`` per GPU) and
    since the start; formats the metric line (torchtitan's step | loss | grad_norm | mem | tok/s | ...)."""

    def __init__(self, start_s: float, peak_flops: float | None, world: int, device: torch.device):
        self.start_s, self.device = start_s, device
        self.peak = peak_flops * world if peak_flops else None
        self.total_tokens = 0
        self._window(start_s)

    def _window(self, t: float) -> None:
        self.t, self.tokens, self.flops, self.steps = t, 0, 0.0, 0

    def add(self, tokens: int, flops: float) -> None:
        self.total_tokens += tokens
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def line(self, rec: dict, iterations: int, now_s: float) -> str:
        """Add the window's throughput to the step record ``rec``; return its log line."""
        dt = max(now_s - self.t, 1e-9)
        tok_s, tflops = self.tokens / dt, self.flops / dt / 1e12
        rec.update(tok_s=tok_s, tok_s_avg=self.total_tokens / max(now_s - self.start_s, 1e-9), tflops=tflops)
        parts = [
            f"step {rec['step']}/{iterations}",
            f"loss {rec['loss']:.4f}",
            f"grad_norm {rec['grad_norm']:.3f}",
            f"lr {rec['lr_mul']:.3f}",
        ]
        if self.device.type == "cuda":
            rec["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            parts.append(f"mem {rec['mem_gib']:.1f} GiB")
        parts += [f"tok/s {tok_s:,.0f}", f"TFLOP/s {tflops:.3g}"]
        if self.peak:
            rec["mfu"] = tflops * 1e12 / self.peak
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        parts += [f"{1000 * dt / self.steps:.0f} ms/step", f"train {now_s:.1f} s"]
        self._window(now_s)
        return " | ".join(parts)


def peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def phase_result(r: dict) -> dict:
    keep = (
        "val_loss",
        "val_bpb",
        "tokens",
        "bytes",
        "seconds",
        "windows",
        "n_chunks",
        "train_steps",
        "score_s",
        "train_s",
    )
    return {k: r[k] for k in keep if k in r}


def log_phase(name: str, r: dict, log: Logger) -> dict:
    out = phase_result(r)
    log(f"{name}: val_loss {r['val_loss']:.5f} | val_bpb {r['val_bpb']:.5f} | {r['seconds']:.1f} s")
    log.metric({"kind": "phase", "phase": name, **out})
    return out


def new_report(run_id: str, preset: str, mode: str, cfg: Config, mcfg, env: dict, data_source: str) -> dict:
    """report.json's opening: what runs, on what, and why it is not a record run (so far)."""
    reasons = []
    if env["gpu"] is None or env["world_size"] != 8 or "H100" not in env["gpu"]:
        reasons.append(f"not 8xH100 (world {env['world_size']}, {env['gpu'] or 'cpu'})")
    if data_source != "fineweb":
        reasons.append(f"data is the {data_source} corpus, not FineWeb")
    return {
        "run_id": run_id,
        "preset": preset,
        "mode": mode,
        "environment": env,
        "config": asdict(cfg),
        "model_config": asdict(mcfg),
        "config_hash": config_hash(cfg),
        "code_hash": code_hash(),
        "phases": {},
        "non_record_reasons": reasons,
    }


def close_evaluation(report: dict, t_start: float) -> None:
    """The evaluation time (the challenge's eval budget: quantised + sliding + TTT) and the wall time."""
    report["eval_seconds"] = sum(
        report["phases"][p]["seconds"] for p in _EVAL_PHASES if p in report["phases"]
    )
    report["wall_seconds"] = time.perf_counter() - t_start


def artifact_bytes(size: dict) -> dict:
    """report.json's artifact_bytes from a model.quant.size_report."""
    keys = {"total": "artifact_bytes", "code": "code_bytes", "model": "model_bytes", "cap": "cap_bytes"}
    return {k: size[v] for k, v in keys.items()} | {"status": size["status"]}


def record_artifact(report: dict, info: dict) -> None:
    """The artifact phase (model.quant.save_artifact's info, with its size report and code accounting)."""
    keys = ("model_bytes", "matrix_clip_sigmas", "fit_attempts", "n_quantized", "n_passthrough")
    keys += ("hessian_s", "quantize_s", "compress_s", "seconds")
    report["phases"]["artifact"] = {k: info[k] for k in keys}
    report["artifact_bytes"] = artifact_bytes(info["size"])
    details = ("raw_bytes", "shaken_bytes", "minified_bytes", "compressed_bytes", "loader_bytes", "encoding")
    report["artifact_bytes"]["code_detail"] = {k: info["code"][k] for k in details}


def _check(value, limit, unit: str, what: str) -> dict:
    if value is None:
        return {"status": "N/A", "what": what}
    return {
        "status": "PASS" if value <= limit else "FAIL",
        "value": value,
        "limit": limit,
        "unit": unit,
        "what": what,
    }


def compliance(report: dict, val_tokens: int) -> dict:
    """PASS/FAIL/N/A for each challenge limit; ``val_tokens``: the validation tokens TTT must score."""
    phases = report.get("phases", {})
    train = report.get("train_seconds")
    artifact_s = phases.get("artifact", {}).get("seconds")
    train_total = train + (artifact_s or 0.0) if train is not None else None
    eval_s = sum(phases[p]["seconds"] for p in _EVAL_PHASES if p in phases) or None
    size = report.get("artifact_bytes") or {}
    block = {
        "train_time": _check(
            train_total, CAP_TRAIN_S, "s", "timed training loop + GPTQ/artifact (priming excluded)"
        ),
        "eval_time": _check(eval_s, CAP_EVAL_S, "s", "dequantised + sliding-window + TTT evaluation"),
        "artifact_size": _check(
            size.get("total"), size.get("cap", 16_000_000), "B", "code bytes + compressed model"
        ),
    }
    ttt = phases.get("ttt")
    if ttt is None:
        block["score_first_ttt"] = {"status": "N/A", "what": "TTT disabled"}
    else:
        block["score_first_ttt"] = {
            "status": "PASS" if ttt["tokens"] == val_tokens else "FAIL",
            "value": ttt["tokens"],
            "expected": val_tokens,
            "what": "model.evaluate.ttt_score_first scores each chunk under no_grad before adapting on it; "
            "every validation token scored exactly once",
        }
    kern = report.get("kernels")
    if kern is None or kern.get("mode") == "off":
        block["kernels_used"] = {
            "status": "N/A",
            "used": (kern or {}).get("used"),
            "what": "kernel preflight off: the kernels were not proven; `used` is what priming launched",
        }
    else:
        block["kernels_used"] = {
            "status": "PASS" if kern.get("on_path", True) else "FAIL",
            "used": kern.get("used"),
            "replaced": kern.get("replaced"),
            "what": "kernels proven against their references before priming and seen launched after it "
            "(model/preflight.py); a replaced kernel ran as its reference",
        }
    statuses = [v["status"] for v in block.values()]
    block["all_pass"] = all(s in ("PASS", "N/A") for s in statuses)
    return block


_PASSES = {2: "double", 3: "triple", 4: "quadruple"}


def describe_run(report: dict, cfg: Config) -> str:
    """The submission's blurb, from the config that ran (the record's reads "SP8192 + 11 layers x 512 +
    triple depth recurrence + ..."): what is off is left out, and "fused MLP" / "fused CE" only when those
    kernels ran (kernels_used); an evaluation-only run, which trained nothing, names no kernel."""
    m = report.get("model_config") or {}
    used = (report.get("kernels") or {}).get("used") or {}
    parts = [f"SP{m.get('vocab_size')}", f"{m.get('num_layers')} layers x {m.get('model_dim')}"]
    loops = m.get("num_loops") or 0
    if loops:
        passes = _PASSES.get(loops + 1, f"{loops + 1}x")
        parts.append(f"{passes} depth recurrence (layers {m.get('loop_start')}-{m.get('loop_end')})")
    parts.append("parameter banking")
    parts += [f"fused {k.upper() if k == 'mlp' else 'CE'}" for k in ("mlp", "ce") if used.get(k) is True]
    if report.get("mode") != "eval-only":
        parts.append(f"Muon {cfg.muon_momentum:g} ({cfg.muon_impl})")
    if (m.get("parallel_start_layer") or 0) < (m.get("num_layers") or 0):
        parts.append("parallel residuals")
    if cfg.ttt_enabled:
        parts.append("score-first TTT" + (" with eval-time hash embedding" if cfg.hash_embed_enabled else ""))
    if cfg.sliding_window_enabled:
        parts.append(f"sliding-window eval (stride {cfg.eval_stride})")
    k = (report.get("phases") or {}).get("artifact", {}).get("matrix_clip_sigmas", cfg.matrix_clip_sigmas)
    parts.append(f"SDClip GPTQ int6 (k {k:.4g}) + Brotli")
    return " + ".join(parts)


def write_submission(run_dir: Path, report: dict, cfg: Config, env: dict) -> None:
    """submission.json in the challenge's format."""
    final = report.get("final") or {}
    size = report.get("artifact_bytes") or {}
    gpu = env.get("gpu")
    sub = {
        "author": "golfbench",
        "github_id": "golfbench",
        "name": f"golfbench rebuild of PR #1523 ({report.get('preset', cfg.model_preset)} preset)",
        "blurb": describe_run(report, cfg) + " (golfbench train.py)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "track": "10min_16mb",
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        "bytes_total": size.get("total"),
        "bytes_code": size.get("code"),
        "seeds": [cfg.seed],
        "seed_results": {str(cfg.seed): {"val_bpb": final.get("val_bpb")}},
        "hardware": f"{env.get('world_size')}x{gpu}" if gpu else f"{env.get('world_size')}x CPU",
        "pytorch_version": env.get("torch"),
        "record_eligible": report.get("record_eligible"),
    }
    write_json(run_dir / "submission.json", sub)


def finish_report(run_dir: Path, report: dict, cfg: Config, val_tokens: int, env: dict, log: Logger) -> dict:
    """The final phase and its numbers, the compliance block, report.json and submission.json."""
    phases = report.get("phases", {})
    final_name = next((p for p in ("ttt", "sliding", "quantized", "prequant") if p in phases), None)
    if final_name:
        report["final"] = {"phase": final_name, **{k: phases[final_name][k] for k in ("val_loss", "val_bpb")}}
        report["val_loss"], report["val_bpb"] = report["final"]["val_loss"], report["final"]["val_bpb"]
    report["compliance"] = compliance(report, val_tokens)
    report["record_eligible"] = not report["non_record_reasons"]
    write_json(run_dir / "report.json", report)
    write_submission(run_dir, report, cfg, env)
    c = report["compliance"]
    log(
        "compliance: "
        + " | ".join(
            f"{k} {v['status']}" + (f" ({v['value']:,.1f})" if "value" in v else "")
            for k, v in c.items()
            if k != "all_pass"
        )
        + ("" if report["record_eligible"] else f" | NON-RECORD: {'; '.join(report['non_record_reasons'])}")
    )
    log(f"report: {run_dir / 'report.json'}")
    return report
