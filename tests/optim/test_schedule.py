"""The record's schedules: LR warmdown, Muon momentum warmup, run progress by wallclock or iterations."""

from __future__ import annotations

import dataclasses

import pytest

from model import run_config
from optim import schedule


def test_schedule():
    cfg = run_config.PRESETS["record"]
    assert schedule.lr_multiplier(0.0, 0.667, 0.0) == 1.0
    assert schedule.lr_multiplier(0.333, 0.667, 0.0) == 1.0
    assert schedule.lr_multiplier(0.6665, 0.667, 0.0) == pytest.approx(0.5, abs=1e-3)
    assert schedule.lr_multiplier(1.0, 0.667, 0.0) == 0.0
    assert schedule.muon_momentum(cfg, 0) == pytest.approx(0.92)
    assert schedule.muon_momentum(cfg, 750) == pytest.approx(0.945)
    assert schedule.muon_momentum(cfg, 5000) == pytest.approx(0.97)
    # wallclock fraction of 588 s (600 - 12 reserve) unless the iterations bound is nearer
    assert schedule.progress(cfg, 10, 294.0) == pytest.approx(0.5)
    assert schedule.progress(dataclasses.replace(cfg, iterations=20), 10, 1.0) == pytest.approx(0.5)
