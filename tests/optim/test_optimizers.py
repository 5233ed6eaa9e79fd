"""The record's optimizer set against the reference per-matrix Muon layout, through train.py's step."""

from __future__ import annotations

import pytest
import torch

from model import run_config, train_step
from optim import schedule
from optim.optimizers import Optimizers


def test_reference_settings_match_ours_on_cpu():
    """kernels=torch + per-matrix Muon (the bench's reference) and the banked Muon make the same steps."""
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    batch = [tuple(torch.randint(0, 1024, (4, 64), generator=gen) for _ in range(2))]
    losses, weights = {}, {}
    for impl in ("banked", "per_matrix"):
        cfg = run_config.resolve_config("tiny", env={}, cli={"muon_impl": impl, "kernels": "torch"})
        model = train_step.build_model(cfg, device)
        opts = Optimizers(model, cfg, device)
        fixed = type("B", (), {"next": lambda self, j, d: batch[j]})()
        losses[impl] = []
        for step in range(3):
            opts.set_schedule(1.0, schedule.muon_momentum(cfg, step))
            loss = train_step.forward_backward(model, fixed, 1, device)
            train_step.clip_gradients(opts.params, cfg.grad_clip_norm)
            opts.step()
            losses[impl].append(loss.item())
        weights[impl] = model.state_dict()
    assert losses["banked"][0] == losses["per_matrix"][0]
    assert losses["banked"] == pytest.approx(losses["per_matrix"], abs=1e-4)
    assert losses["banked"][2] < losses["banked"][0]
    for k, v in weights["banked"].items():
        torch.testing.assert_close(v, weights["per_matrix"][k], rtol=0, atol=2e-3, msg=k)
