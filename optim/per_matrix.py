"""The reference Muon layout (#1493) that the bench and the tests compare the banked Muon with
(MUON_IMPL=per_matrix). A reference chosen by configuration only: the shipped program leaves it out
(model/run/shipped_code.py), as the record's run never takes it.
"""

from __future__ import annotations

import torch

from .distributed import rank_world
from .muon import Muon


class PerMatrixMuon:
    """The reference Muon layout (#1493): one optim.Muon per 2-D matrix of the banks, eager, so each of
    the 66 matrices gets its own momentum, row-norm and Newton-Schulz kernels in a Python loop. The
    matrices are Parameters that alias the bank slices; their gradients are views of the bank gradients."""

    def __init__(self, banks, **kw):
        if rank_world()[1] > 1:
            raise ValueError("muon_impl=per_matrix is the single-process reference; use banked with torchrun")
        self.slices = [
            (bank, i, torch.nn.Parameter(bank.data[i])) for bank in banks for i in range(bank.size(0))
        ]
        self.opts = [Muon([p], cuda_graph=False, **kw) for _, _, p in self.slices]
        self.param_groups = [g for opt in self.opts for g in opt.param_groups]

    def launch_reduce_scatters(self) -> None:
        pass

    @torch.no_grad()
    def step(self) -> None:
        for (bank, i, p), opt in zip(self.slices, self.opts):
            if bank.grad is None:
                continue
            p.grad = bank.grad[i]
            opt.step()
            p.grad = None

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.opts]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, s in zip(self.opts, states):
            opt.load_state_dict(s)
