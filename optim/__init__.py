"""Optimizers: batched Newton-Schulz and Muon over parameter banks (plain and sharded)."""

from .muon import Muon, average_gradients
from .newton_schulz import BankedNewtonSchulz, newton_schulz, newton_schulz_ref, ns_coefficients, ns_flops

__all__ = [
    "BankedNewtonSchulz",
    "Muon",
    "average_gradients",
    "newton_schulz",
    "newton_schulz_ref",
    "ns_coefficients",
    "ns_flops",
]
