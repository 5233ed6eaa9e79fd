"""train.py end to end on CPU: the tiny pipeline, eval-only, resume, the non-finite guard, gloo ranks.

One tiny run (module fixture, ~30 s on 2 cores) is shared by the tests that read its report, artifact
and checkpoints. Every run is a subprocess of the real command line, with the environment cleaned of
variables that train.py would read as config overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import checkpoint, run_config
from model.train_step import FAULT_ENV
from optim.distributed import Dist

ROOT = Path(__file__).resolve().parents[1]
TINY_SAVE_EVERY = 60  # the tiny preset runs 120 steps: checkpoints at 60 and 120


def _clean_env(**extra) -> dict:
    names = {f.name.upper() for f in dataclasses.fields(run_config.Config)}
    names |= {n.upper() for n in run_config.model_fields()}
    env = {k: v for k, v in os.environ.items() if k not in names and k not in ("RUN_ID", FAULT_ENV)}
    env.pop("TRITON_INTERPRET", None)  # train.py uses the torch reference on CPU anyway
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args: list[str], out_dir: Path, run_id: str, env=None, torchrun: int = 0, check: bool = True):
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd += [
        "train.py",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--out-dir",
        str(out_dir),
        "--run-id",
        run_id,
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or _clean_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _steps(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "kind" not in r}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    _run(["--save-every", str(TINY_SAVE_EVERY)], out, "tiny")
    return out / "tiny"


def test_tiny_run_end_to_end(tiny_run):
    rep = _report(tiny_run)
    steps = _steps(tiny_run)
    assert rep["steps"] == len(steps) == 120
    first = sum(steps[s]["loss"] for s in range(1, 6)) / 5
    last = sum(steps[s]["loss"] for s in range(116, 121)) / 5
    assert first > 6.5 and last < first - 1.0, (first, last)
    vals = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in vals if r.get("kind") == "val"]
    assert len(val) == 3 and val[-1] < val[0]
    # the recurrence switches on at 35% of the iterations
    assert not steps[42]["looping"] and steps[43]["looping"]

    for phase in ("prequant", "quantized", "sliding", "ttt"):
        r = rep["phases"][phase]
        assert math.isfinite(r["val_loss"]) and 0 < r["val_bpb"] < 4, (phase, r)
        assert r["seconds"] > 0
    # quantisation costs a little; TTT adapts on already-scored chunks and must not be worse than sliding
    assert rep["phases"]["quantized"]["val_loss"] >= rep["phases"]["prequant"]["val_loss"] - 1e-3
    assert rep["phases"]["ttt"]["val_loss"] < rep["phases"]["sliding"]["val_loss"] + 1e-2
    assert rep["final"]["phase"] == "ttt" and rep["val_bpb"] == rep["phases"]["ttt"]["val_bpb"]

    artifact = tiny_run / "final_model.ptz"
    size = rep["artifact_bytes"]
    assert artifact.stat().st_size == size["model"] == rep["phases"]["artifact"]["model_bytes"]
    assert size["total"] == size["model"] + size["code"] and size["code"] > 10_000
    assert rep["phases"]["artifact"]["n_quantized"] > 0  # GPTQ ran (tiny lowers the passthrough size)

    c = rep["compliance"]
    for key in ("train_time", "eval_time", "artifact_size", "score_first_ttt"):
        assert c[key]["status"] == "PASS", (key, c[key])
    assert c["score_first_ttt"]["value"] == 8192
    assert rep["record_eligible"] is False and any("8xH100" in r for r in rep["non_record_reasons"])
    assert rep["tokens_per_s"] > 0 and rep["train_seconds"] > 0 and rep["eval_seconds"] > 0

    sub = json.loads((tiny_run / "submission.json").read_text())
    assert (
        sub["val_bpb"] == rep["val_bpb"]
        and sub["bytes_total"] == size["total"]
        and sub["track"] == "10min_16mb"
    )
    log = (tiny_run / "train.log").read_text()
    for needle in (
        "torch 2.",
        "git_sha",
        "corpus_fingerprint",
        '"matrix_lr": 0.022',
        "priming:",
        "compliance:",
    ):
        assert needle in log, needle
    assert (tiny_run / "loss.png").stat().st_size > 0 and (tiny_run / "throughput.png").stat().st_size > 0


def test_eval_only_reproduces_the_artifact_numbers(tiny_run, tmp_path):
    _run(["--eval-only", str(tiny_run / "final_model.ptz")], tmp_path, "eval")
    rep, ref = _report(tmp_path / "eval"), _report(tiny_run)
    assert rep["mode"] == "eval-only" and rep["record_eligible"] is False
    for phase in ("quantized", "sliding", "ttt"):
        for key in ("val_loss", "val_bpb"):
            assert rep["phases"][phase][key] == pytest.approx(ref["phases"][phase][key], rel=1e-6), (
                phase,
                key,
            )
    assert rep["artifact_bytes"]["model"] == ref["artifact_bytes"]["model"]


def test_resume_equals_the_uninterrupted_run(tiny_run, tmp_path):
    ckpt = tiny_run / "ckpt" / f"step_{TINY_SAVE_EVERY:06d}"
    args = ["--resume", str(ckpt), "--save-every", str(TINY_SAVE_EVERY), "--train-only"]
    _run(args, tmp_path, "resumed")
    resumed, full = _steps(tmp_path / "resumed"), _steps(tiny_run)
    assert sorted(resumed) == list(range(TINY_SAVE_EVERY + 1, 121))
    for s in resumed:
        assert resumed[s]["loss"] == pytest.approx(full[s]["loss"], rel=1e-6, abs=1e-6), s
        assert resumed[s]["looping"] == full[s]["looping"]
    a = torch.load(tmp_path / "resumed" / "ckpt" / "step_000120" / "rank0.pt", weights_only=False)
    b = torch.load(tiny_run / "ckpt" / "step_000120" / "rank0.pt", weights_only=False)
    for section in ("model", "ema"):
        for k in b[section]:
            torch.testing.assert_close(
                a[section][k], b[section][k], rtol=1e-6, atol=1e-7, msg=f"{section}.{k}"
            )
    rep = _report(tmp_path / "resumed")
    assert any(r.startswith("resumed from") for r in rep["non_record_reasons"])
    assert not any("config differs" in r for r in rep["non_record_reasons"])


def test_resume_refuses_a_config_or_code_mismatch(tiny_run, monkeypatch):
    meta = checkpoint.read_checkpoint_meta(tiny_run / "ckpt" / f"step_{TINY_SAVE_EVERY:06d}")
    pd = Dist()
    monkeypatch.setattr(checkpoint, "code_hash", lambda: meta["code_hash"])  # the tree may change meanwhile
    same = run_config.resolve_config("tiny", env={})
    assert checkpoint.check_resume(meta, same, pd, 1, force=False) == []
    other = run_config.resolve_config("tiny", env={"MATRIX_LR": "0.03"})
    with pytest.raises(SystemExit, match="matrix_lr"):
        checkpoint.check_resume(meta, other, pd, 1, force=False)
    assert "config differs" in checkpoint.check_resume(meta, other, pd, 1, force=True)[0]
    monkeypatch.setattr(checkpoint, "code_hash", lambda: "0" * 64)
    with pytest.raises(SystemExit, match="code hash"):
        checkpoint.check_resume(meta, same, pd, 1, force=False)
    with pytest.raises(SystemExit, match="same layout"):
        checkpoint.check_resume(meta, same, pd, 2, force=True)


def test_nonfinite_guard_stops_before_the_step_naming_step_and_rank(tmp_path):
    env = _clean_env(ITERATIONS=5, WARMUP_STEPS=1, **{FAULT_ENV: "3"})
    proc = _run(["--save-every", "2", "--train-only"], tmp_path, "nan", env=env, check=False)
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step 3 on rank(s) [0]" in proc.stderr
    run_dir = tmp_path / "nan"
    assert (run_dir / "ckpt" / "step_000002" / "meta.json").is_file()
    assert not (run_dir / "ckpt" / "step_000003").exists() and not (run_dir / "report.json").exists()
    assert max(_steps(run_dir)) == 2  # step 3 was never taken


def test_preflight_replaces_a_planted_wrong_kernel_or_refuses_in_strict_mode(tmp_path):
    """Kernels pass, then train: under the interpreter the MLP kernel is checked before priming; planted
    wrong, the run trains on its reference and the report says so; --preflight strict refuses to start."""
    env = _clean_env(ITERATIONS=3, WARMUP_STEPS=1, TRITON_INTERPRET=1, GOLFBENCH_FAULT_KERNEL="mlp")
    _run(["--train-only"], tmp_path, "planted", env=env)
    kern = _report(tmp_path / "planted")["kernels"]
    assert kern["mode"] == "on" and kern["replaced"] == ["mlp"]
    rows = {r["kernel"]: r["status"] for r in kern["kernels"]}
    assert rows["mlp_fwd"] == "fail" and rows["ce_fwd"] == "pass"
    log = (tmp_path / "planted" / "train.log").read_text()
    assert "mlp failed its check and is NOT used" in log
    assert _report(tmp_path / "planted")["compliance"]["kernels_used"]["replaced"] == ["mlp"]

    strict = _run(["--train-only", "--preflight", "strict"], tmp_path, "strict", env=env, check=False)
    assert strict.returncode != 0 and "preflight (strict): kernel check failed for mlp" in strict.stderr
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()  # refused before any step

    _run(["--train-only", "--preflight", "off"], tmp_path, "off", env=_clean_env(ITERATIONS=2))
    rep = _report(tmp_path / "off")
    assert rep["kernels"]["mode"] == "off" and rep["compliance"]["kernels_used"]["status"] == "N/A"


def test_two_gloo_processes_equal_one_process_with_accumulation_2(tmp_path):
    # Clipping is per rank on the local gradient (SPEC 5.6), which differs from clipping the averaged
    # gradient of one process; an unreachable threshold keeps the clip code path but not its effect.
    common = dict(ITERATIONS=4, WARMUP_STEPS=1, GRAD_CLIP_NORM=1e9, TRAIN_LOG_EVERY=1)
    _run(["--train-only", "--save-every", "4"], tmp_path, "one", env=_clean_env(GRAD_ACCUM_STEPS=2, **common))
    _run(
        ["--train-only", "--save-every", "4"],
        tmp_path,
        "two",
        env=_clean_env(GRAD_ACCUM_STEPS=1, OMP_NUM_THREADS=1, **common),
        torchrun=2,
    )
    one, two = _report(tmp_path / "one"), _report(tmp_path / "two")
    assert (one["world_size"], one["grad_accum_steps"]) == (1, 2)
    assert (two["world_size"], two["grad_accum_steps"]) == (2, 1)
    assert one["config"]["iterations"] == two["config"]["iterations"] == 4  # env overrides reached the run
    a, b = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], abs=1e-5)  # same data, same initial weights
    for s in a:  # the sharded Muon reduces gradients in bf16: small differences after the first step
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], abs=2e-3), s
    wa = torch.load(tmp_path / "one" / "ckpt" / "step_000004" / "rank0.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "two" / "ckpt" / "step_000004" / "rank0.pt", weights_only=False)["model"]
    for k in wa:
        if k.endswith("_bank"):  # Muon: updates orthogonalised, differences stay at bf16 rounding
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-3, msg=k)
        else:  # AdamW normalises near-zero gradients to +-lr: compare relative Frobenius error
            rel = (wa[k].float() - wb[k].float()).norm() / wa[k].float().norm()
            assert rel < 2e-2, (k, rel.item())


def test_config_env_and_cli_overrides():
    env = {
        "SEED": "42",
        "ITERATIONS": "300",
        "TTT_ENABLED": "0",
        "TTT_LR": "0.005",
        "MUON_MOMENTUM": "0.99",
        "HASH_EMBED_ENABLED": "false",
        "MAX_WALLCLOCK_SECONDS": "120",
        "WARMDOWN_FRAC": "0.72",
        "QK_GAIN_INIT": "5.25",  # a GPTConfig field
        "PATH": "/usr/bin",  # unrelated variables are ignored
    }
    cfg = run_config.resolve_config("record", env=env, cli={"seed": "7"}, cli_model={"num_loops": "1"})
    assert (cfg.seed, cfg.iterations, cfg.ttt_enabled, cfg.ttt_lr) == (7, 300, False, 0.005)
    assert (cfg.muon_momentum, cfg.hash_embed_enabled, cfg.max_wallclock_seconds, cfg.warmdown_frac) == (
        0.99,
        False,
        120.0,
        0.72,
    )
    assert cfg.model_overrides == {"qk_gain_init": 5.25, "num_loops": 1}
    mcfg = run_config.model_config(cfg, torch.device("cpu"))
    assert (mcfg.qk_gain_init, mcfg.num_loops, mcfg.mlp_impl) == (5.25, 1, "torch")
    assert run_config.resolve_config("record", env={}) == run_config.PRESETS["record"]
    with pytest.raises(ValueError, match="TTT_ENABLED"):
        run_config.resolve_config("record", env={"TTT_ENABLED": "maybe"})
    with pytest.raises(ValueError, match="kernels"):
        run_config.resolve_config("record", env={"KERNELS": "cutlass"})
    args, cli, cli_model = train.parse_args(["--matrix-lr", "0.03", "--model-num-loops", "1"])
    assert cli == {"matrix_lr": "0.03"} and cli_model == {"num_loops": "1"}
