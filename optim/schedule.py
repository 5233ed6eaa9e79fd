"""The record's schedules (SPEC.md 5.4, 5.7): the learning-rate warmdown, Muon's momentum warmup, and the
progress of a run by wallclock or by iterations, whichever bound is nearer.

``cfg`` is a run configuration (model/run_config.py's Config), read by field name.
"""

from __future__ import annotations


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """1 until 1 - warmdown_frac of the run, then linear to min_lr at the end (SPEC §5.4)."""
    if warmdown_frac <= 0 or frac < 1 - warmdown_frac:
        return 1.0
    return max((1 - frac) / warmdown_frac, min_lr)


def muon_momentum(cfg, step: int) -> float:
    """Linear from muon_momentum_warmup_start to muon_momentum over muon_momentum_warmup_steps."""
    r = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - r) * cfg.muon_momentum_warmup_start + r * cfg.muon_momentum


def train_budget_s(cfg) -> float:
    """Seconds of the timed loop: the wallclock cap less the GPTQ reserve (0: no wallclock bound)."""
    return cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds if cfg.max_wallclock_seconds > 0 else 0.0


def progress(cfg, step: int, elapsed_s: float) -> float:
    """Fraction of the run done: of the wallclock budget, or of the iterations, whichever bound is nearer."""
    frac = step / cfg.iterations if cfg.iterations > 0 else 0.0
    budget = train_budget_s(cfg)
    return max(frac, elapsed_s / budget) if budget > 0 else frac
