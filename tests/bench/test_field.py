"""The field's kernels as providers (bench/field.py) and where the suites use them: skip reasons, the
accuracy checks (on CPU, with the references and planted errors), and Liger's rope wrapper against the
record's rotary under the Triton interpreter when liger-kernel is installed."""

from __future__ import annotations

import sys

import pytest
import torch

import bench.suites  # noqa: F401  (registers the suites)
from bench import field
from bench.registry import SUITES
from kernels.cross_entropy import softcapped_cross_entropy
from kernels.qk_rope import apply_rotary
from model.gpt import rms_norm

BF16 = torch.bfloat16
LIGER = field.liger_import_error() is None


@pytest.fixture
def on_cpu(monkeypatch):
    """The checks' inputs made on the CPU (they are made on the GPU in a benchmark run)."""
    monkeypatch.setattr(field, "DEVICE", "cpu")


@pytest.fixture
def fresh_import(monkeypatch):
    field.liger_import_error.cache_clear()
    yield
    field.liger_import_error.cache_clear()


def _providers():
    return [
        field.liger_rms_norm(64, 512, BF16, "fwd+bwd"),
        field.liger_rotary(2, 128, 8, 4, 64, 16, BF16, "fwd"),
        field.liger_cross_entropy(64, 8192, 30.0, BF16, "fwd+bwd"),
        field.liger_fused_linear_cross_entropy(64, 512, 8192, 30.0, BF16),
    ]


@pytest.mark.skipif(LIGER, reason="liger-kernel is installed here")
def test_without_liger_every_provider_says_how_to_install_it():
    names = [p.name for p in _providers()]
    assert names == ["liger", "liger", "liger", "liger_flce"]
    for p in _providers():
        assert p.unavailable() == "liger-kernel is not installed (pip install '.[liger]')"
        assert p.check is not None


def test_a_liger_that_does_not_import_is_named_with_its_error(tmp_path, monkeypatch, fresh_import):
    pkg = tmp_path / "liger_kernel" / "transformers"
    pkg.mkdir(parents=True)
    (tmp_path / "liger_kernel" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "functional.py").write_text("raise RuntimeError('triton 9.9 is not supported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("liger_kernel")]:
        monkeypatch.delitem(sys.modules, name)
    reason = field.liger_import_error()
    assert reason.startswith("liger-kernel does not import: RuntimeError") and "triton 9.9" in reason


def test_rms_norm_check_measures_the_error(on_cpu):
    exact = field.rms_norm_check(rms_norm, 300, 96, BF16, "fwd+bwd")()
    assert set(exact) == {"rel_err", "rel_err_bf16_math"} and set(exact["rel_err"]) == {"out", "dx"}
    assert exact["rel_err"] == exact["rel_err_bf16_math"]  # the reference in bf16 is what it measures
    assert 1e-4 < exact["rel_err"]["out"] < 1e-2
    off = field.rms_norm_check(lambda x: rms_norm(x) * 1.02, 300, 96, BF16, "fwd+bwd")()
    assert off["rel_err"]["out"] > 0.015 and off["rel_err"]["dx"] > 0.015
    fwd = field.rms_norm_check(rms_norm, 300, 96, BF16, "fwd")()
    assert set(fwd["rel_err"]) == {"out"}


def test_rotary_check_measures_the_error(on_cpu):
    def wrong_sign(q, k, cos, sin):
        return apply_rotary(q, cos, -sin), apply_rotary(k, cos, -sin)

    exact = field.rotary_check(field.rotary_ref, 2, 48, 4, 2, 32, 16, torch.float32, "fwd+bwd")()
    assert set(exact["rel_err"]) == {"q", "k", "dq", "dk"}
    assert max(exact["rel_err"].values()) < 1e-6
    off = field.rotary_check(wrong_sign, 2, 48, 4, 2, 32, 16, torch.float32, "fwd+bwd")()
    assert min(off["rel_err"].values()) > 1e-2


def test_ce_checks_measure_the_error(on_cpu):
    ours = lambda z, t: softcapped_cross_entropy(z, t, 30.0, impl="torch")  # noqa: E731
    exact = field.ce_check(ours, 40, 300, 30.0, BF16, "fwd+bwd")()
    assert set(exact) == {"rel_err"} and exact["rel_err"]["loss"] < 1e-6
    assert exact["rel_err"]["dlogits"] < 1e-2  # the gradient is rounded to bf16
    off = field.ce_check(
        lambda z, t: softcapped_cross_entropy(z, t, 25.0, impl="torch"), 40, 300, 30.0, BF16, "fwd"
    )()
    assert set(off["rel_err"]) == {"loss"} and off["rel_err"]["loss"] > 1e-3
    lin = field.linear_ce_check(
        lambda x, w, t: ours(torch.nn.functional.linear(x, w), t), 40, 32, 300, 30.0, BF16
    )()
    assert set(lin["rel_err"]) == {"loss", "dx", "dw"}
    assert 0 < max(lin["rel_err"].values()) < 2e-2  # the bf16 matmul's rounding, not more
    assert (
        field.linear_ce_check(lambda x, w, t: field.linear_ce_ref(x, w, t, 25.0), 40, 32, 300, 30.0, BF16)()[
            "rel_err"
        ]["loss"]
        > 1e-3
    )


def test_checks_use_at_most_check_rows(on_cpu, monkeypatch):
    seen = []
    real = field.ce_inputs
    monkeypatch.setattr(field, "ce_inputs", lambda rows, *a, **k: seen.append(rows) or real(rows, *a, **k))
    ours = lambda z, t: softcapped_cross_entropy(z, t, 30.0, impl="torch")  # noqa: E731
    field.ce_check(ours, 500, 64, 30.0, BF16, "fwd", check_rows=100)()
    field.ce_check(ours, 50, 64, 30.0, BF16, "fwd", check_rows=100)()
    assert seen == [100, 50]


@pytest.mark.skipif(not LIGER, reason="liger-kernel is not installed")
def test_liger_rope_wrapper_is_the_records_rotary(on_cpu):
    """Under the Triton interpreter (fp32): Liger's in-place rope with -sin over the first rope_dims is
    exactly kernels.qk_rope.apply_rotary, forward and backward."""
    got = field.rotary_check(field._liger_rotary_fn(16), 2, 24, 8, 4, 64, 16, torch.float32, "fwd+bwd")()
    assert max(got["rel_err"].values()) < 1e-6, got


def test_ce_suite_has_liger_and_the_linear_head_mode():
    full = SUITES["ce"].cases(False)
    modes = {c.params["mode"] for c in full}
    assert modes == {"fwd", "fwd+bwd", "linear+ce"}
    for case in full:
        names = [p.name for p in case.providers]
        assert case.baseline == "compiled" and all(p.check is not None for p in case.providers)
        if case.params["mode"] == "linear+ce":
            n = case.params["N"]
            assert names == ["compiled", "ours", "liger_flce"]
            assert case.flops == 6.0 * n * 512 * 8192 and case.bytes == 4.0 * (n * 512 + 8192 * 512)
        else:
            assert names == ["eager", "compiled", "ours", "liger"]
    assert {c.params["mode"] for c in SUITES["ce"].cases(True)} == {"fwd+bwd"}


def test_attention_suite_has_fa4_skipped_with_its_reason_when_absent():
    from kernels.attention import fa4_import_error

    for quick in (True, False):
        for case in SUITES["attention"].cases(quick):
            fa4 = next(p for p in case.providers if p.name == "fa4")
            if fa4_import_error() is not None:
                assert "pip install '.[fa4]'" in fa4.unavailable()
