"""Tiny GPTs with random (not init-time) weights, shared by the quantisation and evaluation tests."""

from __future__ import annotations

import math

import torch

from model.config import KERNEL_IMPL_FIELDS, get_config
from model.gpt import GPT


def random_gpt(seed: int = 0, looping: bool = False, **config) -> GPT:
    """The tiny preset with every matrix drawn N(0, 1/fan_in): activations are correlated and context
    matters (at init the model predicts ~uniformly). Reference kernels, so CPU tests stay fast; `config`
    overrides GPTConfig fields."""
    torch.manual_seed(seed)
    m = GPT(get_config("tiny", **{**dict.fromkeys(KERNEL_IMPL_FIELDS, "torch"), **config}))
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    m.set_looping(looping)
    return m
