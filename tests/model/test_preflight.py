"""The kernel preflight check (model/run/preflight.py) and `python -m bench check`: passes on correct kernels,
fails on a planted wrong one, on an output left unwritten, and counts launches on the path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kernels import _runtime, mlp
from model.pipeline import pin_attention
from model.run import preflight


@pytest.fixture
def fresh_kernels():
    mlp._compiled.clear()  # a planted fault must not reuse a kernel compiled without it (GPU only)
    yield
    mlp._compiled.clear()


@pytest.mark.interpreter
def test_correct_kernels_pass(kernel_device):
    result = preflight.check_kernels(kernel_device)
    status = {r["kernel"]: r["status"] for r in result["kernels"]}
    assert sorted(status) == [
        "ce_bwd", "ce_fwd", "mlp_bwd", "mlp_fwd", "muon", "norm_bwd", "norm_fwd", "qk_bwd", "qk_fwd",
        "xsa_bwd", "xsa_fwd",
    ]  # fmt: skip
    allowed = {"pass", "slower"} if kernel_device.type == "cuda" else {"pass"}  # only a GPU is timed
    assert set(status.values()) <= allowed, status
    assert not preflight.failed(result)
    assert all(r["error"] <= r["limit"] for r in result["kernels"])


@pytest.mark.interpreter
def test_a_planted_wrong_kernel_fails(kernel_device, monkeypatch, fresh_kernels):
    monkeypatch.setenv(_runtime.FAULT_KERNEL_ENV, "mlp")
    result = preflight.check_kernels(kernel_device, timed=False)
    status = {r["kernel"]: r for r in result["kernels"]}
    assert status["mlp_fwd"]["status"] == "fail" and "above the limit" in status["mlp_fwd"]["reason"]
    assert status["ce_fwd"]["status"] == "pass"
    assert preflight.failed(result) == ["mlp"] and result["planted_fault"]


@pytest.mark.interpreter
def test_an_output_left_unwritten_fails(kernel_device, monkeypatch):
    real = mlp.up_act

    def lazy_up_act(x, w_up, post=None, signs=None):
        post, signs = real(x, w_up, post, signs)
        if _runtime._poison:
            post[-1, -1] = float("nan")  # the last element never written
        return post, signs

    monkeypatch.setattr(mlp, "up_act", lazy_up_act)
    rows = {r["kernel"]: r for r in preflight.check_kernels(kernel_device, timed=False)["kernels"]}
    assert rows["mlp_fwd"]["status"] == "fail" and "not fully written" in rows["mlp_fwd"]["reason"]


def test_without_a_kernel_platform_the_kernels_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    result = preflight.check_kernels(torch.device("cpu"))
    rows = {r["kernel"]: r for r in result["kernels"]}
    assert rows["mlp_fwd"]["status"] == "skipped" and "TRITON_INTERPRET" in rows["mlp_fwd"]["reason"]
    assert rows["muon"]["status"] == "pass" and not preflight.failed(result)


@pytest.mark.interpreter
def test_launch_counters_prove_the_kernels_ran(kernel_device, monkeypatch):
    monkeypatch.setattr(_runtime, "launches", type(_runtime.launches)())
    monkeypatch.setattr(mlp, "launches", _runtime.launches)
    assert preflight.kernels_on_path(["mlp", "ce"]) == {"mlp": False, "ce": False}
    dtype = torch.float16 if kernel_device.type == "cuda" else torch.float32  # fp32 only in the interpreter
    x = torch.randn(8, 64, device=kernel_device, dtype=dtype, requires_grad=True)
    w_up = torch.randn(128, 64, device=kernel_device, dtype=dtype)
    w_down = torch.randn(64, 128, device=kernel_device, dtype=dtype)
    mlp.fused_mlp(x, w_up, w_down, impl="triton").sum().backward()
    assert preflight.kernels_on_path(["mlp", "ce"]) == {"mlp": True, "ce": False}


def _bench_check(env_extra: dict) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "bench", "check", "--no-time"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.skipif(
    tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4),
    reason="Triton 3.6's interpreter breaks on numpy >= 2.4 (the GPU machine's image has 2.5)",
)
def test_bench_check_cli_exit_codes():
    ok = _bench_check({})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "mlp_fwd  pass" in ok.stdout
    bad = _bench_check({_runtime.FAULT_KERNEL_ENV: "mlp"})
    assert bad.returncode == 1 and "FAILED: mlp_fwd, mlp_bwd" in bad.stdout


def test_every_rank_takes_rank_0s_attention_backend(monkeypatch):
    """ "auto" measures per process; train.py pins rank 0's choice (at the training shape) on every rank."""
    from types import SimpleNamespace

    import kernels.attention
    from model.run_config import model_config, resolve_config

    cfg = resolve_config("record", env={})
    shapes = []

    def fake_measure(shape, dtype, device):
        shapes.append((shape, dtype))
        return {"choice": "cudnn", "why": "fastest", "candidates": {"cudnn": {"status": "ok", "ms": 1.0}}}

    monkeypatch.setattr(kernels.attention, "measure", fake_measure)
    logs = []
    for rank, expected_calls in ((0, 1), (1, 1)):  # rank 1 measures nothing and gets rank 0's answer
        pd = SimpleNamespace(device=torch.device("cuda"), world=2, main=rank == 0,
                             broadcast_object=lambda obj: "cudnn")  # fmt: skip
        pinned = pin_attention(cfg, pd, logs.append)
        assert model_config(pinned, pd.device).attn_impl == "cudnn"
        assert len(shapes) == expected_calls
    assert shapes[0] == ((48, 2048, 8, 4, 64), torch.bfloat16)  # the record's micro-batch at world 2
    assert any("cudnn on every rank" in line for line in logs)
    cpu = SimpleNamespace(device=torch.device("cpu"), world=1, main=True, broadcast_object=lambda o: o)
    assert pin_attention(cfg, cpu, logs.append) is cfg  # CPU: PyTorch's own pick


@pytest.mark.interpreter
def test_a_failing_kernel_is_switched_to_its_reference_and_the_others_kept(
    kernel_device, monkeypatch, fresh_kernels
):
    """With the fused kernels asked for (KERNELS=triton), a planted wrong MLP kernel leaves the run on the
    MLP reference and the CE kernel; strict mode refuses instead."""
    import dataclasses

    from model.run_config import model_config, resolve_config
    from optim.distributed import Dist

    monkeypatch.setenv(_runtime.FAULT_KERNEL_ENV, "mlp")
    cfg = resolve_config("tiny", env={"KERNELS": "triton"})
    pd = Dist(device=kernel_device)
    assert (model_config(cfg, pd.device).mlp_impl, model_config(cfg, pd.device).ce_impl) == (
        "triton",
        "triton",
    )
    checked, record = preflight.run_preflight(cfg, pd, lambda line: None)
    kept = model_config(checked, pd.device)
    assert (kept.mlp_impl, kept.ce_impl, record["replaced"]) == ("torch", "triton", ["mlp"])
    with pytest.raises(SystemExit, match="kernel check failed for mlp"):
        preflight.run_preflight(dataclasses.replace(cfg, preflight="strict"), pd, lambda line: None)
