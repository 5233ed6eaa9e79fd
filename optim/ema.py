"""The EMA of the weights that the artifact is built from (SPEC.md 5.5)."""

from __future__ import annotations

import torch


class EMA:
    """fp32 exponential moving average of every state-dict tensor (SPEC §5.5), no bias correction."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.sources = model.state_dict()
        self.shadow = {k: v.detach().float().clone() for k, v in self.sources.items()}

    @torch.no_grad()
    def update(self) -> None:
        keys = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[k] for k in keys], [self.sources[k].float() for k in keys], 1 - self.decay
        )

    def copy_to(self, model) -> None:
        model.load_state_dict(self.shadow)  # load_state_dict casts to each tensor's dtype

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
