"""Optimizers: batched Newton-Schulz and Muon over parameter banks (plain and sharded); the record's
optimizer set (optimizers.py), its schedules (schedule.py) and EMA (ema.py); processes (distributed.py)."""

from .distributed import average_gradients
from .muon import Muon
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
