"""The record's optimizer set (SPEC.md 5.1): Muon on the four banks, AdamW on the tied embedding and on
the scalars, stepped in #1523's order; MUON_IMPL=per_matrix swaps in the reference per-matrix Muon
layout (#1493, optim/per_matrix.py) that the bench and the tests compare it with.

``cfg`` is a run configuration (model/run_config.py's Config), read by field name; ``model`` a GPT
(its ``param_groups()``).
"""

from __future__ import annotations

import torch

from .distributed import average_gradients, initialized
from .muon import Muon


class Optimizers:
    """Muon on the banks, AdamW on the tied embedding and on the scalars (SPEC §5.1), stepped in the
    #1523 order: bank reduce-scatters launched, replicated grads averaged (one collective per dtype),
    AdamW steps overlapping the reduce-scatters, then Muon (Appendix B steps 4-6)."""

    def __init__(self, model, cfg, device: torch.device):
        groups = model.param_groups()
        muon_kw = dict(
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.muon_wd,
            ns_steps=cfg.muon_backend_steps,
            row_normalize=cfg.muon_row_normalize,
        )
        if cfg.muon_impl == "per_matrix":
            from .per_matrix import PerMatrixMuon  # a reference: not in the shipped program

            self.muon = PerMatrixMuon(groups["matrix"], **muon_kw)
        else:
            graphs = device.type == "cuda" and cfg.muon_graphs
            self.muon = Muon(groups["matrix"], cuda_graph=graphs, **muon_kw)
        adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=device.type == "cuda")
        self.embed = torch.optim.AdamW(
            groups["embed"], lr=cfg.tied_embed_lr, weight_decay=cfg.embed_wd, **adam
        )
        self.scalar = torch.optim.AdamW(groups["scalar"], lr=cfg.scalar_lr, weight_decay=cfg.adam_wd, **adam)
        self.named = {"muon": self.muon, "embed": self.embed, "scalar": self.scalar}
        for opt in self.named.values():
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
        self.banks = groups["matrix"]
        self.replicated = groups["embed"] + groups["scalar"]
        self.params = self.banks + self.replicated

    def set_schedule(self, lr_mul: float, momentum: float) -> None:
        for opt in self.named.values():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mul
        for g in self.muon.param_groups:
            g["momentum"] = momentum

    def step(self) -> None:
        self.muon.launch_reduce_scatters()
        if initialized():
            for p in self.replicated:
                if p.grad is None:  # every rank must contribute every tensor to the collective
                    p.grad = torch.zeros_like(p)
        average_gradients([p.grad for p in self.replicated if p.grad is not None])
        self.embed.step()
        self.scalar.step()
        self.muon.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        # Bank gradients are zeroed in place, not freed: Muon replays CUDA graphs keyed by their
        # addresses, and backward accumulates into an existing gradient without moving it.
        for p in self.banks:
            if p.grad is not None:
                p.grad.zero_()
        for p in self.replicated:
            p.grad = None

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.named.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.named.items():
            opt.load_state_dict(state[name])
